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
"""

from __future__ import annotations

import numpy as np

from mtlkit.hookspecs import hookimpl

from ._common import GradTargetParams, GramWeighting
from .upgrad import preference


class ConFIGParams(GradTargetParams):
    weights: list[float] | None = None  # preference weights w, one per task (None: all 1)


def config_coefficients(m: np.ndarray, w: np.ndarray) -> np.ndarray:
    k = m.shape[0]
    n = np.sqrt(np.maximum(np.diag(m), 0.0))
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


class ConFIG(GramWeighting):
    method = "config"
    # host_reads_per_step = 1 (GramWeighting's): C^+ w is a minimum-norm least-squares
    # solve that must hold for a singular C (duplicated gradients share). On CUDA torch
    # offers only lstsq's "gels" (full rank assumed), and pinv / svd / eigh synchronise
    # with the host to check LAPACK's error flag: a device version would wait as long
    # and change the singular case, so it solves in numpy (gelsd, as before).

    def __init__(self, params: ConFIGParams, task_names: list[str]) -> None:
        super().__init__(task_names, params.grad_target)
        self.all_tasks = list(self.task_names)
        self.pref = params.weights
        if self.pref is not None:
            preference(self.method, self.pref, self.all_tasks, self.all_tasks)

    def coefficients(self, m, extra=None):
        w = (np.ones(len(self.task_names)) if self.pref is None
             else preference(self.method, self.pref, self.task_names, self.all_tasks))
        return config_coefficients(m, w)


@hookimpl
def register_weightings(register):
    register(
        "config",
        ConFIG,
        params=ConFIGParams,
        description="ConFIG (Liu et al. 2025): equal cosine with every task gradient, length = sum of projections",
    )
