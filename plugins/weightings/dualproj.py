"""DualProj: the mean gradient projected onto the dual cone of the task gradients.

The projection of GEM (Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual
Learning", NeurIPS 2017, eq. 11) applied to multi-task learning as in torchjd (Quinton &
Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232, 2024): the
update is the point of {d : g_k . d >= 0 for every k} closest to sum_k w_k g_k (w: the
preference weights, default 1/K, i.e. the mean gradient). It has a non-negative inner
product with every task gradient and equals the mean wherever the mean conflicts with none.

Solved exactly on the K x K Gram matrix: the projection is sum_k v_k g_k with
v = argmin_{v >= w} v^T M v (``_active_set.cone_projection``); ``solver = "device"``
solves it on the gradients' device, reading nothing back (``_cone_device``).
"""

from __future__ import annotations

from mtlkit.hookspecs import hookimpl

from ._active_set import cone_projection
from .upgrad import UPGrad, UPGradParams, preference


class DualProjParams(UPGradParams):
    pass


class DualProj(UPGrad):
    method = "dualproj"

    def device_rows(self):
        return preference(self.method, self.pref, self.task_names, self.all_tasks)[None, :]

    def coefficients(self, m, extra=None):
        w = preference(self.method, self.pref, self.task_names, self.all_tasks)
        return cone_projection(m, w, self.max_iter)


@hookimpl
def register_weightings(register):
    register(
        "dualproj",
        DualProj,
        params=DualProjParams,
        description="DualProj (GEM's projection, Lopez-Paz & Ranzato 2017): mean gradient projected onto the dual cone",
    )
