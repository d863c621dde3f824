"""Per-step values kept on the device and read back once per log interval.

A value read back from an accelerator (``float(loss)``, ``.item()``, ``.tolist()``) waits
for every queued kernel: one per step and task stalls the pipeline each step. The step
therefore hands its losses (and any weight the weighting left as a tensor) over as
device tensors; :class:`StepValues` stacks them into one float64 vector per step (float64
holds float32 and bfloat16 values exactly) and :meth:`StepValues.read` fetches all
pending steps with one ``tolist()``. That is also where non-finite losses are found:
the error names the first bad step and task, as a check after every step would.

Under torchrun the same read agrees across ranks, in one all-reduce, on non-finite losses
and on a stop request (Ctrl-C / SIGTERM on any rank), so every rank raises or stops at the
same step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import distributed as D


@dataclass
class _Step:
    record: dict[str, Any]  # the host-side fields of the step's log record
    losses: list[str]  # task names, in the order of the device vector
    device_weights: list[str]  # weight keys whose values follow the losses in that vector
    weights: dict[str, Any] = field(default_factory=dict)  # every weight (host values filled at read)


class StepValues:
    """Pending steps: ``add`` after each step, ``read`` once per interval."""

    def __init__(self, ctx: D.DistContext) -> None:
        self.ctx = ctx
        self._rows: list[Tensor] = []
        self._steps: list[_Step] = []

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, record: dict[str, Any], losses: dict[str, Tensor], weights: dict[str, Any]) -> None:
        """Queue one step: ``record`` (host fields), ``losses`` and ``weights`` (tensors stay put)."""
        on_device = [k for k, v in weights.items() if isinstance(v, Tensor)]
        parts = [v.detach().reshape(()) for v in losses.values()] + [weights[k].detach().reshape(()) for k in on_device]
        if parts:
            # stack copies: a weighting may update its weight tensors in place next step
            same = all(p.dtype == parts[0].dtype and p.device == parts[0].device for p in parts)
            row = (torch.stack(parts).to(torch.float64) if same
                   else torch.stack([p.to(parts[0].device, torch.float64) for p in parts]))
            self._rows.append(row)
        host = {k: (None if k in on_device else float(v)) for k, v in weights.items()}
        self._steps.append(_Step(record, list(losses), on_device, host))

    def read(self, stop: bool = False) -> tuple[list[dict[str, Any]], bool, str | None]:
        """``(records, stop, error)`` for the pending steps, which are then cleared.

        ``records``: one log record per step ("losses" and "weights" as floats), up to the
        step before the first non-finite loss; ``stop``: whether any rank asked to stop;
        ``error``: the message naming the first non-finite loss, or None.
        """
        steps, rows = self._steps, self._rows
        self._steps, self._rows = [], []
        # the interval's one read from the device (a no-op when nothing is pending)
        flat = torch.cat([r.to(rows[0].device) for r in rows]).tolist() if rows else []
        records, bad, k = [], [], 0
        for s in steps:
            losses = dict(zip(s.losses, flat[k:k + len(s.losses)]))
            k += len(s.losses)
            s.weights.update(zip(s.device_weights, flat[k:k + len(s.device_weights)]))
            k += len(s.device_weights)
            records.append({**s.record, "losses": losses, "weights": s.weights})
            bad += [not math.isfinite(v) for v in losses.values()]
        if self.ctx.enabled:  # one collective: every rank stops, or raises, at the same step
            agreed = D.all_reduce_sum(torch.tensor([float(stop)] + [float(b) for b in bad]), self.ctx).tolist()
            stop, bad = agreed[0] > 0, [v > 0 for v in agreed[1:]]
        if not any(bad):
            return records, stop, None
        first = bad.index(True)
        for n, rec in enumerate(records):
            if first < len(rec["losses"]):
                task = list(rec["losses"])[first]
                error = (f"task '{task}': loss is {rec['losses'][task]} at epoch {rec['epoch']} step {rec['step']} "
                         f"(global step {rec['global_step']})")  # the trainer adds what is kept
                return records[:n], stop, error
            first -= len(rec["losses"])
        raise AssertionError("unreachable: a bad flag beyond the pending losses")
