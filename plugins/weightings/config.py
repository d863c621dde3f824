"""ConFIG: conflict-free gradients (Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free
Training of Physics Informed Neural Networks", ICLR 2025).

The direction is the unit vector g_u along U^+ w, where U holds the unit task gradients
u_k = g_k / |g_k| as rows and w the preference weights (default all 1): the least-norm
vector with u_k . x = w_k for every k, so that with equal weights the update makes the
same positive cosine with every task gradient. Its length is the sum of the gradients'
projections on it: d = (sum_k g_k . g_u) g_u.

On the Gram matrix: with C = M / (n n^T) the unit gradients' Gram matrix, U^+ w =
sum_k z_k u_k for z = C^+ w (least squares, minimum norm: duplicated gradients share),
|U^+ w|^2 = z^T C z and g_k . g_u = n_k (C z)_k / |U^+ w|.

``solver = "device"``: the same on the device (``config_device``), C^+ w from a Jacobi
eigendecomposition (``_linalg_device``), with no read.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtlkit.hookspecs import hookimpl
from mtlkit.step_context import to_device

from ._common import GramWeighting, gram_norms
from ._linalg_device import EPS64, JacobiSolverParams, pinv_solve
from .upgrad import preference


class ConFIGParams(JacobiSolverParams):
    weights: list[float] | None = None  # preference weights w, one per task (None: all 1)


def config_coefficients(m: np.ndarray, w: np.ndarray) -> np.ndarray:
    k = m.shape[0]
    n = gram_norms(m)
    live = np.flatnonzero(n > 0)
    coef = np.zeros(k)
    if live.size == 0:
        return coef
    nl = n[live]
    c = m[np.ix_(live, live)] / np.outer(nl, nl)
    z = np.linalg.lstsq(c, w[live], rcond=None)[0]
    sq = float(z @ c @ z)
    if not sq > 0:
        return coef
    length = float(nl @ (c @ z)) / np.sqrt(sq)  # sum_k g_k . g_u
    coef[live] = length / np.sqrt(sq) * z / nl
    return coef


def config_device(m: Tensor, w: Tensor, sweeps: int) -> Tensor:
    """``config_coefficients`` on the device (no read): zero gradients masked out (their
    rows of C are 0, their z stays 0), C^+ w by ``pinv_solve`` with gelsd's cutoff over the
    live tasks, no update (zeros) where z^T C z is not positive."""
    n = m.diagonal().clamp_min(0.0).sqrt()
    live = n > 0
    safe = torch.where(live, n, 1.0)
    c = torch.where(live[:, None] & live[None, :], m / (safe[:, None] * safe[None, :]), 0.0)
    z = pinv_solve(c, torch.where(live, w, 0.0), sweeps, rcond=EPS64 * live.sum())
    cz = c @ z
    sq = z @ cz
    ok = sq > 0
    root = torch.where(ok, sq, 1.0).sqrt()
    length = (n @ cz) / root  # sum_k g_k . g_u
    return torch.where(ok, length / root * z / safe, 0.0)


class ConFIG(GramWeighting):
    method = "config"
    # host_reads_per_step = 1 (GramWeighting's): C^+ w is a minimum-norm least-squares
    # solve that must hold for a singular C (duplicated gradients share). On CUDA torch
    # offers only lstsq's "gels" (full rank assumed), and pinv / svd / eigh synchronise
    # with the host to check LAPACK's error flag: a device version built on them would
    # wait as long and change the singular case, so the exact solver runs in numpy (gelsd);
    # solver = "device" (no read) diagonalises C by Jacobi rotations (_linalg_device).

    def __init__(self, params: ConFIGParams, task_names: list[str]) -> None:
        super().__init__(task_names, params.grad_target)
        self.all_tasks = list(self.task_names)
        self.pref = params.weights
        if self.pref is not None:
            preference(self.method, self.pref, self.all_tasks, self.all_tasks)
        self.sweeps = params.sweeps
        self.use_solver(params.solver)

    def preference_weights(self) -> np.ndarray:
        """w for the tasks in task_names (all 1 by default)."""
        return (np.ones(len(self.task_names)) if self.pref is None
                else preference(self.method, self.pref, self.task_names, self.all_tasks))

    def coefficients(self, m, extra=None):
        return config_coefficients(m, self.preference_weights())

    def device_coefficients(self, m, losses):
        w = to_device(self.preference_weights(), m.device, torch.float64)  # host constants: no wait
        return config_device(m, w, self.sweeps)


@hookimpl
def register_weightings(register):
    register(
        "config",
        ConFIG,
        params=ConFIGParams,
        description="ConFIG (Liu et al. 2025): equal cosine with every task gradient, length = sum of projections",
    )
