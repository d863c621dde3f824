"""IMTL-G: impartial gradient aggregation (Liu et al., ICLR 2021), closed form.

Find weights alpha (summing to 1) so that g = sum_k alpha_k g_k has the same projection on
every unit task gradient u_k = g_k / |g_k|. The paper writes the answer as
alpha_{2..K} = g_1 U^T (D U^T)^{-1} with differences D = [g_1 - g_k], U = [u_1 - u_k]; its
matrix D U^T mixes the gradients' norms, and at a 1e6 spread of norms it loses digits.

The same conditions in the normalised space: with n_k = |g_k|, z = n * alpha and the
correlation matrix C = G G^T / (n n^T), g = sum_k z_k u_k and u_k . g = (C z)_k, so the
equal projections read C z = lambda 1: z is proportional to C^{-1} 1, and alpha = z / n
rescaled to sum 1. C has a unit diagonal whatever the norms.

``solver = "device"``: the same minimum-norm solve on the device (``imtl_g_device``), C's
pseudo-inverse from a Jacobi eigendecomposition (``_linalg_device``), with no read.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtlkit.hookspecs import hookimpl

from ._common import GramWeighting, gram_norms
from ._linalg_device import EPS64, JacobiSolverParams, pinv_solve


class IMTLGParams(JacobiSolverParams):
    """The gradient target and the solver (exact on the host, or on the device)."""


def imtl_g_weights(m: np.ndarray) -> np.ndarray:
    """IMTL-G's alpha from the Gram matrix M (float64)."""
    k = m.shape[0]
    norms = gram_norms(m)
    live = norms > 0
    if not live.any():  # all gradients are zero: any weights give the same (zero) update
        return np.full(k, 1.0 / k)
    # a zero gradient has no direction to be impartial to: it gets no weight
    nl = norms[live]
    corr = m[np.ix_(live, live)] / np.outer(nl, nl)
    # least squares (minimum norm, LAPACK's gelsd) instead of an inverse: equal or parallel
    # gradients make C singular, and then the shortest z shares the weight equally among them
    z = np.linalg.lstsq(corr, np.ones(len(nl)), rcond=None)[0]
    a = z / nl
    if not abs(float(a.sum())) > 0:  # no normalisable solution: fall back to the mean
        return np.full(k, 1.0 / k)
    alpha = np.zeros(k)
    alpha[live] = a / a.sum()
    return alpha


def imtl_g_device(m: Tensor, sweeps: int) -> Tensor:
    """``imtl_g_weights`` on the device (no read): zero gradients masked out instead of
    dropped (their rows of C are 0, so the minimum-norm z leaves them 0), C^+ 1 by
    ``pinv_solve`` with gelsd's cutoff over the live tasks, the fallbacks by ``where``."""
    k = m.shape[0]
    norms = m.diagonal().clamp_min(0.0).sqrt()
    live = norms > 0
    safe = torch.where(live, norms, 1.0)
    both = live[:, None] & live[None, :]
    corr = torch.where(both, m / (safe[:, None] * safe[None, :]), 0.0)
    z = pinv_solve(corr, live.to(m.dtype), sweeps, rcond=EPS64 * live.sum())
    a = z / safe
    total = a.sum()
    ok = live.any() & (total.abs() > 0)
    return torch.where(ok, a / torch.where(ok, total, 1.0), 1.0 / k)


class IMTLG(GramWeighting):
    method = "imtl_g"
    # host_reads_per_step = 1 (GramWeighting's): the minimum-norm least-squares solve must
    # hold for a singular C (identical gradients share the weight). On CUDA torch.linalg.lstsq
    # has only the "gels" driver, which assumes full rank, and pinv / svd / eigh synchronise
    # with the host to check LAPACK's error flag (solve_ex does not, but fails on a singular
    # C): so the exact K x K solve runs in numpy after the one read of the Gram matrix, and
    # solver = "device" (no read) diagonalises C by Jacobi rotations (_linalg_device).

    def __init__(self, params: IMTLGParams, task_names: list[str]) -> None:
        super().__init__(task_names, params.grad_target)
        self.sweeps = params.sweeps
        self.use_solver(params.solver)  # "device": no read (imtl_g_device)

    def coefficients(self, m, extra=None):
        return imtl_g_weights(m)

    def device_coefficients(self, m, losses):
        return imtl_g_device(m, self.sweeps)


@hookimpl
def register_weightings(register):
    register(
        "imtl_g",
        IMTLG,
        params=IMTLGParams,
        description="IMTL-G (Liu et al. 2021): equal projection of the update on every task gradient",
    )
