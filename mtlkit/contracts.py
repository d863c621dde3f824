"""The few interfaces every plugin of a kind honours.

Feature contract (backbones)
----------------------------
A backbone is an ``nn.Module`` with

- ``out_channels`` / ``out_stride``: channels and stride (input size / feature size) of the
  final feature map that ``forward(x)`` returns (what a "split" head reads);
- ``feature_info``: a list of :class:`Tap`, one per attention level, in execution order;
- ``forward_taps(x) -> (final, [(gate, feature), ...])``: the same final features plus,
  for each tap, the tensor an attention module reads (``gate``, ``gate_channels``
  channels) and the tensor it masks (``feature``, ``channels`` channels at ``stride``).

Taps have a ``role``. For an ``"encoder"`` tap, MTAN computes
``mask = a(cat(gate, previous_attention))`` (level 0: ``a(gate)``), multiplies it with
``feature``, applies the shared f conv (``channels -> channels of the next tap``) and, if
``pool_after``, a 2x2 max pool. For a ``"decoder"`` tap it upsamples the previous attention
output to ``feature``'s size (bilinear, align_corners=True), applies the shared f conv
(``previous channels -> channels``), concatenates ``gate`` and takes the mask from that.
SegNet: 5 encoder + 5 decoder taps (gate = a stage's first conv output, or the decoder
stage's unpooled input); WRN: 4 encoder taps (gate = feature = the group output).

Backbones that can run stage by stage (needed by ``cross_stitch`` and ``dense``) also
implement :class:`StagedBackbone`.

Data samples
------------
A data set yields dicts: ``"image"`` (float CHW tensor) plus one entry per target, keyed by
the task's ``target`` (defaults: ``"segmentation"`` long HW with -1 = ignore, ``"depth"``
1HW float with 0 = invalid, ``"normal"`` 3HW float with a zero vector = invalid, ``"label"``
long scalar for classification). Collated batches keep the same keys. A data set whose first
sample is slow to make may list its samples' keys in a ``sample_keys`` attribute: the check
before training (:func:`mtlkit.engine.checks.check_samples`) then reads that instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Literal

import torch
from torch import Tensor, nn

from .sharing import PRIVATE_CONTAINERS, module_owners, split_parameters  # noqa: F401  (the one rule)

if TYPE_CHECKING:  # pragma: no cover
    from .step_context import StepContext


@dataclass(frozen=True)
class Tap:
    """One attention level of the feature contract (see the module docstring)."""

    name: str
    channels: int
    gate_channels: int
    stride: int
    role: Literal["encoder", "decoder"] = "encoder"
    pool_after: bool = False


class Backbone(nn.Module):
    """Base class for backbones (subclasses set the attributes in ``__init__``)."""

    out_channels: int
    out_stride: int
    feature_info: list[Tap]

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        return self.forward_taps(x)[0]

    def forward_taps(self, x: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:  # pragma: no cover
        raise NotImplementedError


class StagedBackbone(Backbone):
    """A backbone that runs as ``num_stages`` steps sharing a ``state`` dict (pool indices...).

    ``forward`` equals ``run_stage(num_stages-1, ... run_stage(0, x, state) ...)``.
    ``stage_out_channels[i]`` is the channel count after stage ``i``. ``stage_roles[i]`` is
    ``"encoder"`` or ``"decoder"``. Cross-stitch mixes stage outputs; dense feeds them in.
    """

    num_stages: int
    stage_out_channels: list[int]
    stage_roles: list[str]

    def run_stage(self, index: int, x: Tensor, state: dict[str, Any]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def run_stages(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """All stages in turn: (final output, every stage's output)."""
        state: dict[str, Any] = {}
        outputs = []
        for i in range(self.num_stages):
            x = self.run_stage(i, x, state)
            outputs.append(x)
        return x, outputs

    def stage_output_taps(self, x: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Taps whose gate and feature are both a stage's output (WRN, ResNet styles)."""
        final, outputs = self.run_stages(x)
        return final, [(o, o) for o in outputs]

    # Defaults for backbones whose taps are their stage outputs; SegNet overrides both.
    def forward(self, x: Tensor) -> Tensor:
        return self.run_stages(x)[0]

    def forward_taps(self, x: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        return self.stage_output_taps(x)


class Task:
    """A task: its loss, its output format and a factory of whole-split metric state.

    Attributes: ``name`` (the key in the recipe and in model outputs), ``target`` (the key
    in data samples), ``out_channels`` (what the head must produce), ``output_activation``
    (``"identity"``, ``"log_softmax"`` or ``"l2_normalize"``: applied to the head's raw
    output by the build path, see :class:`OutputActivation`).
    """

    name: str
    target: str
    out_channels: int
    output_activation: str = "identity"
    default_head: str = "dense_pred"  # the head plugin a recipe gets when it names none

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def metrics(self) -> "MetricState":  # pragma: no cover
        raise NotImplementedError


class MetricState:
    """Whole-split metric accumulator whose state is a dict of sum-reducible tensors.

    ``update`` adds a batch; ``state`` holds only tensors that are correct to *sum* across
    batches and DDP ranks (confusion matrices, pixel counts, histograms), so distributed
    evaluation all-reduces ``state`` and calls ``compute``. ``higher_is_better`` maps each
    metric name ``compute`` returns to its direction. ``update`` keeps ``state`` on the
    predictions' device (:meth:`state_on`) and reads no value back (each waits for the device).
    """

    higher_is_better: ClassVar[dict[str, bool]] = {}

    def __init__(self) -> None:
        self.state: dict[str, Tensor] = {}

    def update(self, prediction: Tensor, target: Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    def compute(self) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def batch_mean(total: Tensor, n: Tensor) -> Tensor:
        """``total / n``, a batch's mean over its ``n`` valid pixels, in float64; 0 for a
        batch with none (the per-batch protocols skip it), without reading ``n`` back."""
        return (n > 0).double() * total / n.clamp_min(1)

    def state_on(self, device: torch.device) -> dict[str, Tensor]:
        """``state``, moved to ``device`` the first time (a no-op afterwards; a
        non-blocking copy, which does not wait for the device's queue)."""
        if any(v.device != device for v in self.state.values()):
            self.state = {k: v.to(device, non_blocking=True) for k, v in self.state.items()}
        return self.state

    def merge(self, other: "MetricState") -> None:
        for key, value in other.state.items():
            self.state[key] = self.state[key] + value.to(self.state[key].device)


OUTPUT_ACTIVATIONS = ("identity", "log_softmax", "l2_normalize")


def apply_activation(name: str, x: Tensor) -> Tensor:
    if name == "identity":
        return x
    if name == "log_softmax":
        return torch.log_softmax(x, dim=1)
    if name == "l2_normalize":
        return x / x.norm(p=2, dim=1, keepdim=True).clamp_min(1e-12)
    raise ValueError(f"unknown output activation '{name}' (known: {', '.join(OUTPUT_ACTIVATIONS)})")


class OutputActivation:
    """Forward hook that applies a task's output activation to its head's raw output.

    Heads return raw scores; the build path (:meth:`mtlkit.registry.Component.build`)
    attaches this hook to every head, so no head can forget the activation its task's
    loss expects. The three activations are idempotent (log-softmax of log-probabilities
    and normalisation of unit vectors change nothing), so a head that applies it itself
    still gives the right output.
    """

    def __init__(self, name: str) -> None:
        if name not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"unknown output activation '{name}' (known: {', '.join(OUTPUT_ACTIVATIONS)})")
        self.name = name

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return apply_activation(self.name, output)


def attach_output_activation(head: nn.Module, task: "Task") -> nn.Module:
    """Make ``head``'s output the one ``task`` expects (see :class:`OutputActivation`)."""
    name = getattr(task, "output_activation", "identity")
    hook = OutputActivation(name)
    if name != "identity" and isinstance(head, nn.Module):
        head.register_forward_hook(hook)
    return head


RepresentationHook = Callable[[list[Tensor]], list[Tensor]]


class MultiTaskNetwork(nn.Module):
    """What an attention plugin returns.

    ``forward(x, tasks=None) -> {task: output}``: ``tasks`` selects which tasks' branches
    run (``None``: all). In the many-to-many setting the engine passes the one active
    domain, and only that branch runs.

    Shared representation (``grad_target = "features"``): a network that sets
    ``representation`` (a one-line description of what it exposes) accepts
    ``forward(x, tasks=None, representation_hook=None)``. It calls the hook once per
    forward with the list of tensors its shared trunk produces and every requested
    task's branch reads (nothing else of the trunk may reach a branch), and continues with
    the tensors the hook returns (same shapes) in their place; :func:`expose` does this
    for a list with repeats. ``representation = None``: the network exposes none.
    """

    task_names: list[str]
    representation: ClassVar[str | None] = None

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters shared by several tasks (what gradient-level weightings combine):
        the shared half of :func:`split_parameters`."""
        yield from split_parameters(self)[0]

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters used by ``task`` alone (see :func:`split_parameters`)."""
        yield from split_parameters(self)[1].get(task, [])


def expose(hook: RepresentationHook | None, tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` through a representation hook (None: unchanged). A tensor listed twice
    (e.g. an MTAN tap whose gate is its feature) goes to the hook once and comes back as
    the same replacement at each place."""
    if hook is None:
        return tensors
    unique: dict[int, int] = {}
    for t in tensors:
        unique.setdefault(id(t), len(unique))
    firsts = list({id(t): t for t in tensors}.values())
    out = hook(firsts)
    if len(out) != len(firsts) or any(a.shape != b.shape for a, b in zip(out, firsts)):
        raise RuntimeError("representation hook: must return one tensor of the same shape per input")
    return [out[unique[id(t)]] for t in tensors]


class Weighting(nn.Module):
    """Turns per-task losses (and, if asked, per-task gradients) into one update.

    The step contract: the engine runs the forward pass and the task losses, zeroes the
    gradients and calls ``backward(ctx)`` with a :class:`mtlkit.step_context.StepContext`
    (losses, model, shared/private parameters, the shared representation, the batch,
    optimiser, step, epoch, DDP context, and ``draw_batch(split)`` for an extra batch);
    then the optimiser step, then ``on_step_end(ctx)``. A weighting owns its backward by
    overriding ``backward``; the default is one of two levels, by ``requires_grads``:

      - ``None``: loss-level. ``ctx.backward_loss(combine(losses))``: one backward pass.
      - ``"shared"``: gradient-level. ``ctx.backward_gradients(combine_grads)``: each
        task's gradient (K passes, or one batched pass), flattened into the rows of
        ``grads`` (K x N, tasks in ``task_names`` order), averaged (params) or gathered
        (features) across ranks; ``combine_grads(grads, losses)`` returns the N-vector
        used as the update; task-specific parameters get the gradient of
        ``combine(losses)``, taken inside the same per-task passes (as
        ``sum_t dcombine/dL_t * dL_t/dp``). Tasks whose loss is 0 (no valid target in
        the batch, so a zero row too) are left out of the call (``task_names`` lists the
        present ones).

    ``grad_target`` (gradient-level): ``"params"`` (rows are gradients of the shared
    parameters) or ``"features"`` (rows are gradients of the shared representation the
    network exposes; the combined vector is back-propagated once through the trunk);
    ``grad_targets`` lists the targets the method supports (every Gram-based method:
    both), and its params model offers a ``grad_target`` setting when it supports more
    than ``params``. See :mod:`mtlkit.step_context` for the details, DDP included.

    Epoch hooks see mean unweighted training losses per task. ``get_state``/``set_state``
    carry JSON state (e.g. DWA's history) through checkpoints; tensor parameters (e.g.
    uncertainty's log-variances) live in ``parameters()`` and are trained by the
    engine's optimiser and saved with the model.
    """

    requires_grads: ClassVar[str | None] = None
    grad_targets: ClassVar[tuple[str, ...]] = ("params",)
    grad_target: str = "params"
    present_only: ClassVar[bool] = False
    # Values one training step of this method reads back from the device (``item``,
    # ``tolist``, ``float()``, ``cpu()``...): each waits for every queued kernel, so 0 keeps
    # an accelerator busy. A method with a host-side solver reads once (its K x K Gram);
    # tests/test_weightings_reads.py counts it on every registered weighting.
    host_reads_per_step: ClassVar[int] = 0
    # Whether a step of this method launches the same kernels every step within an epoch,
    # with no host read and no host-side state that changes from step to step: then
    # ``training.cuda_graph`` may record the step once and replay it (engine/graph_step.py).
    graph_safe: ClassVar[bool] = False

    def __init__(self, task_names: list[str]) -> None:
        super().__init__()
        self.task_names = list(task_names)

    def combine(self, losses: dict[str, Tensor]) -> Tensor:
        return sum(losses[t] for t in self.task_names if t in losses)

    def combine_grads(self, grads: Tensor, losses: dict[str, Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def backward(self, ctx: "StepContext") -> None:
        """Leave this step's gradients in ``.grad`` (default: by ``requires_grads``)."""
        if self.requires_grads is None and self.present_only:
            present = ctx.present_tasks()
            if present:  # none: no gradient at all, the optimiser leaves everything alone
                ctx.backward_loss(self.combine({t: ctx.losses[t] for t in present}))
        elif self.requires_grads is None:
            ctx.backward_loss(self.combine(ctx.losses))
        else:
            ctx.backward_gradients(self.combine_grads)

    def on_step_end(self, ctx: "StepContext") -> None:
        """After the optimiser step (e.g. FAMO's look at the losses after the update)."""

    def weights(self) -> dict[str, float]:
        """The current per-task weights (for logs); gradient methods may return {}."""
        return {t: 1.0 for t in self.task_names}

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def on_epoch_end(self, epoch: int, mean_losses: dict[str, float]) -> None:
        pass

    def get_state(self) -> dict[str, Any]:
        return {}

    def set_state(self, state: dict[str, Any]) -> None:
        pass


def activate_task(module: nn.Module, task: str) -> None:
    """Switch every submodule with task/domain-specific layers to ``task``.

    Backbones with domain-specific layers (BatchNorm, adapters; many-to-many setting) give
    those layers a ``set_active_task(name)`` method; attention plugins call this before a
    forward pass that runs exactly one task.
    """
    for sub in module.modules():
        setter = getattr(sub, "set_active_task", None)
        if setter is not None:
            setter(task)
