"""The Decathlon columns of ``mtlkit compare``: the mean top-1 accuracy over a run's
domains and the Decathlon score over them."""

from __future__ import annotations

import math
from typing import Any

from mtlkit.hookspecs import hookimpl

from .domains import DOMAINS
from .score import decathlon_score

DECATHLON_DATASETS = ("decathlon", "synthetic_decathlon")


def decathlon_domains(recipe) -> dict[str, str] | None:
    """{task: Decathlon domain} for a many-to-many Decathlon run (every task's data set is
    a Decathlon one, or every task is named after a domain), else None. The domain is the
    data set's ``domain`` parameter when it has one, else the task's name."""
    if not recipe.many_to_many:
        return None
    out: dict[str, str] = {}
    for name, task in recipe.tasks.items():
        data = task.data
        domain = data.params.get("domain") if data is not None else None
        if data is not None and data.name in DECATHLON_DATASETS and domain in DOMAINS:
            out[name] = domain
        elif name in DOMAINS:
            out[name] = name
        else:
            return None
    if len(set(out.values())) != len(out):  # two tasks on one domain: no per-domain score
        return None
    return out


def domain_accuracies(summary: dict[str, Any]) -> dict[str, float] | None:
    """{domain: mean top-1 accuracy} of a Decathlon run, or None (not one, or a domain lacks it)."""
    domains = decathlon_domains(summary["recipe"])
    if not domains:
        return None
    acc = {d: summary["metrics"].get(t, {}).get("accuracy") for t, d in domains.items()}
    if any(v is None or math.isnan(v) for v in acc.values()):
        return None
    return acc


def mean_accuracy(summary: dict[str, Any]) -> float | None:
    acc = domain_accuracies(summary)
    return None if acc is None else sum(acc.values()) / len(acc)


def score(summary: dict[str, Any]) -> float | None:
    acc = domain_accuracies(summary)
    return None if acc is None else decathlon_score(acc, kind="accuracy")


@hookimpl
def register_compare_columns(register):
    register("mean", mean_accuracy, fmt="{:.2f}", note="mean: top-1 accuracy (%) averaged over the domains")
    register("score", score, fmt="{:.0f}",
             note="score: the Decathlon score over the domains present, from these accuracies and the real "
                  "data's baseline errors (meaningful on real data only)")
