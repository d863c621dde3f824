"""What is shared and what belongs to one task: the one rule (re-exported by
:mod:`mtlkit.contracts`, where the network contract that relies on it lives)."""

from __future__ import annotations

from torch import nn

PRIVATE_CONTAINERS = ("heads", "task_specific")


def _task_containers(module: nn.Module) -> list[nn.ModuleDict]:
    """The ModuleDicts (task name -> modules) a module holds per the convention: its
    ``heads`` and ``task_specific``, and the attribute its class names in ``task_container``
    (e.g. :class:`~mtlkit.domains.DomainSpecific`'s per-domain copies)."""
    names = list(PRIVATE_CONTAINERS)
    extra = getattr(type(module), "task_container", None)
    if extra:
        names.append(extra)
    found = [getattr(module, a, None) for a in names]
    return [c for c in found if isinstance(c, nn.ModuleDict)]


def module_owners(model: nn.Module) -> dict[int, str]:
    """``id(module) -> task`` for every module that belongs to one task; the rest is shared.

    A module belongs to task ``t`` when it sits under ``t`` in a task container: a
    ``heads`` or ``task_specific`` ``nn.ModuleDict`` attribute (task name -> modules) of
    any module, or a :class:`~mtlkit.domains.DomainSpecific` layer's copy for ``t``. The
    outermost container decides (an MTAN inside a single-task network's
    ``task_specific["depth"]`` is depth's, whatever its own containers say), and a module
    found under two tasks of one container (tied weights) is shared.
    """
    owners: dict[int, str] = {}
    decided: set[int] = set()
    # outermost first: a container's depth is its holder's depth (named_modules is pre-order)
    holders = sorted(((name.count(".") if name else -1, m) for name, m in model.named_modules()),
                     key=lambda dm: dm[0])
    for _, holder in holders:
        for container in _task_containers(holder):
            seen: dict[int, str | None] = {}
            for task, sub in container.items():
                for m in sub.modules():
                    if id(m) not in decided:
                        seen[id(m)] = task if seen.get(id(m), task) == task else None
            for key, task in seen.items():
                decided.add(key)
                if task is not None:
                    owners[key] = task
    return owners


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], dict[str, list[nn.Parameter]]]:
    """``(shared, {task: private})``: every parameter of ``model`` once, in ``parameters()``
    order. A parameter is private to a task when every module registering it belongs to
    that task (:func:`module_owners`); anything else is shared.

    The one rule behind ``MultiTaskNetwork.shared_parameters``/``task_parameters``, the
    engine's gradient-level backward and :func:`mtlkit.domains.freeze_shared`.
    """
    owners = module_owners(model)
    where: dict[int, set[str | None]] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                where.setdefault(id(p), set()).add(owners.get(id(m)))
    shared: list[nn.Parameter] = []
    private: dict[str, list[nn.Parameter]] = {}
    for p in model.parameters():
        tasks = where.get(id(p), {None})
        if len(tasks) == 1 and None not in tasks:
            private.setdefault(next(iter(tasks)), []).append(p)
        else:
            shared.append(p)
    return shared, private
