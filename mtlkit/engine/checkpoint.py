"""Checkpoints, committed as one unit.

Layout of ``RUN/checkpoints``::

    step-<global step>/model.safetensors   tensors (nothing is ever unpickled)
    step-<global step>/meta.json           everything else, with the tensor file's size and sha256
    last.json, best.json                   pointers: {"format": ..., "dir": "step-<n>"}

A save writes a fresh step folder (each file to a temp name, fsynced, renamed; meta.json
last, so a folder is complete iff its meta.json exists and its tensors match), then
switches the pointers by atomic renames, then removes the step folders no pointer names.
Whenever the process dies, the previous pointer still names a complete folder; a folder is
never written into once made, so a pointer never sees it change. Loading follows the
pointer; without one (the process died in the first save) the newest complete folder is
used. Temp files (``.<name>.<random>.tmp``) and incomplete or superseded folders left by a
killed save are removed by the next save or resume.

The layout before step folders (``last.safetensors`` + ``last.json``) still loads: such a
JSON is a checkpoint itself rather than a pointer. The next save replaces it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..atomic import atomic_write_bytes, atomic_write_json, fsync_dir as _fsync_dir  # noqa: F401
from ..atomic import remove_quietly as _remove, remove_temp_files  # noqa: F401
# the trainer and snapshot.py import the state helpers from here
from .state import capture_rng, pack_state, rng_to_json, set_rng_state, unpack_state  # noqa: F401

FORMAT = "mtlkit-checkpoint"
POINTER_FORMAT = "mtlkit-checkpoint-pointer"
VERSION = 1
TENSORS, META = "model.safetensors", "meta.json"
POINTERS = ("best", "last")  # written in this order (see save_checkpoint)
_STEP_DIR = re.compile(r"step-(\d+)(?:\.(\d+))?")
NO_CHECKPOINT = "no checkpoint was completed (the run was interrupted before its first save)"


# -- small file helpers: the one atomic writer lives in mtlkit.atomic (re-exported here) ----
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


def check_recipe(meta: dict[str, Any], recipe_hash: str | None, where: str) -> None:
    """Refuse to resume a checkpoint made with another recipe."""
    if recipe_hash and meta.get("recipe_sha256") and meta["recipe_sha256"] != recipe_hash:
        raise CheckpointError(f"{where}: the run was made with a different recipe (sha256 "
                              f"{meta['recipe_sha256'][:12]}, now {recipe_hash[:12]})")


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


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Write the file atomically; returns its bytes (to hash without reading it back)."""
    from safetensors.torch import save

    data = save(_detach_for_save(tensors), metadata=metadata)
    atomic_write_bytes(Path(path), data)
    return data


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
def save_checkpoint(ckpt_dir: Path, tensors: dict[str, Tensor], meta: dict[str, Any],
                    names: Iterable[str] = ("last",)) -> Path:
    """Commit one checkpoint that the pointers ``names`` ("last", "best") then name;
    returns its step folder."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        ckpt_dir.mkdir(parents=True)
        _fsync_dir(ckpt_dir.parent)
    step = int(meta["global_step"])
    folder, n = ckpt_dir / f"step-{step}", 0
    while folder.exists():  # a pointer may name it (e.g. saved again after a resume)
        n += 1
        folder = ckpt_dir / f"step-{step}.{n}"
    folder.mkdir()
    _fsync_dir(ckpt_dir)
    data = write_safetensors(folder / TENSORS, tensors, metadata={"format": FORMAT})
    meta = dict(meta, format=FORMAT, version=VERSION, tensors_file=TENSORS, tensors_bytes=len(data),
                tensors_sha256=hashlib.sha256(data).hexdigest())
    atomic_write_json(folder / META, meta)
    # best before last: killed in between, the run resumes from the previous last and
    # decides best again; the other order would leave best behind the last's record of it
    for name in sorted(set(names), key=POINTERS.index):
        atomic_write_json(ckpt_dir / f"{name}.json", {"format": POINTER_FORMAT, "dir": folder.name})
    clean_checkpoints(ckpt_dir)
    return folder


def clean_checkpoints(ckpt_dir: Path, keep: Iterable[str | os.PathLike] = ()) -> None:
    """Remove what no pointer names: superseded or incomplete step folders, temp files,
    and the old layout's tensor files once their JSON is a pointer. ``keep``: folders
    to spare besides (the one a resume fell back to)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return
    keep_names = {Path(k).name for k in keep}
    for name in POINTERS:
        obj = _read_json(ckpt_dir / f"{name}.json")
        if _is_pointer(obj):
            keep_names.add(obj["dir"])
        elif isinstance(obj, dict) and obj.get("format") == FORMAT:
            keep_names.add(str(obj.get("tensors_file")))
    remove_temp_files(ckpt_dir)
    for entry in sorted(ckpt_dir.iterdir()):
        if entry.name in keep_names:
            continue
        if _STEP_DIR.fullmatch(entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name in ("last.safetensors", "best.safetensors"):
            _remove(entry)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _is_pointer(obj: Any) -> bool:
    return (isinstance(obj, dict) and obj.get("format") == POINTER_FORMAT and isinstance(obj.get("dir"), str)
            and _STEP_DIR.fullmatch(obj["dir"]) is not None)


def _follow(json_path: Path) -> Path | None:
    """A pointer -> the meta.json it names (None if torn, foreign or naming an incomplete
    folder); an old-layout checkpoint JSON -> itself."""
    obj = _read_json(json_path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return json_path
    if not _is_pointer(obj):
        return None
    meta = json_path.parent / obj["dir"] / META
    return meta if meta.is_file() else None


def _verified(json_path: Path) -> dict[str, Any]:
    """The meta of a complete checkpoint (its tensor file matches), or CheckpointError."""
    meta = _read_json(json_path)
    if meta is None:
        raise CheckpointError(f"'{json_path}' is not a readable checkpoint JSON")
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
        raise CheckpointError(f"'{tensor_path}' does not match '{json_path.name}' (truncated or replaced)")
    return meta


def _step_dirs(ckpt_dir: Path) -> list[Path]:
    """Step folders, newest first."""
    found = [(m, p) for p in ckpt_dir.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    found.sort(key=lambda mp: (int(mp[0][1]), int(mp[0][2] or 0)), reverse=True)
    return [p for _, p in found]


def checkpoint_meta(path: str | os.PathLike, which: str = "last") -> tuple[dict[str, Any], Path]:
    """(meta, meta.json path) of the complete checkpoint ``path`` stands for, or CheckpointError.

    ``path``: a run folder, its ``checkpoints`` folder, a step folder, a pointer or meta
    JSON, or a checkpoint's tensor file. For folders ``which`` picks the checkpoint:
    "last", or "best" -- the best, else the last (a run without ``best_metric`` has no best).
    """
    if which not in POINTERS:
        raise ValueError(f"which: 'last' or 'best', not {which!r}")
    p = Path(path)
    if p.is_dir():
        if (p / META).is_file():
            return _verified(p / META), p / META
        ckpt = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        for name in ("best", "last") if which == "best" else ("last",):
            target = _follow(ckpt / f"{name}.json")
            if target is not None:  # a pointer names a complete folder by construction: damage is an error
                return _verified(target), target
        steps = _step_dirs(ckpt)
        for folder in steps:  # no usable pointer: killed in the first save, or pointers lost
            try:
                return _verified(folder / META), folder / META
            except CheckpointError:
                continue
        marks = ("checkpoints", "recipe.toml", "log.jsonl")  # a run folder, written before the first save
        if steps or p.name == "checkpoints" or any((p / m).exists() for m in marks):
            raise CheckpointError(f"{path}: {NO_CHECKPOINT}")
        raise CheckpointError(f"'{p}' is not an mtlkit run folder (no checkpoints folder)")
    if p.suffix == ".safetensors":
        p = p.with_name(META) if p.name == TENSORS else p.with_suffix(".json")
    if p.suffix != ".json" or not p.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist (give a run folder or a checkpoint .json)")
    if _is_pointer(_read_json(p)):
        target = _follow(p)
        if target is None:
            raise CheckpointError(f"'{p}' names a step folder that is missing or incomplete")
        p = target
    return _verified(p), p


def resolve_checkpoint(path: str | os.PathLike, which: str = "last") -> Path:
    """The meta JSON of the complete checkpoint ``path`` stands for (see checkpoint_meta)."""
    return checkpoint_meta(path, which)[1]


def load_checkpoint(path: str | os.PathLike, which: str = "last") -> tuple[dict[str, Any], dict[str, Tensor], Path]:
    """(meta, tensors, meta JSON path) of a complete checkpoint, or CheckpointError."""
    meta, json_path = checkpoint_meta(path, which)
    return meta, read_safetensors(json_path.with_name(meta["tensors_file"])), json_path


# -- init_from ----------------------------------------------------------------------
def load_model_weights(model: nn.Module, path: str | os.PathLike,
                       key_filter: str | Iterable[str] | Callable[[str], bool] | None = None,
                       which: str = "best") -> dict[str, list[str]]:
    """Copy weights from a safetensors file (or an mtlkit checkpoint / run folder) into ``model``.

    Keys are model ``state_dict`` keys; an mtlkit checkpoint's ``model.`` prefix is
    stripped. ``key_filter`` keeps only some keys: a glob (``"backbone.*"``), a list of
    globs, or a callable. Every kept key must exist in the model with the same shape
    (CheckpointError otherwise); model keys the file does not provide keep their values.
    A run folder stands for its best, else last, checkpoint (``which="last"``: the last).
    Returns ``{"loaded": [...], "skipped": [model keys not loaded]}``.
    """
    p = Path(path)
    if p.is_dir() or p.suffix == ".json":
        meta, tensors, json_path = load_checkpoint(p, which)
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
