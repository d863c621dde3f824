"""Visual Decathlon: the ten domains, the Decathlon score, test-server submissions and
per-domain mean/std statistics (facts: shared/reference/decathlon.md).

The score of domain d with top-1 test error E_d (a fraction) is

    S_d = alpha_d * max(0, Emax_d - E_d) ** 2,   Emax_d = 2 * E_base_d,
    alpha_d = 1000 / Emax_d ** 2

so a perfect domain scores 1000 and the baseline (ResNet-26 fine-tuned per domain) scores
exactly 250; the Decathlon score is the sum over domains (at most 10,000).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator

from .errors import ConfigError, DataError, did_you_mean

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

# Domains trained without horizontal flips (flipping changes the class or reads wrong).
NO_FLIP_DOMAINS: frozenset[str] = frozenset({"gtsrb", "omniglot", "svhn"})

GAMMA = 2.0
SUBMISSION_MEMBER = "results.json"


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


# --------------------------------------------------------------------------- submissions
def _atomic_write_bytes(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def submission_entries(
    predictions: Mapping[str, Iterable[Sequence[int]]], category_offsets: Mapping[str, int] | None = None
) -> list[dict[str, int]]:
    """The server's list of ``{"image_id", "category_id"}`` (offset ids) for ``predictions``:
    domain -> [(image_id, 0-based class), ...]."""
    offsets = dict(category_offsets) if category_offsets is not None else default_category_offsets()
    entries: list[dict[str, int]] = []
    seen: set[int] = set()
    for domain, rows in predictions.items():
        if domain not in offsets:
            raise ConfigError(
                f"submission: no category offset for domain '{domain}'{did_you_mean(domain, offsets)}"
            )
        offset = int(offsets[domain])
        limit = DOMAINS.get(domain)
        for row in rows:
            image_id, cls = (int(v) for v in row)
            if cls < 0 or (limit is not None and cls >= limit):
                raise DataError(f"submission: class {cls} of image {image_id} is outside domain '{domain}'")
            if image_id in seen:
                raise DataError(f"submission: image id {image_id} predicted twice (domain '{domain}')")
            seen.add(image_id)
            entries.append({"image_id": image_id, "category_id": offset + cls})
    return entries


def write_submission(
    predictions: Mapping[str, Iterable[Sequence[int]]],
    category_offsets: Mapping[str, int] | None,
    out_zip: str | os.PathLike,
) -> Path:
    """Write the test server's ``results.json`` (original, offset category ids) inside a
    zip at ``out_zip``, atomically (a temp file in the same folder, then ``os.replace``)."""
    entries = submission_entries(predictions, category_offsets)
    data = json.dumps(entries).encode()
    out = Path(out_zip)

    def write(fh: Any) -> None:
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(SUBMISSION_MEMBER, data)

    _atomic_write_bytes(out, write)
    return out


# --------------------------------------------------------------------------- statistics
def stats_path() -> Path:
    """The per-domain mean/std file shipped with the decathlon data-set plugin."""
    import mtlkit.plugins.datasets as datasets_pkg

    return Path(datasets_pkg.__file__).with_name("decathlon_stats.json")


def load_stats(path: str | os.PathLike | None = None) -> dict[str, dict[str, list[float]]]:
    """Read a stats file: ``{"domains": {domain: {"mean": [r, g, b], "std": [r, g, b]}}}``
    (values for images scaled to [0, 1]). Bad content -> DataError naming the file."""
    path = Path(path) if path is not None else stats_path()
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: stats file does not exist") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable JSON stats file ({exc})") from None
    domains = raw.get("domains") if isinstance(raw, dict) else None
    if not isinstance(domains, dict):
        raise DataError(f"{path}: expected an object with a 'domains' mapping")
    out: dict[str, dict[str, list[float]]] = {}
    for name, entry in domains.items():
        try:
            mean = [float(v) for v in entry["mean"]]
            std = [float(v) for v in entry["std"]]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: domain '{name}' needs 'mean' and 'std' lists of numbers") from None
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise DataError(f"{path}: domain '{name}' needs 3 means and 3 positive stds")
        out[name] = {"mean": mean, "std": std}
    return out


def compute_mean_std(
    root: str | os.PathLike,
    domains: Iterable[str] | None = None,
    layout: str = "official",
    split: str = "train",
    image_size: int = 72,
    max_images: int | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Per-channel mean/std of each domain's images (scaled to [0, 1], after the loader's
    resize and centre crop) under a Decathlon data root; the result has the stats file's
    ``domains`` form (write it with :func:`write_stats`)."""
    import torch

    from mtlkit.plugins.datasets.decathlon import DecathlonDataset, DecathlonParams

    out: dict[str, dict[str, list[float]]] = {}
    for domain in list(domains) if domains is not None else list(DOMAINS):
        params = DecathlonParams(root=str(root), domain=domain, layout=layout, image_size=image_size,
                                 crop=image_size, augment=False, normalize=False)
        ds = DecathlonDataset(params, split=split)
        n = len(ds) if max_images is None else min(len(ds), max_images)
        total = torch.zeros(3, dtype=torch.float64)
        total_sq = torch.zeros(3, dtype=torch.float64)
        pixels = 0
        for i in range(n):
            img = ds[i]["image"].double()
            total += img.sum(dim=(1, 2))
            total_sq += (img * img).sum(dim=(1, 2))
            pixels += img.shape[1] * img.shape[2]
        if pixels == 0:
            raise DataError(f"{root}: domain '{domain}' has no {split} images to compute statistics from")
        mean = total / pixels
        std = (total_sq / pixels - mean * mean).clamp_min(0).sqrt()
        out[domain] = {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}
    return out


def write_stats(stats: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike,
                source: str = "computed with mtlkit.decathlon.compute_mean_std") -> Path:
    """Write a stats file (the :func:`load_stats` format) atomically."""
    body = {"source": source, "domains": {d: {"mean": list(v["mean"]), "std": list(v["std"])} for d, v in stats.items()}}
    data = (json.dumps(body, indent=2) + "\n").encode()
    out = Path(path)
    _atomic_write_bytes(out, lambda fh: fh.write(data))
    return out
