"""gpu2mass: the 2MASS Production Processing System (2MAPPS v3.0), re-implemented
for GPUs with a complete CPU fallback.

Import what you need from the step modules; importing the package itself is cheap and
never touches a GPU.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
