"""Training state as checkpoint parts: RNG states as JSON; model, optimiser and weighting
state as tensors (for the safetensors file) plus JSON (optimiser scalars).

Tensor keys: ``model.<state_dict key>``, ``weighting.<state_dict key>``, and
``optimizer.<parameter>.<state key>`` where ``<parameter>`` is the parameter's qualified
name, ``model.<name>`` or ``weighting.<name>``. Optimiser state is matched to parameters
by that name, so a model whose parameters are registered in another order (or that gained
a frozen parameter) still gets each parameter's own moments. Checkpoints of mtlkit
versions that stored it by position (``optimizer.<index>.<key>``) cannot be matched safely
and are refused for resuming; their weights still load (``load_model_weights``).
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
    """The global RNG states, raw. Taken when a checkpoint is written, never per step."""
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


OPTIMIZER_LAYOUT = "by-name"


def qualified_parameters(model: nn.Module, weighting: nn.Module | None) -> list[tuple[str, nn.Parameter]]:
    """``(model.<name> | weighting.<name>, parameter)``, each parameter once."""
    named = [(f"model.{n}", p) for n, p in model.named_parameters()]
    if weighting is not None:
        named += [(f"weighting.{n}", p) for n, p in weighting.named_parameters()]
    return named


def _group_names(optimizer: torch.optim.Optimizer, model: nn.Module, weighting: nn.Module | None) -> list[list[str]]:
    names = {id(p): n for n, p in reversed(qualified_parameters(model, weighting))}  # first name wins
    try:
        return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    except KeyError:
        raise CheckpointError("the optimiser holds a parameter that is neither the model's nor the "
                              "weighting's (it has no name to store its state under)") from None


def pack_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
               weighting: nn.Module | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors for the safetensors file and the JSON part of optimizer state."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if weighting is not None:
        tensors.update({f"weighting.{k}": v for k, v in weighting.state_dict().items()})
    opt_meta: dict[str, Any] = {}
    if optimizer is not None:
        groups, extra = [], {}
        for g, names in zip(optimizer.param_groups, _group_names(optimizer, model, weighting)):
            groups.append({**_jsonable({k: v for k, v in g.items() if k != "params"}), "params": names})
            for p, name in zip(g["params"], names):
                for key, value in optimizer.state.get(p, {}).items():
                    if isinstance(value, Tensor):
                        tensors[f"optimizer.{name}.{key}"] = value
                    else:
                        extra.setdefault(name, {})[key] = _jsonable(value)
        opt_meta = {"class": type(optimizer).__name__, "layout": OPTIMIZER_LAYOUT, "param_groups": groups,
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
            if _sized_on_first_use(module, key, value):
                continue
            raise CheckpointError(f"{where}: {prefix}{key} has shape {tuple(value.shape)} in the checkpoint, "
                                  f"{tuple(own[key].shape)} in the model")
    module.load_state_dict(given, strict=True)


def _sized_on_first_use(module: nn.Module, key: str, value: Tensor) -> bool:
    """A buffer registered empty and sized on first use (a weighting's K x P state, whose P
    is the gradients' length) takes the checkpoint's shape, keeping its dtype and device."""
    path, _, name = key.rpartition(".")
    owner = module.get_submodule(path) if path else module
    buf = owner._buffers.get(name)
    if buf is None or buf.numel() != 0 or buf.dim() != value.dim():
        return False
    owner._buffers[name] = torch.empty(value.shape, dtype=buf.dtype, device=buf.device)
    return True


def check_optimizer_layout(opt_meta: dict[str, Any], where: str) -> None:
    """Refuse optimiser state stored by position (older mtlkit): one line naming the file."""
    if opt_meta.get("layout") != OPTIMIZER_LAYOUT:
        raise CheckpointError(f"{where}: written by an older mtlkit, which stored optimiser state by position; "
                              f"it cannot be matched to parameters safely, so this run cannot be resumed "
                              f"(start a new one; init_from can take its weights)")


def unpack_state(tensors: dict[str, Tensor], opt_meta: dict[str, Any], model: nn.Module,
                 optimizer: torch.optim.Optimizer | None, weighting: nn.Module | None, where: str) -> None:
    if optimizer is not None:  # before anything changes: a refused resume leaves the trainer as it was
        check_optimizer_layout(opt_meta, where)
        if opt_meta.get("class") != type(optimizer).__name__:
            raise CheckpointError(f"{where}: the checkpoint's optimiser is {opt_meta.get('class')}, "
                                  f"this run's is {type(optimizer).__name__}")
        state_dict = _optimizer_state_by_name(tensors, opt_meta, _group_names(optimizer, model, weighting), where)
    _restore_module(model, tensors, "model.", where)
    if weighting is not None:
        _restore_module(weighting, tensors, "weighting.", where)
    if optimizer is None:
        return
    keep_this_runs_capturable(state_dict, optimizer)
    try:
        optimizer.load_state_dict(state_dict)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: optimiser state does not fit this model ({exc})") from None


def keep_this_runs_capturable(state_dict: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """``capturable`` (Adam's step counts on the device, for CUDA graphs) is this run's
    choice (training.cuda_graph, the device), not the checkpoint's: a graph run's state
    resumes on a CPU, and a CPU run's under graphs. Set before loading, so the step counts
    go where that choice wants them."""
    for saved, now in zip(state_dict["param_groups"], optimizer.param_groups):
        if "capturable" in now:
            saved["capturable"] = now["capturable"]


def _optimizer_state_by_name(tensors: dict[str, Tensor], opt_meta: dict[str, Any], names_now: list[list[str]],
                             where: str) -> dict[str, Any]:
    """The checkpoint's optimiser state as ``optimizer.load_state_dict`` wants it for this
    optimiser: positions (this run's parameter order) filled by name."""
    saved = opt_meta.get("param_groups", [])
    if len(saved) != len(names_now):
        raise CheckpointError(f"{where}: the checkpoint's optimiser has {len(saved)} parameter group(s), "
                              f"this run's {len(names_now)} (the weighting's parameters form the second)")
    for g, now in zip(saved, names_now):
        then = g.get("params", [])
        gone, new = sorted(set(then) - set(now)), sorted(set(now) - set(then))
        if gone or new:
            name, what = (new[0], "is trained now but was not") if new else (gone[0], "was trained but is not now")
            raise CheckpointError(f"{where}: optimiser state does not fit this model: '{name}' {what}")
    by_name: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            # state keys (exp_avg, momentum_buffer, ...) have no dot; parameter names do
            name, state_key = key[len("optimizer."):].rsplit(".", 1)
            by_name.setdefault(name, {})[state_key] = value
    for name, extra in opt_meta.get("extra_state", {}).items():
        by_name.setdefault(name, {}).update(extra)
    state: dict[int, dict[str, Any]] = {}
    groups, index = [], 0
    for g, now in zip(saved, names_now):
        g = {k: v for k, v in g.items() if k != "params"}
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        g["params"] = list(range(index, index + len(now)))
        for name in now:
            if name in by_name:  # a parameter that never had a gradient has no state
                state[index] = by_name[name]
            index += 1
        groups.append(g)
    return {"state": state, "param_groups": groups}
