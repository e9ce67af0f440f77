"""Hyper-parameter grids searched on val, one constructor per grid (docs/methods-training-free.md).

Every constructor returns a plain list of Python floats, in the order the search visits them. The values
are computed in double precision with exactly the formula shown, so a naive loop that rebuilds them from
the same formula gets the same numbers.
"""
from __future__ import annotations

from ..errors import CachekitError

#: Offset of the Tip-Adapter / APE beta and alpha grids: value_i = 0.1 + i * (scale - 0.1) / steps.
GRID_START = 0.1


def _check(name: str, scale, steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise CachekitError(f"{name} grid: steps={steps!r} must be a positive integer; fix: pass steps >= 1")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise CachekitError(f"{name} grid: scale={scale!r} is not a number; fix: pass a number such as 7")


def offset_grid(scale: float, steps: int, start: float = GRID_START) -> list[float]:
    """[start + i * (scale - start) / steps for i in 0..steps-1] (the end point `scale` is excluded)."""
    _check("offset", scale, steps)
    return [start + i * (scale - start) / steps for i in range(steps)]


def beta_grid(s_beta: float = 7, n_beta: int = 200) -> list[float]:
    """Cache sharpness beta_i = 0.1 + i * (s_beta - 0.1) / n_beta, i < n_beta (Tip-Adapter, APE)."""
    _check("beta", s_beta, n_beta)
    return offset_grid(s_beta, n_beta)


def alpha_grid(s_alpha: float = 7, n_alpha: int = 20) -> list[float]:
    """Cache weight alpha_j = 0.1 + j * (s_alpha - 0.1) / n_alpha, j < n_alpha (Tip-Adapter, APE)."""
    _check("alpha", s_alpha, n_alpha)
    return offset_grid(s_alpha, n_alpha)


def gamma_grid(s_gamma: float = 1, n_gamma: int = 20) -> list[float]:
    """APE KL sharpness gamma_k = k * s_gamma / n_gamma, k < n_gamma (starts at 0: no re-weighting)."""
    _check("gamma", s_gamma, n_gamma)
    return [k * s_gamma / n_gamma for k in range(n_gamma)]


def gda_alpha_grid() -> list[float]:
    """GDA weight: the 7 values 10**e, e = -4..2, i.e. 1e-4, 1e-3, ..., 1e2."""
    return [10.0 ** e for e in range(-4, 3)]



#: Most grid points one search may visit (the `n` settings' max_points): 125x the APE reference grid
#: (200 x 20 x 20 = 80,000), far beyond what the authors search and still bounded: the counts alone are
#: n_beta x n_alpha (x n_gamma) integers, refused before anything is allocated.
MAX_GRID_POINTS = 10_000_000
