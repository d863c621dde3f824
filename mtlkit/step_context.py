"""The step context: what a weighting sees of one training step (its ``backward(ctx)`` and
``on_step_end(ctx)``, see :class:`mtlkit.contracts.Weighting`).

The engine runs the forward pass and the task losses, builds a :class:`StepContext`,
zeroes the gradients, calls ``weighting.backward(ctx)``, the optimiser step, then
``weighting.on_step_end(ctx)``. ``backward`` leaves each parameter's gradient in
``.grad`` (or None: the optimiser leaves that parameter alone). The context's methods are
the engine's building blocks, so that a weighting that owns its backward still gets
representation gradients, DDP averaging and resumable extra batches right:

- ``task_gradients(target)``: the K x N matrix of per-task gradients (tasks in
  ``task_names`` order), of the global batch under torchrun; optionally the
  task-specific parameters get ``sum_t w_t dL_t/dp`` in the same passes.
- ``set_gradient(vector, target)``: the combined gradient to the shared parameters
  (``params``) or through the shared trunk (``features``, one backward pass).
- ``backward_gradients(combine_grads)``: the whole default gradient-level backward.
- ``backward_loss(loss)``: a plain backward of one scalar.
- ``present_tasks()``: the tasks that take part in this step (see below).
- ``draw_batch(split)`` / ``losses_on(batch)``: an extra batch (``"train"`` or ``"val"``),
  drawn from a seed of (run seed, epoch, step, split, rank, draw): the same on resume;
  and the task losses of the current model on a batch (FAMO's after-update losses,
  Auto-Lambda's validation loss).

Under torchrun, after ``backward`` returns, the engine averages across ranks every
gradient that is not global already (the shared rows of ``task_gradients``/
``set_gradient`` are); a custom ``backward`` writes each rank's own gradients.

Tasks without a target
----------------------
A task with no valid target in the batch (every label ignored, every depth 0) has a zero
loss and a zero gradient row. It takes no part in the step: the default gradient-level
backward leaves it out of ``combine_grads``; a weighting that owns its backward (or keeps
per-task state) asks ``present_tasks`` and solves for those, leaves the others' state as
it was, takes no log of their zero loss, and with no task present leaves the shared
parameters without a gradient (None: momentum and weight decay do not move them either).
The log reports a left-out task's weight as 0. The decision is made on the global losses
(a loss of exactly 0), whose flags the engine copies to the host right after the forward
pass: asking waits for the forward pass, not for the backward passes queued after it.

Targets (``grad_target``)
-------------------------
``params``: rows are the gradients of the shared parameters (``shared_params``, flattened
in order). ``features``: rows are the gradients of the shared representation that every
task's branch reads (``representation``: batch x ... tensors, flattened and concatenated);
the network exposes it (``MultiTaskNetwork.representation``), the engine cuts the graph
there, so each per-task pass runs through the task's branch only, and the combined
vector is back-propagated once through the shared trunk. Shared parameters *after* the
representation (MTAN's shared f convs) are trained like task-specific ones, with the
gradient of ``combine(losses)``. Under torchrun the representation rows of all ranks are
gathered (rank blocks side by side, divided by the world size: the global batch's
matrix), so ``combine_grads`` sees exactly what one process on the global batch sees.
(The exchange is K x N per rank, N the representation's size; a Gram-only method could
exchange the K x K Gram pieces instead: not done, every method gets the same exact rows.)

Which target is cheaper depends on the network: ``features`` skips the trunk in the K
per-task passes, but its rows are as long as the representation, which for MTAN (every
tap's gate and feature, at full resolution) can exceed the parameter count: at 1/8 width
on 64x96 (the quickstart) N is 4x P and the attention branches, not the trunk, hold most
of the work, so the two targets cost about the same there (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

GRAD_TARGETS = ("params", "features")

CombineGrads = Callable[[Tensor, dict[str, Tensor]], Tensor]


class StepEngine(Protocol):
    """What the engine provides behind a :class:`StepContext` (see its methods)."""

    def draw_batch(self, ctx: "StepContext", split: str) -> Any: ...

    def losses_on(self, ctx: "StepContext", batch: Any) -> dict[str, Tensor]: ...

    def backward_loss(self, ctx: "StepContext", loss: Tensor) -> None: ...

    def task_gradients(self, ctx: "StepContext", target: str, private_weights: Any,
                       retain_graph: bool) -> Tensor: ...

    def global_losses(self, ctx: "StepContext") -> dict[str, Tensor]: ...

    def present_tasks(self, ctx: "StepContext",
                      losses: dict[str, Tensor] | None) -> list[str]: ...

    def set_gradient(self, ctx: "StepContext", combined: Tensor | None, target: str) -> None: ...

    def backward_gradients(self, ctx: "StepContext", combine_grads: CombineGrads, target: str) -> None: ...


@dataclass
class StepContext:
    """One training step as a weighting sees it.

    ``losses``: each task's loss of this step (graph attached; ``training.domain_loss_weight``
    applied); ``task_names``: the tasks of this step in the weighting's order (its keys);
    ``outputs``: the network's outputs; ``model``: the network as called (DDP-wrapped under
    torchrun), ``raw_model``: the network itself; ``shared_params``/``private_params``: the
    trainable parameters by :func:`mtlkit.contracts.split_parameters`; ``representation``:
    with ``grad_target = "features"``, the shared representation tensors the branches read
    (leaves that require grad), else None; ``batch``: the step's batch (many-to-many with
    ``domain_order = "mixed"``: ``{domain: batch}``); ``domains``: the step's domains
    (many-to-many) or None; ``optimizer``; ``step``: global step index (0 for the run's
    first); ``epoch`` (0-based); ``dist``: the :class:`mtlkit.engine.distributed.DistContext`;
    ``grad_target``: the weighting's target.
    """

    losses: dict[str, Tensor]
    task_names: list[str]
    outputs: dict[str, Tensor]
    model: nn.Module
    raw_model: nn.Module
    shared_params: list[nn.Parameter]
    private_params: list[nn.Parameter]
    representation: list[Tensor] | None
    batch: Any
    domains: list[str] | None
    optimizer: "torch.optim.Optimizer"
    step: int
    epoch: int
    dist: Any
    grad_target: str
    engine: StepEngine = field(repr=False)
    # engine bookkeeping: the trunk's tensors the representation was cut from (features);
    # ids of parameters whose .grad is global already (not averaged again)
    representation_sources: list[Tensor] | None = field(default=None, repr=False)
    global_grads: set[int] = field(default_factory=set, repr=False)

    def draw_batch(self, split: str = "val") -> Any:
        """An extra batch of ``split`` (``"train"`` or ``"val"``), shaped like ``batch``."""
        return self.engine.draw_batch(self, split)

    def losses_on(self, batch: Any) -> dict[str, Tensor]:
        """Task losses of the current model on ``batch`` (shaped like ``self.batch``). The
        model is in training mode: wrap the call in ``torch.no_grad()`` for values only
        (BatchNorm still counts the batch in its running statistics)."""
        return self.engine.losses_on(self, batch)

    def backward_loss(self, loss: Tensor) -> None:
        """Back-propagate one scalar into every parameter (the loss-level default)."""
        self.engine.backward_loss(self, loss)

    def task_gradients(self, target: str | None = None, private_weights: dict[str, Any] | None = None,
                       retain_graph: bool = False) -> Tensor:
        """K x N per-task gradients (rows: ``task_names``) of the global batch.

        ``private_weights`` (task -> coefficient): the task-specific parameters (and, for
        ``features``, shared parameters after the representation) get ``sum_t w_t dL_t/dp``
        in ``.grad``, from the same passes. ``retain_graph``: keep the graph for more passes.
        """
        return self.engine.task_gradients(self, target or self.grad_target, private_weights, retain_graph)

    def global_losses(self) -> dict[str, Tensor]:
        """The step's losses (detached) averaged over ranks: what the global batch gives."""
        return self.engine.global_losses(self)

    def present_tasks(self, losses: dict[str, Tensor] | None = None) -> list[str]:
        """The tasks of ``task_names`` (in order) that take part in this step: those whose
        global loss (``global_losses()``, or ``losses`` when given) is not 0; a task with
        no valid target in the batch has a zero loss (and a zero gradient). Global values,
        so every rank decides alike. The engine copies the step's flags to the host right
        after the forward pass, so asking waits for the forward pass only (other
        ``losses``: one read when asked). The step's log then shows ``weights()`` taken
        with ``task_names`` set to these tasks, the others at 0."""
        return self.engine.present_tasks(self, losses)

    def set_gradient(self, combined: Tensor | None, target: str | None = None) -> None:
        """Use ``combined`` (an N-vector of ``task_gradients``' space, None: no update) as
        the shared parameters' gradient, or back-propagate it through the shared trunk."""
        self.engine.set_gradient(self, combined, target or self.grad_target)

    def backward_gradients(self, combine_grads: CombineGrads, target: str | None = None) -> None:
        """The default gradient-level backward with ``combine_grads(grads, losses)``."""
        self.engine.backward_gradients(self, combine_grads, target or self.grad_target)


def to_device(values: Any, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """Host values (a list, or a CPU tensor such as an index drawn from a CPU generator) on
    ``device`` without making the host wait: a non-blocking copy (the driver stages a
    pageable source at once), where a blocking one first waits for every queued kernel."""
    t = values if isinstance(values, Tensor) else torch.tensor(values, dtype=dtype)
    return t.to(device=device, dtype=dtype or t.dtype, non_blocking=True)


def task_index(names: list[str], subset: list[str], device: torch.device) -> Tensor:
    """The positions in ``names`` of the tasks of ``subset``, in order, as an index on
    ``device`` (a Python list as an index is a blocking copy to the device)."""
    return to_device([names.index(t) for t in subset], device, torch.long)


def present_rows(grads: Tensor, names: list[str], present: list[str]) -> Tensor:
    """The rows of ``grads`` (one per task of ``names``) of the ``present`` tasks, in order."""
    if list(present) == list(names):
        return grads
    return grads[task_index(names, present, grads.device)]
