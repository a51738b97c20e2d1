"""Slow, straightforward NumPy versions of the kernels, which the fast ones are pinned to.

Host only. Written for clarity, vectorized with NumPy where that stays obvious, sharing
nothing with the fast paths but the definitions of the math. Modules: :mod:`.psf` (Moffat
stamps, scatter-add, and a brute-force pixel integral).
"""

__all__: list[str] = []
