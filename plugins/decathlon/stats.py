"""Per-domain mean/std statistics: the shipped ``decathlon_stats.json`` and files of its
form (``{"domains": {domain: {"mean": [r, g, b], "std": [r, g, b]}}}``)."""

from __future__ import annotations

import json
import math
import numbers
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
    except RecursionError:
        raise DataError(f"{path}: not a readable JSON stats file (nested too deeply)") from None
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
    return {name: checked_entry(path, name, entry) for name, entry in domains.items()}


def checked_entry(path: str | os.PathLike, name: str, entry: object) -> dict[str, list[float]]:
    """One domain's ``{"mean": [r, g, b], "std": [r, g, b]}``: three finite numbers each, the
    stds positive (a NaN or Inf would make every input NaN or zero, failing only later in a
    NaN loss that names no file). Else a DataError naming the file, the domain and the field."""
    out: dict[str, list[float]] = {}
    for field in ("mean", "std"):
        values = entry.get(field) if isinstance(entry, Mapping) else None
        if (not isinstance(values, Sequence) or isinstance(values, (str, bytes))
                or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)):
            raise DataError(f"{path}: domain '{name}' needs 'mean' and 'std' lists of numbers ('{field}': {values!r:.60})")
        if len(values) != 3:
            raise DataError(f"{path}: domain '{name}' needs 3 means and 3 stds ('{field}' has {len(values)})")
        bad = [v for v in values if not _finite(v) or (field == "std" and v <= 0)]
        if bad:
            need = "finite positive numbers" if field == "std" else "finite numbers"
            raise DataError(f"{path}: domain '{name}': '{field}' holds {bad[0]!r:.40}; it must be {need}")
        out[field] = [float(v) for v in values]
    return out


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def write_stats(stats: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike,
                source: str = "computed with mtlkit.plugins.decathlon.mean_std.compute_mean_std") -> Path:
    """Write a stats file (the :func:`load_stats` format) atomically."""
    out = Path(path)
    domains = {d: checked_entry(out, d, {"mean": list(v["mean"]), "std": list(v["std"])}) for d, v in stats.items()}
    body = {"source": source, "placeholder": False, "domains": domains}
    data = (json.dumps(body, indent=2) + "\n").encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    return out
