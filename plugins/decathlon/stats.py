"""Per-domain mean/std statistics: the shipped ``decathlon_stats.json`` and files of its
form (``{"domains": {domain: {"mean": [r, g, b], "std": [r, g, b]}}}``)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from mtlkit.errors import DataError

from mtlkit.atomic import atomic_write_bytes


def stats_path() -> Path:
    """The per-domain mean/std file shipped with this plugin."""
    return Path(__file__).with_name("decathlon_stats.json")


def load_stats(path: str | os.PathLike | None = None) -> dict[str, dict[str, list[float]]]:
    """Read a stats file: ``{"domains": {domain: {"mean": [r, g, b], "std": [r, g, b]}}}``
    (values for images scaled to [0, 1]). Bad content -> DataError naming the file.

    A file marked ``"placeholder": true`` holds stand-in numbers (e.g. ImageNet's for every
    domain), not its domains' statistics: it still loads, so that a pipeline can be tried,
    but with a warning naming the file, since normalising omniglot (mean 0.081) with
    ImageNet's 0.45 silently shifts every input."""
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
    placeholder = raw.get("placeholder", False)
    if not isinstance(placeholder, bool):
        raise DataError(f"{path}: 'placeholder' must be true or false, not {placeholder!r}")
    if placeholder:
        warnings.warn(f"{path}: marked 'placeholder': its mean/std are stand-ins, not the domains' own "
                      "statistics (compute them with compute_mean_std)", UserWarning, stacklevel=2)
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


def write_stats(stats: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike,
                source: str = "computed with mtlkit.plugins.decathlon.mean_std.compute_mean_std") -> Path:
    """Write a stats file (the :func:`load_stats` format) atomically."""
    body = {"source": source, "placeholder": False, "domains": {d: {"mean": list(v["mean"]), "std": list(v["std"])} for d, v in stats.items()}}
    data = (json.dumps(body, indent=2) + "\n").encode()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    return out
