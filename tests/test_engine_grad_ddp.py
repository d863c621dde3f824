"""Gradient-level weightings under torchrun (2 CPU processes, gloo): every value a weighting
reads must be the global batch's, so 2 processes x batch B train exactly like 1 process x
batch 2B on the same samples, and the replicas never drift apart.

Every registered gradient-level weighting runs with its defaults and with each value of
each of its choice options (MGDA normalization none/l2/loss/loss+, PCGrad reduction,
CAGrad rescale; CAGrad c = 0 too), on a tiny CNN without BatchNorm (compared with one
process) and with BatchNorm (batch statistics are per rank by design in DDP, so the two
ranks are compared with each other). One torchrun launch trains every configuration.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from mtlkit.engine import Trainer
from mtlkit.plugin_manager import get_registry

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_common import make_data, make_model, make_tasks  # noqa: E402

TASKS = ("shape", "colour", "size")
NUM_TRAIN, BATCH, EPOCHS = 16, 4, 2  # per rank: 8 samples, 2 steps an epoch, 4 steps in all
# numeric options that switch a code path (choice options are found from the params models)
EXTRA_OPTIONS = {"cagrad": [{"c": 0.0}], "nash_mtl": [{"update_weights_every": 2, "max_norm": 1.0}]}
# loss-level methods that own their step (they read values across ranks) run here too; base
# params for methods that need them (no validation split here: Auto-Lambda's meta batch is a
# training one). Auto-Lambda's extra batch is each rank's own: ranks agree with each other,
# not with one process (which draws other samples).
BASE_PARAMS = {"auto_lambda": {"split": "train", "lr": 0.05}}
RANKS_ONLY = {"auto_lambda"}
# choices of where a method's data comes from, not of how it aggregates: the trainers here
# have no validation split to draw Auto-Lambda's meta batch from
DATA_OPTIONS = {("auto_lambda", "split")}
# A large step makes any difference in the chosen weights show in the parameters. Nash-MTL's
# update does not shrink with the gradients (g_k . d = 1 / alpha_k): at 0.3 it jumps to
# where G G^T is near singular and its weights amplify float rounding ~1e3-fold.
LR = {"nash_mtl": 0.02}


def grad_level_configs() -> list[tuple[str, dict]]:
    """(name, params) for every gradient-level weighting (and every one that owns its step)
    and every value of its choice options."""
    from mtlkit.contracts import Weighting

    out = []
    for name, comp in sorted(get_registry().components["weighting"].items()):
        f = comp.factory
        owns_step = getattr(f, "backward", None) is not Weighting.backward or \
            getattr(f, "on_step_end", None) is not Weighting.on_step_end
        if getattr(f, "requires_grads", None) != "shared" and not owns_step:
            continue
        variants = [dict(BASE_PARAMS.get(name, {}))]
        for field, info in comp.params.model_fields.items():
            if (name, field) in DATA_OPTIONS:
                continue
            if typing.get_origin(info.annotation) is typing.Literal:
                variants += [{**variants[0], field: v} for v in typing.get_args(info.annotation) if v != info.default]
        for v in variants + EXTRA_OPTIONS.get(name, []):
            if (name, v) not in out:
                out.append((name, v))
    return out


def key(name: str, params: dict, bn: bool) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted(params.items())) or "default"
    return f"{name}[{opts}]{'bn' if bn else 'plain'}"


def train(name: str, params: dict, bn: bool, batch_size: int) -> dict[str, torch.Tensor]:
    """A few SGD steps of a tiny 3-task CNN; its parameters after training."""
    torch.manual_seed(0)
    tasks = make_tasks(TASKS)
    model = make_model(tasks, seed=0)
    if not bn:
        for seq in list(model.backbone.first) + list(model.backbone.second):
            seq[1] = nn.Identity()
    weighting = get_registry().get("weighting", name).build(params, task_names=list(tasks))
    train_data, _ = make_data(num_train=NUM_TRAIN, num_val=2)
    Trainer(model, tasks, train_data, weighting=weighting, optimizer=dict(name="sgd", lr=LR.get(name, 0.3)),
            training=dict(epochs=EPOCHS, batch_size=batch_size, seed=3, device="cpu"), quiet=True).fit()
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def run_all(out: str, rank: int) -> None:
    """The body of each torchrun worker: every configuration, with and without BatchNorm."""
    from safetensors.torch import save_file

    state = {}
    for name, params in grad_level_configs():
        for bn in (False, True):
            for k, v in train(name, params, bn, BATCH).items():
                state[f"{key(name, params, bn)}/{k}"] = v.contiguous()
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))


SCRIPT = textwrap.dedent('''
    import os, sys
    import torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from {module} import run_all
    from mtlkit.engine.distributed import shutdown
    run_all(sys.argv[1], int(os.environ["RANK"]))
    shutdown()
''')


def start_ranks(tmp_path: Path, module: str) -> subprocess.Popen:
    """Two gloo ranks under torchrun, each running ``<module>.run_all(tmp_path, rank)``
    (a test module in this folder); output piped, one thread each."""
    script = tmp_path / f"{module}_worker.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), module=module))
    env = dict(os.environ, OMP_NUM_THREADS="1", MTLKIT_LOAD_ENTRY_POINTS="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(script), str(tmp_path)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| over all parameters, relative to the largest |b|."""
    assert a.keys() == b.keys()
    scale = max(float(v.abs().max()) for v in b.values())
    return max(float((a[k] - b[k]).abs().max()) for k in a) / scale


