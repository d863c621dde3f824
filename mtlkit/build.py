"""Builders: recipe (or Python arguments) -> model, tasks, data, weighting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from .contracts import MultiTaskNetwork, Task, Weighting
from .errors import ConfigError, DataError, MtlkitError, TrainingError
from .plugin_manager import get_registry
from .recipe.schema import ComponentRef, Recipe

RefLike = str | tuple[str, Mapping[str, Any]] | ComponentRef | Mapping[str, Any]


def as_ref(value: RefLike, where: str) -> ComponentRef:
    """Accept 'name', ('name', {params}), {'name':..., 'params':...} or a ComponentRef."""
    if isinstance(value, ComponentRef):
        return value
    if isinstance(value, str):
        return ComponentRef(name=value)
    if isinstance(value, tuple) and len(value) == 2:
        return ComponentRef(name=value[0], params=dict(value[1]))
    if isinstance(value, Mapping):
        return ComponentRef.model_validate(dict(value))
    raise ConfigError(f"{where}: expected a component name, (name, params) or {{name, params}}, got {value!r}")


def build_component(kind: str, ref: ComponentRef, where: str, **context: Any) -> Any:
    """The registered ``kind`` named by ``ref``, built by :meth:`Component.build` (the one
    build path); ``where`` is its recipe table, named in errors."""
    return get_registry().get(kind, ref.name).build(ref.params, where=where, **context)


def build_tasks(tasks: Mapping[str, RefLike | Task]) -> dict[str, Task]:
    out = {}
    for name, spec in tasks.items():
        if isinstance(spec, Task):
            out[name] = spec
        else:
            out[name] = build_component("task", as_ref(spec, f"tasks.{name}"), f"tasks.{name}", name=name)
    return out


def compose(
    backbone: RefLike,
    tasks: Mapping[str, RefLike | Task],
    attention: RefLike = "split",
    head: RefLike | None = None,
    heads: Mapping[str, RefLike] | None = None,
) -> MultiTaskNetwork:
    """Build a multi-task network from parts, without a recipe.

    ``tasks`` maps task names to Task objects or task plugin references; the model's heads
    are sized from them. Example::

        model = mtlkit.compose(backbone=("segnet", {"width": 0.25}), attention="mtan",
                               tasks={"segmentation": ("segmentation", {"num_classes": 13}),
                                      "depth": "depth"})
    """
    task_objs = build_tasks(tasks)
    backbone_ref = as_ref(backbone, "model.backbone")
    attention_ref = as_ref(attention, "model.attention")
    head_refs: dict[str, ComponentRef] = {}
    for t, task in task_objs.items():
        if heads and t in heads:
            head_refs[t] = as_ref(heads[t], f"model.heads.{t}")
        elif head is not None:
            head_refs[t] = as_ref(head, "model.head")
        else:
            head_refs[t] = ComponentRef(name=getattr(task, "default_head", "dense_pred"))
    if heads:
        unknown = [t for t in heads if t not in task_objs]
        if unknown:
            raise ConfigError(f"[model.heads] {unknown[0]}: not a task (tasks: {', '.join(task_objs)})")
    task_names = list(task_objs)
    registry = get_registry()
    registry.get("backbone", backbone_ref.name)  # fail early on an unknown name
    for t, ref in head_refs.items():
        registry.get("head", ref.name)

    built: dict[str, nn.Module] = {}

    def make_backbone() -> nn.Module:
        built["backbone"] = build_component("backbone", backbone_ref, "model.backbone", task_names=task_names)
        return built["backbone"]

    def head_builder(t: str):
        where = f"model.heads.{t}" if heads and t in heads else "model.head"

        def make_head(in_channels: int) -> nn.Module:
            # in_stride: how much smaller than the input the features reaching the head are
            # (a dense head upsamples its prediction back to the input's resolution)
            stride = getattr(built.get("backbone"), "out_stride", 1)
            return build_component("head", head_refs[t], where, in_channels=in_channels, task=task_objs[t],
                                   in_stride=stride)

        return make_head

    model = build_component(
        "attention", attention_ref, "model.attention",
        backbone=make_backbone, heads={t: head_builder(t) for t in task_names}, tasks=task_objs,
    )
    _check_head_outputs(model, task_objs)
    return model


def _check_head_outputs(model: nn.Module, tasks: Mapping[str, Task]) -> None:
    """A head whose output channels do not match its task is a recipe error."""
    heads = getattr(model, "heads", None)
    if not isinstance(heads, nn.ModuleDict):
        return
    for t, head in heads.items():
        out = _last_out_features(head)
        if out is not None and t in tasks and out != tasks[t].out_channels:
            raise ConfigError(
                f"[model.heads.{t}] head gives {out} output channels but task '{t}' needs {tasks[t].out_channels}"
            )


def _last_out_features(module: nn.Module) -> int | None:
    last = None
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            last = m.out_channels
        elif isinstance(m, nn.Linear):
            last = m.out_features
    return last


@dataclass
class Parts:
    model: MultiTaskNetwork
    tasks: dict[str, Task]
    weighting: Weighting
    train_data: Dataset | dict[str, Dataset] | None
    val_data: Dataset | dict[str, Dataset] | None
    loggers: dict[str, Any] = field(default_factory=dict)  # name -> Logger (filled by mtlkit.preflight)


def build_dataset(ref, where: str, split: str | None) -> Dataset | None:
    if split is None:
        return None
    return build_component("dataset", ComponentRef(name=ref.name, params=ref.params), where, split=split)


def build_model(recipe: Recipe) -> tuple[MultiTaskNetwork, dict[str, Task]]:
    torch.manual_seed(recipe.training.seed)  # the same seed gives the same initial weights
    tasks = build_tasks({t: ComponentRef(name=r.name, params=r.params) for t, r in recipe.tasks.items()})
    m = recipe.model
    model = compose(backbone=m.backbone, tasks=tasks, attention=m.attention, head=m.head, heads=m.heads)
    return model, tasks


def build_weighting(recipe: Recipe, tasks: Mapping[str, Task]) -> Weighting:
    return build_component("weighting", recipe.weighting, "weighting", task_names=list(tasks))


def training_split(recipe: Recipe, ref) -> str:
    """The split a data set trains on: its ``train_split``, or, with ``training.train_on =
    "train+val"``, that and its ``val_split`` joined by '+' (a data set that takes such a
    joined split, as the Decathlon ones do, serves both as one training set)."""
    if recipe.training.train_on == "train+val":
        return f"{ref.train_split}+{ref.val_split}"
    return ref.train_split


def build_loggers(recipe: Recipe) -> dict[str, Any]:
    """The recipe's ``[[loggers]]``, by name (:class:`mtlkit.engine.loggers.Logger`)."""
    return {ref.name: build_component("logger", ref, f"loggers.{i}") for i, ref in enumerate(recipe.loggers)}


