"""Checks of a recipe's ``[paper]`` block against the recipe's own components.

- ``protocol`` names, for each task whose plugin has a ``protocol`` parameter, one of the
  protocols that plugin offers: the paper's numbers are only comparable to a run of that
  task configured with that protocol (``--set tasks.<task>.params.protocol=<name>``), so
  the name must be one the task can be configured with. A ``{task: name}`` table names
  tasks of the recipe. Tasks without such a parameter (classification: the Decathlon's
  ``"test_server"`` is where the numbers come from, not a metric rule) take any name.
- ``params_base_backbone`` is a valid params table of the recipe's backbone.
"""

from __future__ import annotations

import typing
from typing import Callable

from pydantic import ValidationError

from ..errors import MtlkitError, did_you_mean
from .errors import format_validation_errors
from .schema import Recipe


def protocol_choices(task_params_model) -> list[str] | None:
    """The protocol names a task plugin's params model offers (None: it has no ``protocol``)."""
    field = getattr(task_params_model, "model_fields", {}).get("protocol")
    if field is None:
        return None
    return [str(v) for v in typing.get_args(field.annotation)] or None


def paper_protocols(recipe: Recipe) -> dict[str, str]:
    """{task: the protocol of the paper's numbers} for every task the block speaks of."""
    paper = recipe.paper
    if paper is None or not paper.protocol:
        return {}
    if isinstance(paper.protocol, str):
        return dict.fromkeys(recipe.tasks, paper.protocol)
    return dict(paper.protocol)


def paper_checks(recipe: Recipe, where: str, registry, origin: Callable[[str], str | None]) -> list[str]:
    """One line per problem of the ``[paper]`` block (see the module docstring)."""
    paper = recipe.paper
    if paper is None:
        return []
    errors = []
    tasks = list(recipe.tasks)
    for t, name in paper_protocols(recipe).items():
        if t not in recipe.tasks:
            errors.append(f"{where} [paper] protocol: '{t}' is not a task{did_you_mean(t, tasks)}")
            continue
        try:
            choices = protocol_choices(registry.get("task", recipe.tasks[t].name).params)
        except MtlkitError:
            continue  # an unknown task plugin is reported already
        if choices is not None and name not in choices:
            errors.append(f"{where} [paper] protocol: '{name}' for task '{t}' is not a protocol its plugin "
                          f"'{recipe.tasks[t].name}' offers{did_you_mean(name, choices)} "
                          f"(protocols: {', '.join(choices)})")
    if paper.params_base_backbone:
        try:
            backbone = registry.get("backbone", recipe.model.backbone.name)
        except MtlkitError:
            return errors
        try:
            backbone.params.model_validate(paper.params_base_backbone)
        except ValidationError as exc:
            errors.extend(format_validation_errors(exc, prefix=where, model=backbone.params,
                                                   location="paper.params_base_backbone", origin=origin))
    return errors