def test_grad_level_ddp_equals_one_process_on_the_global_batch(tmp_path):
    configs = grad_level_configs()
    assert {n for n, _ in configs} >= {"mgda", "cagrad", "imtl_g", "nash_mtl", "pcgrad", "aligned_mtl", "upgrad",
                                       "dualproj", "config", "fairgrad", "moco", "excess_mtl", "db_mtl",
                                       "gradvac", "imtl", "famo", "gradnorm", "graddrop", "mgda_ub",
                                       "auto_lambda"}
    proc = start_ranks(tmp_path, "test_engine_grad_ddp")
    try:  # the one-process references train while the workers start up
        start = dict(make_model(make_tasks(TASKS), seed=0).named_parameters())
        singles = {}
        for name, params in configs:
            single = singles[key(name, params, False)] = train(name, params, False, 2 * BATCH)
            moved = rel_diff(single, {k: v.detach() for k, v in start.items() if k in single})
            assert moved > 1e-2, f"{name} {params}: training barely moved the weights ({moved:.2e})"
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log[-6000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]

    def params_of(state: dict, k: str) -> dict[str, torch.Tensor]:
        return {n[len(k) + 1:]: v for n, v in state.items() if n.startswith(k + "/")}

    failures = []
    for name, params in configs:
        # float summation order differs (two half batches vs one batch): ~1e-7 relative
        plain = key(name, params, False)
        if name in RANKS_ONLY:
            d = rel_diff(params_of(ranks[0], plain), params_of(ranks[1], plain))
            if d > 1e-6:
                failures.append(f"{plain}: rank 0 vs rank 1 {d:.2e}")
        for r in (0, 1) if name not in RANKS_ONLY else ():
            d = rel_diff(params_of(ranks[r], plain), singles[plain])
            if d > 2e-5:
                failures.append(f"{plain}: rank {r} vs one process {d:.2e}")
        # BatchNorm: per-rank batch statistics, but the replicas must stay identical
        with_bn = key(name, params, True)
        d = rel_diff(params_of(ranks[0], with_bn), params_of(ranks[1], with_bn))
        if d > 1e-6:
            failures.append(f"{with_bn}: rank 0 vs rank 1 {d:.2e}")
    assert not failures, "\n".join(failures)
