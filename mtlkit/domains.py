"""Domain-specific layers that any backbone can use (the many-to-many setting).

In the Visual Decathlon setting one network serves several domains, one at a time: a
forward pass belongs to exactly one domain. Some layers (BatchNorm, residual adapters)
then keep one copy per domain while everything else is shared.

- :class:`DomainSpecific` holds one module per domain (an ``nn.ModuleDict``) and runs the
  active one. :func:`mtlkit.contracts.activate_task` switches every such layer at once,
  because it calls each submodule's ``set_active_task``.
- :class:`DomainBatchNorm2d` is the common case: a BatchNorm2d per domain.
- :func:`freeze_shared` turns a network into the "feature extractor" baseline: only the
  domain-specific layers and the task heads stay trainable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ConfigError, did_you_mean

__all__ = [
    "DomainSpecific",
    "DomainBatchNorm2d",
    "domain_specific_or_shared",
    "domain_specific_parameters",
    "freeze_shared",
]


def _check_names(task_names: Iterable[str], what: str) -> list[str]:
    names = list(task_names)
    if not names:
        raise ConfigError(f"{what}: needs at least one domain name")
    if len(set(names)) != len(names):
        raise ConfigError(f"{what}: duplicate domain names in {names}")
    for name in names:
        # nn.ModuleDict keys become state_dict path parts, so a '.' would split them.
        if not isinstance(name, str) or not name or "." in name:
            raise ConfigError(f"{what}: domain name {name!r} must be a non-empty string without '.'")
    return names


class DomainSpecific(nn.Module):
    """One copy of a module per domain; ``forward`` runs the active domain's copy.

    ``module_factory()`` is called once per domain so that the copies share nothing.
    Until :meth:`set_active_task` is called the first domain is active, so a network with
    a single domain (or one built without domain names) needs no activation at all.
    """

    task_container = "domains"  # each copy belongs to its domain (mtlkit.contracts.split_parameters)

    def __init__(self, module_factory: Callable[[], nn.Module], task_names: Sequence[str]) -> None:
        super().__init__()
        names = _check_names(task_names, type(self).__name__)
        self.domains = nn.ModuleDict()
        for name in names:
            try:
                self.domains[name] = module_factory()
            except KeyError as exc:  # ModuleDict refuses names that clash with attributes
                raise ConfigError(f"{type(self).__name__}: domain name {name!r} cannot be used ({exc})") from None
        self.active_task = names[0]

    @property
    def task_names(self) -> list[str]:
        return list(self.domains.keys())

    def set_active_task(self, name: str) -> None:
        if name not in self.domains:
            known = list(self.domains.keys())
            raise ConfigError(
                f"unknown domain '{name}'{did_you_mean(name, known)} for a domain-specific layer "
                f"(known domains: {', '.join(known)})"
            )
        self.active_task = name

    @property
    def active(self) -> nn.Module:
        return self.domains[self.active_task]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"active={self.active_task!r}"


class DomainBatchNorm2d(DomainSpecific):
    """A ``BatchNorm2d(num_features, **kwargs)`` per domain."""

    def __init__(self, num_features: int, task_names: Sequence[str], **bn_kwargs: Any) -> None:
        super().__init__(lambda: nn.BatchNorm2d(num_features, **bn_kwargs), task_names)
        self.num_features = num_features


def domain_specific_or_shared(
    module_factory: Callable[[], nn.Module], task_names: Sequence[str] | None, enabled: bool = True
) -> nn.Module:
    """``DomainSpecific(module_factory, task_names)`` if ``enabled`` and names are given,
    else one shared ``module_factory()`` (lets a backbone make a layer optional per domain)."""
    if enabled and task_names:
        return DomainSpecific(module_factory, task_names)
    return module_factory()


def domain_specific_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter that lives inside a :class:`DomainSpecific` module (each once)."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, DomainSpecific):
            for p in module.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


def _keep_eval(module: nn.Module, args: Any) -> None:
    module.training = False


def freeze_shared(model: nn.Module, freeze_bn_stats: bool = True) -> int:
    """Freeze every shared parameter: all but the domain-specific layers, the ``heads`` and
    the ``task_specific`` modules (the "feature" baseline: a fixed shared extractor). What is
    shared is :func:`mtlkit.contracts.split_parameters`'s rule, the engine's too.

    With ``freeze_bn_stats`` the shared BatchNorm layers also always run in eval mode
    (their running statistics are part of the fixed extractor, and ``model.train()``
    would otherwise update them). Returns the number of parameters frozen.
    """
    from .contracts import module_owners, split_parameters

    shared, _ = split_parameters(model)
    for p in shared:
        p.requires_grad_(False)
    if freeze_bn_stats:
        private_modules = module_owners(model)
        for module in model.modules():
            if isinstance(module, _BatchNorm) and id(module) not in private_modules:
                if not getattr(module, "_mtlkit_frozen_stats", False):
                    # A pre-hook (not module.eval()) so that a later model.train() cannot undo it.
                    module.register_forward_pre_hook(_keep_eval)
                    module._mtlkit_frozen_stats = True
                module.eval()
    return sum(p.numel() for p in shared)