def build_data(recipe: Recipe) -> tuple[Any, Any]:
    """(train, val): data sets, or dicts task -> data set in the many-to-many setting.
    Training on train+val leaves no validation data."""
    joined = recipe.training.train_on == "train+val"
    if recipe.data is not None:
        return (build_dataset(recipe.data, "data", training_split(recipe, recipe.data)),
                None if joined else build_dataset(recipe.data, "data", recipe.data.val_split))
    train, val = {}, {}
    for t, ref in recipe.tasks.items():
        train[t] = build_dataset(ref.data, f"tasks.{t}.data", training_split(recipe, ref.data))
        v = None if joined else build_dataset(ref.data, f"tasks.{t}.data", ref.data.val_split)
        if v is not None:
            val[t] = v
    return train, val or None


def build_parts(recipe: Recipe, with_data: bool = True) -> Parts:
    model, tasks = build_model(recipe)
    weighting = build_weighting(recipe, tasks)
    train, val = build_data(recipe) if with_data else (None, None)
    return Parts(model=model, tasks=tasks, weighting=weighting, train_data=train, val_data=val)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per top-level part of the model (backbone, attention, heads, ...)."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        part = name.split(".", 1)[0]
        counts[part] = counts.get(part, 0) + p.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def params_ratio(recipe: Recipe, model: nn.Module, tasks: Mapping[str, Task]) -> float:
    """The model's #P as the paper counts it: its parameters (without the heads where the
    paper leaves them out), times the runs the paper's number covers, over the unit."""
    paper = recipe.paper
    heads = getattr(model, "heads", None)
    skip = {id(p) for p in heads.parameters()} if paper is not None and not paper.params_heads and heads else set()
    counted = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    return counted * (paper.params_runs if paper is not None else 1) / params_unit(recipe, tasks)


def params_unit(recipe: Recipe, tasks: Mapping[str, Task]) -> int:
    """Parameters of the paper's unit: one standard single-task network (the backbone with
    its default parameters, or ``paper.params_base_backbone``; split; the first task's head),
    or that backbone alone (the Decathlon's convention, ``paper.params_base = "backbone"``)."""
    mode = recipe.paper.params_base if recipe.paper else "single_task"
    first = next(iter(tasks))
    # e.g. plain SegNet, not Wide/Deep; or the backbone with the params the paper's unit has
    standard = ComponentRef(name=recipe.model.backbone.name,
                            params=recipe.paper.params_base_backbone if recipe.paper else {})
    if mode == "backbone":
        backbone = build_component("backbone", standard, "model.backbone", task_names=[first])
        return sum(p.numel() for p in backbone.parameters())
    heads = {first: recipe.model.heads[first]} if first in recipe.model.heads else None
    single = compose(backbone=standard, tasks={first: tasks[first]}, attention="split",
                     head=recipe.model.head, heads=heads)
    return sum(p.numel() for p in single.parameters())


