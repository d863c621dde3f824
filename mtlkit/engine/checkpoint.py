"""Checkpoints: tensors in ``<stem>.safetensors``, everything else in ``<stem>.json``.

Nothing is ever unpickled. Both files are written to temporary names and renamed, the
JSON last; the JSON records the tensor file's name, size and sha256, so a checkpoint is
complete iff its JSON exists and names a matching tensor file. A torn save (the process
died between the two renames) is reported as such instead of loading mismatched state.

Tensor keys: ``model.<state_dict key>``, ``optimizer.<param index>.<state key>``,
``weighting.<state_dict key>``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import CheckpointError

FORMAT = "mtlkit-checkpoint"
VERSION = 1


# -- small file helpers -----------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, allow_nan=True) + "\n").encode())


def _remove(path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def recipe_sha256(recipe: dict | None) -> str | None:
    """A stable hash of a recipe dict (key order does not matter)."""
    if recipe is None:
        return None
    text = json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# -- RNG states as JSON -----------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """The global RNG states, raw (cheap enough to take after every step)."""
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def rng_to_json(raw: dict[str, Any]) -> dict[str, Any]:
    """``capture_rng()`` output as JSON-able lists."""
    np_state, py_state = raw["numpy"], raw["python"]
    out = {
        "torch": raw["torch"].tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if "cuda" in raw:
        out["cuda"] = [s.tolist() for s in raw["cuda"]]
    return out


def get_rng_state() -> dict[str, Any]:
    return rng_to_json(capture_rng())


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# -- safetensors ------------------------------------------------------------------
def _detach_for_save(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors; a tensor whose storage another key already uses (tied
    weights, views) is cloned, because safetensors refuses aliased tensors."""
    out: dict[str, Tensor] = {}
    storages: set[int] = set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in storages:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if ptr is not None:
            storages.add(ptr)
        out[key] = t
    return out


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    atomic_write_bytes(Path(path), save(_detach_for_save(tensors), metadata=metadata))


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file (CPU); CheckpointError naming the file otherwise."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' does not exist")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...: truncated or not safetensors
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"'{path}' is not a valid safetensors file (truncated or wrong format: {msg})") from None


# -- whole checkpoints --------------------------------------------------------------
def save_checkpoint(stem: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write ``stem.safetensors`` then ``stem.json``; returns the JSON path."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensor_path = stem.with_name(stem.name + ".safetensors")
    write_safetensors(tensor_path, tensors, metadata={"format": FORMAT})
    meta = dict(meta)
    meta.update(format=FORMAT, version=VERSION, tensors_file=tensor_path.name,
                tensors_bytes=tensor_path.stat().st_size, tensors_sha256=sha256_file(tensor_path))
    json_path = stem.with_name(stem.name + ".json")
    atomic_write_json(json_path, meta)
    return json_path


def resolve_checkpoint(path: str | os.PathLike, which: str = "last") -> Path:
    """A run folder, its ``checkpoints`` folder, a checkpoint ``.json`` or its
    ``.safetensors`` -> the checkpoint's JSON path."""
    p = Path(path)
    if p.is_dir():
        for candidate in (p / "checkpoints" / f"{which}.json", p / f"{which}.json"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"'{p}' is not an mtlkit run folder (no checkpoints/{which}.json)")
    if p.suffix == ".safetensors":
        p = p.with_suffix(".json")
    if p.suffix != ".json" or not p.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist (give a run folder or a checkpoint .json)")
    return p


def load_checkpoint(path: str | os.PathLike, which: str = "last") -> tuple[dict[str, Any], dict[str, Tensor], Path]:
    """(meta, tensors, json path) of a complete checkpoint, or CheckpointError."""
    json_path = resolve_checkpoint(path, which)
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"'{json_path}' is not a readable checkpoint JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"'{json_path}' is not an mtlkit checkpoint (format field missing)")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"'{json_path}': checkpoint version {meta.get('version')} is not supported "
                              f"(expected {VERSION})")
    name = meta.get("tensors_file")
    if not isinstance(name, str) or "/" in name or os.sep in name:
        raise CheckpointError(f"'{json_path}': bad tensors_file field")
    tensor_path = json_path.with_name(name)
    if not tensor_path.is_file():
        raise CheckpointError(f"'{json_path}' names '{name}', which does not exist")
    size = tensor_path.stat().st_size
    if size != meta.get("tensors_bytes") or sha256_file(tensor_path) != meta.get("tensors_sha256"):
        raise CheckpointError(f"'{tensor_path}' does not match '{json_path.name}' (truncated, replaced or an "
                              f"interrupted save)")
    return meta, read_safetensors(tensor_path), json_path


