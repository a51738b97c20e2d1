# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv on first use and work on a machine without a GPU.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_NIGHT ?= demo_night
DEMO_OUT   ?= demo_out

.PHONY: demo test test-gpu venv install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

venv: $(PY)

install: $(PY)
	$(PY) -m pip install -q -e '.[test]'

# Simulate a small night (2 calibration observations, 2 science scans), process it end to
# end, and print how the products compare with the simulation's truth.
demo: install
	$(VENV)/bin/gpu2mass simulate $(DEMO_NIGHT) --preset ci --seed 1 --overwrite
	$(VENV)/bin/gpu2mass night $(DEMO_NIGHT) --out $(DEMO_OUT)
	$(VENV)/bin/gpu2mass validate $(DEMO_OUT) --truth $(DEMO_NIGHT)/truth
	@echo "products in $(DEMO_OUT): night/qa.html, scans/*/pts.parquet, atlas/; try:"
	@echo "  $(VENV)/bin/gpu2mass query $(DEMO_OUT) \"select scan, score, status from scans\""

# The whole suite: the CPU lane, and the CUDA-simulator lane in its own process
# (NUMBA_ENABLE_CUDASIM must be set before Numba is imported). The lanes run side by side:
# each is mostly single-threaded, so on 2 cores the suite takes the longer lane's time. Each
# lane fails if it collects no tests (pytest exit 5), so CI can never pass on nothing.
test: install
	@NUMBA_ENABLE_CUDASIM=1 $(PY) -m pytest -m cudasim > .cudasim-lane.log 2>&1 & sim=$$!; \
	$(PY) -m pytest -m "not cudasim"; cpu=$$?; \
	wait $$sim; simrc=$$?; \
	echo "---- CUDA-simulator lane (NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim) ----"; \
	cat .cudasim-lane.log; rm -f .cudasim-lane.log; \
	echo "CPU lane exit $$cpu, CUDA-simulator lane exit $$simrc"; \
	test $$cpu -eq 0 && test $$simrc -eq 0

# On a machine with a GPU and the cuda13 extra installed.
test-gpu: install
	$(PY) -m pytest -m gpu

bench: install
	$(PY) profiling/bench_simulate.py

clean:
	rm -rf $(DEMO_NIGHT) $(DEMO_OUT) build dist *.egg-info
