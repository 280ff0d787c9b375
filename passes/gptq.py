"""GPTQ's error-compensating rounding (Frantar et al. 2022), shared by the fp8 and int4-awq quantizers: the calibration activations' second moments and the row-by-row rounding with error feedback."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fdec.ir import FdecModel

__all__ = ["gptq", "hessians", "inverse_factor"]

_GPTQ_BLOCK = 128  # rows rounded between the lazy (matrix) updates of the rest


def hessians(
    model: FdecModel, batches: Sequence[np.ndarray], names: Sequence[str]
) -> Mapping[str, np.ndarray]:
    """XᵀX (float64 [K, K]) of each named activation over the calibration batches."""
    from fdec.calibrate import ActivationRunner, active_calibration_source, add_xtx

    names = list(dict.fromkeys(names))
    source = active_calibration_source(batches)
    if source is not None:  # a streamed compile: layer by layer (fdec.calibrate_layerwise)
        return source.hessians(model, names)
    sums: dict[str, np.ndarray] = {}
    runner = ActivationRunner(model, names)
    try:
        for ids in batches:
            for name, array in runner.run(np.asarray(ids)).items():
                x = np.asarray(array).reshape(-1, np.shape(array)[-1])
                sums[name] = add_xtx(sums.get(name), x)
    finally:
        runner.close()
    return sums


def inverse_factor(
    hessian: np.ndarray, damping: float, *, overwrite: bool = False
) -> tuple[np.ndarray, np.ndarray] | None:
    """(U, dead) for GPTQ: U upper triangular with UᵀU = (H + λI)⁻¹, λ = `damping` × H's mean
    diagonal, after each dead input channel (zero diagonal: never active in calibration) got a
    1 on the diagonal; `dead` marks those. None when H cannot be factored.

    LAPACK's potrf / potri / potrf work in place on one [K, K] float64 buffer: `hessian` itself
    when `overwrite` (float64, C-contiguous: it is then destroyed) or one copy. numpy's inv and
    cholesky would hold four (6.6 GB for an 8B Llama's down_proj)."""
    from scipy.linalg import lapack

    owned = overwrite and hessian.dtype == np.float64 and hessian.flags.c_contiguous
    h = hessian if owned else np.array(hessian, dtype=np.float64, order="C")
    k = len(h)
    diagonal = np.diag(h)  # a copy
    dead = diagonal <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += damping * float(np.mean(np.diag(h)))
    # H is symmetric, so its transpose (a Fortran-ordered view, what LAPACK works on) is H.
    factor, info = lapack.dpotrf(h.T, lower=0, clean=0, overwrite_a=1)  # H = RᵀR
    if info != 0:
        return None
    inverse, info = lapack.dpotri(factor, lower=0, overwrite_c=1)  # upper triangle of H⁻¹
    if info != 0:
        return None
    upper, info = lapack.dpotrf(inverse, lower=0, clean=1, overwrite_a=1)  # H⁻¹ = UᵀU
    if info != 0:
        return None
    return upper, dead


def gptq(
    w: np.ndarray,
    factor: tuple[np.ndarray, np.ndarray] | None,
    round_row: Callable[[int, np.ndarray], np.ndarray],
) -> bool:
    """GPTQ's error feedback (Frantar et al. 2022) over the rows of `w` ([K, N] float64, changed
    in place): rows (input channels) are rounded in order by `round_row(i, row)`, which stores
    row i's codes and returns the values they stand for, and each row's rounding error is spread
    over the rows not yet rounded through `factor` (`inverse_factor` of H = XᵀX), which
    minimises ‖X·W − X·Ŵ‖². False, with nothing rounded, when `factor` is None (H could not be
    inverted)."""
    if factor is None:
        return False
    upper, dead = factor
    k = w.shape[0]
    w[dead, :] = 0.0
    for start in range(0, k, _GPTQ_BLOCK):
        stop = min(start + _GPTQ_BLOCK, k)
        block = w[start:stop].copy()
        errors = np.empty_like(block)
        inverse = upper[start:stop, start:stop]
        for i in range(stop - start):
            error = (block[i] - round_row(start + i, block[i])) / inverse[i, i]
            block[i + 1 :] -= np.outer(inverse[i, i + 1 :], error)
            errors[i] = error
        w[stop:] -= upper[start:stop, stop:].T @ errors
    return True
