"""Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment
for Multi-Task Learning", CVPR 2023).

The task gradients G (K x P) are replaced by aligned ones, G' = B G, whose Gram matrix is a
multiple of the identity (condition number 1): with G G^T = V L V^T (eigenvalues L, the
numerical rank r of them kept), B = s V_r L_r^{-1/2} V_r^T and G' G'^T = s^2 V_r V_r^T,
so the aligned gradients are orthogonal with equal norms s (on a full-rank G). The scale
s^2 is the smallest kept eigenvalue (``scale = "min"``, the paper's choice), their median
(``"median"``, the lower middle one as in the authors' code) or their mean (``"rmse"``).
The update is the sum of the aligned gradients, sum_k (B 1)_k g_k.

The rank cut follows the authors' code: eigenvalues above max(L) * K * eps(float32).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from mtlkit.hookspecs import hookimpl

from ._common import GradTargetParams, GramWeighting


class AlignedMTLParams(GradTargetParams):
    scale: Literal["min", "median", "rmse"] = "min"  # s^2: smallest, median or mean kept eigenvalue


def alignment_matrix(m: np.ndarray, scale: str = "min") -> np.ndarray:
    """B with B M B = s^2 (projector onto M's range), from the Gram matrix M."""
    k = m.shape[0]
    lam, vec = np.linalg.eigh(m)
    top = float(lam.max()) if k else 0.0
    if not top > 0:  # every gradient is zero: nothing to align
        return np.zeros((k, k))
    keep = lam > top * k * float(np.finfo(np.float32).eps)
    lam, vec = lam[keep], vec[:, keep]
    if scale == "min":
        s2 = float(lam.min())
    elif scale == "median":
        s2 = float(np.sort(lam)[(len(lam) - 1) // 2])
    else:
        s2 = float(lam.mean())
    return np.sqrt(s2) * (vec / np.sqrt(lam)) @ vec.T


class AlignedMTL(GramWeighting):
    method = "aligned_mtl"
    initial_coefficient = 1.0
    # host_reads_per_step = 1 (GramWeighting's): the eigendecomposition. On CUDA
    # torch.linalg.eigh synchronises with the host (it reads LAPACK's error flag; there is
    # no eigh_ex), so a device version would wait as long as this one read of the Gram
    # matrix, and the rank cut and the scale choice then run in numpy as before.

    def __init__(self, params: AlignedMTLParams, task_names: list[str]) -> None:
        super().__init__(task_names, params.grad_target)
        self.scale = params.scale

    def coefficients(self, m, extra=None):
        return alignment_matrix(m, self.scale).sum(0)


@hookimpl
def register_weightings(register):
    register(
        "aligned_mtl",
        AlignedMTL,
        params=AlignedMTLParams,
        description="Aligned-MTL (Senushkin et al. 2023): sum of gradients aligned to condition number 1",
    )
