"""Training state as checkpoint parts: RNG states as JSON; model, optimiser and weighting
state as tensors (for the safetensors file) plus JSON (optimiser scalars).

Tensor keys: ``model.<state_dict key>``, ``optimizer.<param index>.<state key>``,
``weighting.<state_dict key>``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import CheckpointError


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
