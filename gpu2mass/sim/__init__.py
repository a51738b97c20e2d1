"""The survey simulator: realistic raw 2MASS nights with their truth.

``simulate_night(outdir, SimulationRequest(preset="ci", seed=1))`` writes a night in the
raw night format (``shared/spec/raw-night.md``) plus ``truth/``. The pieces, one per
module: :mod:`.camera` (optics, detector, calibration library), :mod:`.sensitivity` (the
noise budget), :mod:`.psf`, :mod:`.observing` (site, time, atmosphere), :mod:`.sky`
(stars, galaxies, asteroids), :mod:`.galaxy`, :mod:`.artifacts`, :mod:`.plan` (presets
and schedule), :mod:`.scan` (frames of one scan), :mod:`.night` (the whole night).
"""

__all__ = ["PRESETS", "SimulationRequest", "SimulationSummary", "simulate_night"]


def __getattr__(name):
    # Lazy: importing one piece of the simulator (say, gpu2mass.sim.psf) must not import
    # the whole of it, with the kernels and the Gaia catalogue behind it.
    if name == "PRESETS":
        from gpu2mass.sim.plan import PRESETS

        return PRESETS
    if name in ("SimulationRequest", "SimulationSummary", "simulate_night"):
        from gpu2mass.sim import night

        return getattr(night, name)
    raise AttributeError(f"module 'gpu2mass.sim' has no attribute {name!r}")