def check_parts(recipe: Recipe, parts: Parts) -> None:
    """Check the heads against the data before a run starts, so that a mismatch is one line
    naming the task and its plugins rather than an IndexError (or, on a GPU, a device-side
    assert) in the first step: the data set's declared class count must fit the task's, and
    each task's loss must accept the model's output on the first training sample (a head
    of the wrong kind, or labels beyond the task's classes, fail there)."""
    registry = get_registry()
    data = parts.train_data
    if data is None:
        return

    def describe(t: str) -> str:
        ref = recipe.model.heads.get(t) or recipe.model.head
        head = ref.name if ref is not None else getattr(parts.tasks[t], "default_head", "dense_pred")
        task_name = recipe.tasks[t].name
        return (f"task '{t}' ({task_name}, plugin {registry.get('task', task_name).plugin}) with head "
                f"'{head}' (plugin {registry.get('head', head).plugin})")

    groups = [(t, data[t], [t]) for t in parts.tasks if t in data] if isinstance(data, Mapping) \
        else [(None, data, list(parts.tasks))]
    model = parts.model
    was_training = model.training
    model.eval()  # one sample: BatchNorm must not use (or update) batch statistics
    try:
        for domain, ds, names in groups:
            _check_class_counts(parts, ds, names, describe)
            if len(ds) == 0:
                continue  # the Trainer reports an empty data set
            batch = torch.utils.data.default_collate([sample_keeping_rng(ds, 0)])
            for key, t in [("image", None)] + [(parts.tasks[t].target, t) for t in names]:
                if key not in batch:  # the Trainer's wording
                    raise DataError(f"train_data: samples have no '{key}'"
                                    + (f" (the target of task '{t}')" if t else ""))
            # A full-size CPU forward of a large model takes seconds: try a corner crop first,
            # and the whole sample only if the crop fails (a backbone may need its full size).
            small = _corner_crop(batch, 64)
            if small is not None:
                try:
                    _probe(recipe, parts, small, domain, names, describe)
                    continue
                except MtlkitError:
                    pass
            _probe(recipe, parts, batch, domain, names, describe)
    finally:
        model.train(was_training)


def _corner_crop(batch: dict, size: int) -> dict | None:
    """The batch's top-left ``size`` x ``size`` corner (image and targets of its size), or
    None if it is no larger."""
    h, w = batch["image"].shape[-2:]
    if h <= size and w <= size:
        return None
    return {k: v[..., :size, :size] if torch.is_tensor(v) and v.dim() >= 2 and tuple(v.shape[-2:]) == (h, w) else v
            for k, v in batch.items()}


@torch.no_grad()
def _probe(recipe: Recipe, parts: Parts, batch: dict, domain: str | None, names: list[str], describe) -> None:
    x = batch["image"]
    try:
        out = parts.model(x, tasks=[domain]) if domain is not None else parts.model(x)
    except MtlkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line (the cause under --debug)
        m = recipe.model
        raise ConfigError(f"[model] backbone '{m.backbone.name}' with attention '{m.attention.name}' fails on the "
                          f"first training sample (image {tuple(x.shape)}): {_first_line(exc)}") from exc
    for t in names:
        if t not in out:
            raise TrainingError(f"the model returned no output for task '{t}'")
        pred, target = out[t], batch[parts.tasks[t].target]
        try:
            parts.tasks[t].loss(pred, target)
        except Exception as exc:  # noqa: BLE001 - any failure here is this mismatch
            raise ConfigError(
                f"[tasks.{t}] {describe(t)}: the loss fails on the first training sample (output "
                f"{tuple(pred.shape)}, target {tuple(torch.as_tensor(target).shape)}): {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def sample_keeping_rng(ds, index: int):
    """``ds[index]`` without drawing from the global RNGs (augmentations do): a check must
    not change what the run then does."""
    import random

    import numpy as np

    saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        return ds[index]
    finally:
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])


def _check_class_counts(parts: Parts, ds, names: list[str], describe) -> None:
    """A data set that declares ``num_classes`` (an int, or {target: int}) must not have more
    classes than a class-scored task gives scores for (fewer is fine: a subset)."""
    declared = getattr(ds, "num_classes", None)
    scored = [t for t in names if getattr(parts.tasks[t], "output_activation", None) == "log_softmax"]
    for t in scored:
        task = parts.tasks[t]
        n = declared.get(task.target) if isinstance(declared, Mapping) else declared if len(scored) == 1 else None
        if isinstance(n, int) and not isinstance(n, bool) and n > task.out_channels:
            raise ConfigError(f"[tasks.{t}.params] num_classes: {describe(t)} scores {task.out_channels} "
                              f"classes but its data ('{task.target}') has {n}")
