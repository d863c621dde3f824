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

``solver = "device"``: the eigendecomposition by Jacobi rotations on the device
(``_linalg_device.sym_eig``), the rank cut and the scale choice by masks (no read).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mtlkit.hookspecs import hookimpl

from ._common import GramWeighting
from ._linalg_device import JacobiSolverParams, sym_eig

EPS32 = float(np.finfo(np.float32).eps)


class AlignedMTLParams(JacobiSolverParams):
    scale: Literal["min", "median", "rmse"] = "min"  # s^2: smallest, median or mean kept eigenvalue


def alignment_matrix(m: np.ndarray, scale: str = "min") -> np.ndarray:
    """B with B M B = s^2 (projector onto M's range), from the Gram matrix M."""
    k = m.shape[0]
    lam, vec = np.linalg.eigh(m)
    top = float(lam.max()) if k else 0.0
    if not top > 0:  # every gradient is zero: nothing to align
        return np.zeros((k, k))
    keep = lam > top * k * EPS32
    lam, vec = lam[keep], vec[:, keep]
    if scale == "min":
        s2 = float(lam.min())
    elif scale == "median":
        s2 = float(np.sort(lam)[(len(lam) - 1) // 2])
    else:
        s2 = float(lam.mean())
    return np.sqrt(s2) * (vec / np.sqrt(lam)) @ vec.T


def alignment_device(m: Tensor, scale: str, sweeps: int) -> Tensor:
    """B 1 (``alignment_matrix(m, scale).sum(0)``) on the device, with no read: the kept
    eigenvalues a mask, the lower median the ((r - 1) // 2)-th smallest of the r kept ones
    (the r largest of the sorted eigenvalues), zeros when every gradient is zero."""
    k = m.shape[0]
    lam, vec = sym_eig(m, sweeps)
    top = lam.max()
    ok = top > 0
    keep = lam > top * k * EPS32
    r = keep.sum()
    if scale == "min":
        s2 = torch.where(keep, lam, torch.inf).min()
    elif scale == "median":
        s2 = torch.sort(lam).values.gather(0, (k - r + (r - 1) // 2).clamp(0, k - 1).reshape(1))[0]
    else:
        s2 = torch.where(keep, lam, 0.0).sum() / r.clamp_min(1)
    s2 = torch.where(ok, s2, 1.0)
    inv_root = torch.where(keep, torch.where(keep, lam, 1.0).rsqrt(), 0.0)
    coef = s2.sqrt() * ((vec * inv_root) @ vec.T).sum(0)
    return torch.where(ok, coef, 0.0)


class AlignedMTL(GramWeighting):
    method = "aligned_mtl"
    initial_coefficient = 1.0
    # host_reads_per_step = 1 (GramWeighting's): the eigendecomposition. On CUDA
    # torch.linalg.eigh synchronises with the host (it reads LAPACK's error flag; there is
    # no eigh_ex), so a device version built on it would wait as long as this one read of
    # the Gram matrix; the exact solver runs in numpy, and solver = "device" (no read)
    # diagonalises M by Jacobi rotations (_linalg_device).

    def __init__(self, params: AlignedMTLParams, task_names: list[str]) -> None:
        super().__init__(task_names, params.grad_target)
        self.scale = params.scale
        self.sweeps = params.sweeps
        self.use_solver(params.solver)

    def coefficients(self, m, extra=None):
        return alignment_matrix(m, self.scale).sum(0)

    def device_coefficients(self, m, losses):
        return alignment_device(m, self.scale, self.sweeps)


@hookimpl
def register_weightings(register):
    register(
        "aligned_mtl",
        AlignedMTL,
        params=AlignedMTLParams,
        description="Aligned-MTL (Senushkin et al. 2023): sum of gradients aligned to condition number 1",
    )
