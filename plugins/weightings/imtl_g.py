"""IMTL-G: impartial gradient aggregation (Liu et al., ICLR 2021), closed form.

Find weights alpha (summing to 1) so that g = sum_k alpha_k g_k has the same projection on
every unit task gradient u_k = g_k / |g_k|. With D = [g_1 - g_k]_{k>1} and U = [u_1 - u_k]_{k>1}
(rows), alpha_{2..K} = g_1 U^T (D U^T)^{-1} and alpha_1 = 1 - sum alpha_{2..K}. Every product
above is a dot product of task gradients, so it is computed from the K x K Gram matrix.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from mtlkit.hookspecs import hookimpl

from ._common import GramWeighting


class IMTLGParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def imtl_g_weights(m: torch.Tensor) -> torch.Tensor:
    """IMTL-G's alpha from the Gram matrix M (float64)."""
    norms = torch.sqrt(torch.diagonal(m).clamp_min(0.0))
    # a zero gradient has no direction: give it u_k = 0 instead of dividing by zero
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    a = m / norms[None, :]  # a[i, j] = g_i . u_j
    gu = a[0, 0] - a[0, 1:]  # g_1 . (u_1 - u_j)
    du = a[0, 0] - a[0, 1:][None, :] - a[1:, 0][:, None] + a[1:, 1:]  # (g_1 - g_i) . (u_1 - u_j)
    # least squares instead of an inverse: parallel or equal gradients make D U^T singular
    rest = torch.linalg.lstsq(du.T, gu[:, None], driver="gelsd").solution[:, 0]
    return torch.cat([(1.0 - rest.sum()).reshape(1), rest])


class IMTLG(GramWeighting):
    method = "imtl_g"

    def __init__(self, params: IMTLGParams, task_names: list[str]) -> None:
        super().__init__(task_names)

    def coefficients(self, m, losses=None):
        return imtl_g_weights(m)


@hookimpl
def register_weightings(register):
    register(
        "imtl_g",
        IMTLG,
        params=IMTLGParams,
        description="IMTL-G (Liu et al. 2021): equal projection of the update on every task gradient",
    )
