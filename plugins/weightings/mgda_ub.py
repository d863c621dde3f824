"""MGDA-UB (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS
2018, section 3.3): MGDA on the gradients of the shared representation Z instead of the
shared parameters. The min-norm weights of the task gradients grad_Z L_k minimise an upper
bound of MGDA's objective (|grad_theta L(a)| <= |dZ/dtheta| |grad_Z L(a)|), and need one
backward pass through the shared trunk instead of K.

The same solver and settings as ``mgda`` (exact min-norm point, optional gradient
normalisation), with ``grad_target`` fixed to ``"features"``: the network must expose its
representation (Split, MTAN do).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mtlkit.hookspecs import hookimpl

from .mgda import MGDA, MGDAParams


class MGDAUBParams(MGDAParams):
    grad_target: Literal["features"] = Field(
        "features", description="MGDA-UB works on the shared representation's gradients (features only).")


class MGDAUB(MGDA):
    method = "mgda_ub"
    grad_targets = ("features",)


@hookimpl
def register_weightings(register):
    register(
        "mgda_ub",
        MGDAUB,
        params=MGDAUBParams,
        description="MGDA-UB (Sener & Koltun 2018): MGDA on the shared representation's gradients",
    )
