"""GPTQ's error-compensating rounding (Frantar et al. 2022), shared by the fp8 and int4-awq quantizers: the calibration activations' second moments and the row-by-row rounding with error feedback."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fdec.ir import FdecModel

__all__ = ["gptq", "hessians"]

_GPTQ_BLOCK = 128  # rows rounded between the lazy (matrix) updates of the rest


def hessians(
    model: FdecModel, batches: Sequence[np.ndarray], names: Sequence[str]
) -> Mapping[str, np.ndarray]:
    """XᵀX (float64 [K, K]) of each named activation over the calibration batches."""
    from fdec.calibrate import ActivationRunner, active_calibration_source

    names = list(dict.fromkeys(names))
    source = active_calibration_source(batches)
    if source is not None:  # a streamed compile: layer by layer (fdec.calibrate_layerwise)
        return source.hessians(model, names)
    sums: dict[str, np.ndarray] = {}
    runner = ActivationRunner(model, names)
    try:
        for ids in batches:
            for name, array in runner.run(np.asarray(ids)).items():
                x = np.asarray(array, dtype=np.float64)
                x = x.reshape(-1, x.shape[-1])
                if name in sums:
                    sums[name] += x.T @ x
                else:
                    sums[name] = x.T @ x
    finally:
        runner.close()
    return sums


def gptq(
    w: np.ndarray,
    hessian: np.ndarray,
    damping: float,
    round_row: Callable[[int, np.ndarray], np.ndarray],
) -> bool:
    """GPTQ's error feedback (Frantar et al. 2022) over the rows of `w` ([K, N] float64, changed
    in place): rows (input channels) are rounded in order by `round_row(i, row)`, which stores
    row i's codes and returns the values they stand for, and each row's rounding error is spread
    over the rows not yet rounded through the inverse of H = XᵀX (damped by `damping` × its
    mean diagonal), which minimises ‖X·W − X·Ŵ‖². False, with nothing rounded, when H cannot
    be inverted."""
    h = np.array(hessian, dtype=np.float64)
    k = w.shape[0]
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h[np.diag_indices(k)] += damping * float(np.mean(np.diag(h)))
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H⁻¹ = Uᵀ U
    except np.linalg.LinAlgError:
        return False
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
