"""The Decathlon score (facts: shared/reference/decathlon.md).

The score of domain d with top-1 test error E_d (a fraction) is

    S_d = alpha_d * max(0, Emax_d - E_d) ** 2,   Emax_d = 2 * E_base_d,
    alpha_d = 1000 / Emax_d ** 2

so a perfect domain scores 1000 and the baseline (ResNet-26 fine-tuned per domain) scores
exactly 250; the Decathlon score is the sum over domains (at most 10,000).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from mtlkit.errors import ConfigError

from .domains import DOMAINS, check_domain

# Top-1 accuracy (%) of the baseline that defines E_base ("Finetune" row).
BASELINE_ACCURACY: dict[str, float] = {
    "aircraft": 60.34,
    "cifar100": 82.12,
    "daimlerpedcls": 92.82,
    "dtd": 55.53,
    "gtsrb": 97.53,
    "imagenet12": 59.87,
    "omniglot": 87.69,
    "svhn": 96.55,
    "ucf101": 51.20,
    "vgg-flowers": 81.41,
}

GAMMA = 2.0


def _error_of(domain: str, value: float, kind: str) -> float:
    if not isinstance(value, (int, float)) or math.isnan(float(value)):
        raise ConfigError(f"decathlon score: {kind} of '{domain}' must be a number, got {value!r}")
    value = float(value)
    if kind == "accuracy":
        if not 0.0 <= value <= 100.0:
            raise ConfigError(f"decathlon score: accuracy of '{domain}' must be a percentage in [0, 100], got {value}")
        return 1.0 - value / 100.0
    if kind == "error":
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"decathlon score: error of '{domain}' must be a fraction in [0, 1], got {value}")
        return value
    raise ConfigError(f"decathlon score: kind must be 'accuracy' or 'error', got {kind!r}")


def domain_score(domain: str, value: float, kind: str = "accuracy") -> float:
    """One domain's score; ``value`` is a top-1 accuracy in % (``kind="accuracy"``) or a
    top-1 error as a fraction (``kind="error"``)."""
    check_domain(domain, where="decathlon score")
    error = _error_of(domain, value, kind)
    e_max = 2.0 * (1.0 - BASELINE_ACCURACY[domain] / 100.0)
    alpha = 1000.0 * e_max**-GAMMA
    return alpha * max(0.0, e_max - error) ** GAMMA


def domain_scores(values: Mapping[str, float], kind: str = "accuracy") -> dict[str, float]:
    """Per-domain scores for the domains given (official order)."""
    for d in values:
        check_domain(d, where="decathlon score")
    return {d: domain_score(d, values[d], kind) for d in DOMAINS if d in values}


def decathlon_score(values: Mapping[str, float], kind: str = "accuracy") -> float:
    """The Decathlon score: the sum of :func:`domain_score` over the domains given (all
    ten for the official score, at most 10,000)."""
    return sum(domain_scores(values, kind).values())
