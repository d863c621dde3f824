"""The ten Visual Decathlon domains: class counts, official category ids, test split
sizes, which domains train without flips (facts: shared/reference/decathlon.md)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

from mtlkit.errors import ConfigError, did_you_mean

# Official order (alphabetical): domain i (0-based) has category ids (i + 1) * 10**7 + 1 + class.
DOMAINS: dict[str, int] = {
    "aircraft": 100,
    "cifar100": 100,
    "daimlerpedcls": 2,
    "dtd": 47,
    "gtsrb": 43,
    "imagenet12": 1000,
    "omniglot": 1623,
    "svhn": 10,
    "ucf101": 101,
    "vgg-flowers": 102,
}
DOMAIN_NAMES: tuple[str, ...] = tuple(DOMAINS)

# Test split sizes of the release (decathlon.md).
TEST_SIZES: dict[str, int] = {
    "aircraft": 3333, "cifar100": 10000, "daimlerpedcls": 19600, "dtd": 1880, "gtsrb": 12630,
    "imagenet12": 48238, "omniglot": 8115, "svhn": 26032, "ucf101": 3783, "vgg-flowers": 6149,
}

# Domains trained without horizontal flips (flipping changes the class or reads wrong).
NO_FLIP_DOMAINS: frozenset[str] = frozenset({"gtsrb", "omniglot", "svhn"})
# Domains the reference implementation trains with no augmentation at all (centre crop only).
NO_AUGMENT_DOMAINS: frozenset[str] = frozenset({"gtsrb", "omniglot", "svhn"})


def check_domain(name: str, where: str = "decathlon", error: type[Exception] = ConfigError) -> str:
    """Return ``name`` if it is one of the ten domains, else a one-line error with a hint."""
    if name not in DOMAINS:
        msg = f"unknown domain '{name}'{did_you_mean(name, DOMAINS)} (domains: {', '.join(DOMAINS)})"
        raise error(f"{where}: {msg}" if where else msg)
    return name


# A params field holding a domain name: a misspelt domain is a recipe error (with its TOML location).
DomainName = Annotated[str, AfterValidator(lambda v: check_domain(v, where="", error=ValueError))]


def category_offset(domain: str) -> int:
    """The category id of class 0 of ``domain`` in the official annotations."""
    return (DOMAIN_NAMES.index(check_domain(domain)) + 1) * 10**7 + 1


def default_category_offsets() -> dict[str, int]:
    return {d: category_offset(d) for d in DOMAINS}