# -- model / optimizer / weighting state ---------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint JSON")


def pack_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
               weighting: nn.Module | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors for the safetensors file and the JSON part of optimizer state."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if weighting is not None:
        tensors.update({f"weighting.{k}": v for k, v in weighting.state_dict().items()})
    opt_meta: dict[str, Any] = {}
    if optimizer is not None:
        sd = optimizer.state_dict()
        extra: dict[str, dict[str, Any]] = {}
        for idx, pstate in sd["state"].items():
            for key, value in pstate.items():
                if isinstance(value, Tensor):
                    tensors[f"optimizer.{idx}.{key}"] = value
                else:
                    extra.setdefault(str(idx), {})[key] = _jsonable(value)
        opt_meta = {"class": type(optimizer).__name__, "param_groups": _jsonable(sd["param_groups"]),
                    "extra_state": extra}
    return tensors, opt_meta


def _restore_module(module: nn.Module, tensors: dict[str, Tensor], prefix: str, where: str) -> None:
    own = module.state_dict()
    given = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise CheckpointError(f"{where}: {prefix.rstrip('.')} state does not fit this model ({'; '.join(parts)})")
    for key, value in given.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{where}: {prefix}{key} has shape {tuple(value.shape)} in the checkpoint, "
                                  f"{tuple(own[key].shape)} in the model")
    module.load_state_dict(given, strict=True)


def unpack_state(tensors: dict[str, Tensor], opt_meta: dict[str, Any], model: nn.Module,
                 optimizer: torch.optim.Optimizer | None, weighting: nn.Module | None, where: str) -> None:
    _restore_module(model, tensors, "model.", where)
    if weighting is not None:
        _restore_module(weighting, tensors, "weighting.", where)
    if optimizer is None:
        return
    if opt_meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(f"{where}: the checkpoint's optimiser is {opt_meta.get('class')}, "
                              f"this run's is {type(optimizer).__name__}")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, extra in opt_meta.get("extra_state", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    groups = []
    for g in opt_meta.get("param_groups", []):
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    current = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current]:
        raise CheckpointError(f"{where}: optimiser parameter groups do not fit this model")
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: optimiser state does not fit this model ({exc})") from None


# -- init_from ----------------------------------------------------------------------
def load_model_weights(model: nn.Module, path: str | os.PathLike,
                       key_filter: str | Iterable[str] | Callable[[str], bool] | None = None) -> dict[str, list[str]]:
    """Copy weights from a safetensors file (or an mtlkit checkpoint / run folder) into ``model``.

    Keys are model ``state_dict`` keys; an mtlkit checkpoint's ``model.`` prefix is
    stripped. ``key_filter`` keeps only some keys: a glob (``"backbone.*"``), a list of
    globs, or a callable. Every kept key must exist in the model with the same shape
    (CheckpointError otherwise); model keys the file does not provide keep their values.
    Returns ``{"loaded": [...], "skipped": [model keys not loaded]}``.
    """
    p = Path(path)
    if p.is_dir() or p.suffix == ".json":
        meta, tensors, json_path = load_checkpoint(p)
        source = json_path.with_name(meta["tensors_file"])
    else:
        tensors, source = read_safetensors(p), p
    if tensors and all(k.startswith(("model.", "optimizer.", "weighting.")) for k in tensors):
        tensors = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if key_filter is not None:
        if callable(key_filter):
            keep = key_filter
        else:
            patterns = [key_filter] if isinstance(key_filter, str) else list(key_filter)
            keep = lambda k: any(fnmatch.fnmatchcase(k, pat) for pat in patterns)  # noqa: E731
        tensors = {k: v for k, v in tensors.items() if keep(k)}
    if not tensors:
        raise CheckpointError(f"'{source}': no tensors to load (key_filter matched none)")
    own = model.state_dict()
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise CheckpointError(f"'{source}': {len(unknown)} tensor(s) not in the model, e.g. '{unknown[0]}'"
                              f"{did_you_mean_key(unknown[0], own)}")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"'{source}': '{key}' has shape {tuple(value.shape)} in the file, "
                                  f"{tuple(own[key].shape)} in the model")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value.to(own[key].dtype))
    return {"loaded": sorted(tensors), "skipped": sorted(set(own) - set(tensors))}


def did_you_mean_key(key: str, keys: Iterable[str]) -> str:
    from ..errors import did_you_mean

    return did_you_mean(key, keys)
