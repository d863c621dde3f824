"""Two CPU processes under torch.distributed.run (gloo): same weights on both ranks, and the
distributed evaluation equals a single-process evaluation of the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtlkit.engine import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_common import MeanGrad, Uncertainty, make_data, make_model, make_tasks  # noqa: E402

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    sys.path.insert(0, {tests!r})
    from safetensors.torch import save_file
    from test_engine_common import MeanGrad, Uncertainty, make_data, make_model, make_tasks
    from mtlkit.engine import Trainer
    from mtlkit.engine.distributed import shutdown
    from mtlkit.plugin_manager import get_registry

    torch.set_num_threads(1)
    out, kind = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    tasks = make_tasks()
    train, val = make_data(num_train=20, num_val=7)
    model = make_model(tasks, seed=rank)  # different init per rank: DDP must broadcast rank 0's
    weighting = MeanGrad(list(tasks)) if kind == "grad" else Uncertainty(list(tasks))
    run_dir = os.path.join(out, "run")
    os.makedirs(run_dir, exist_ok=True)
    csv_logger = get_registry().get("logger", "csv").build({{"file": f"rank{{rank}}.csv"}})
    trainer = Trainer(model, tasks, train, val, weighting=weighting,
                      training=dict(epochs=2, batch_size=3, seed=5, device="cpu"),
                      run_dir=run_dir, quiet=True, loggers={{"csv": csv_logger}})
    trainer.fit()
    metrics = trainer.evaluate()
    state = {{"model." + k: v.contiguous() for k, v in model.state_dict().items()}}
    state.update({{"weighting." + k: v.contiguous() for k, v in weighting.state_dict().items()}})
    save_file(state, os.path.join(out, f"rank{{rank}}.safetensors"))
    with open(os.path.join(out, f"rank{{rank}}.json"), "w") as fh:
        json.dump({{"metrics": metrics, "world": trainer.ctx.world_size,
                   "steps": trainer.global_step}}, fh)
    shutdown()
''')


def launch(tmp_path: Path, kind: str) -> None:
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MTLKIT_LOAD_ENTRY_POINTS="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(script), str(tmp_path), kind]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_ddp_two_ranks(tmp_path, kind):
    launch(tmp_path, kind)
    s0, s1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert s0.keys() == s1.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"ranks differ on {k}"
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == 2 and r0["metrics"] == r1["metrics"]
    # 20 samples / 2 ranks = 10 per rank, batches of 3 -> 4 steps per epoch, 2 epochs
    assert r0["steps"] == 8

    # rank 0 alone wrote the run folder
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.json").is_file()
    steps = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if '"step"' in l]
    assert len([r for r in steps if r["type"] == "step"]) == 8
    # and alone fed the loggers (each rank's csv logger was given its own file name)
    assert not (run / "rank1.csv").exists()
    rows = (run / "rank0.csv").read_text().splitlines()
    assert sorted(int(r.split(",")[2]) for r in rows if ",train/loss/shape," in r) == list(range(1, 9))

    # single-process evaluation of the same weights on the whole (odd-sized) val set
    tasks = make_tasks()
    train, val = make_data(num_train=20, num_val=7)
    model = make_model(tasks)
    model.load_state_dict({k[len("model."):]: v for k, v in s0.items() if k.startswith("model.")})
    single = Trainer(model, tasks, train, val, training=dict(batch_size=2, device="cpu"), quiet=True).evaluate()
    assert single.keys() == r0["metrics"].keys()
    for t in single:
        # counts are exact; the summed NLL differs only by float summation order
        assert single[t]["accuracy"] == r0["metrics"][t]["accuracy"]
        assert single[t]["loss"] == pytest.approx(r0["metrics"][t]["loss"], rel=1e-5)


@pytest.mark.parametrize("world", [2, 1])  # torchrun --nproc_per_node=1 joins a group of one too
@pytest.mark.parametrize("device, backend, index", [("auto", "nccl", 1), ("cuda", "nccl", 1), ("cpu", "gloo", None)])
def test_torchrun_joins_nccl_on_its_local_gpu_and_gloo_on_cpus(monkeypatch, device, backend, index, world):
    """Under torchrun the one setup path picks the backend by device (nccl for CUDA), and
    local rank r trains on GPU r (mod the node's GPUs). The process group and the GPUs are
    stood in for: their calls are recorded."""
    import torch.distributed as dist

    from mtlkit.engine import distributed as D

    calls, joined = {}, []
    monkeypatch.setenv("WORLD_SIZE", str(world)), monkeypatch.setenv("RANK", "3"), monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "r1")  # what torchrun sets (torch's is_torchelastic_launched)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("set_device", i))
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(dist, "get_backend", lambda: joined[0])
    ctx = D.setup(device)
    assert joined == [backend] and ctx.backend == backend and ctx.enabled
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (3, 4, 3)
    assert ctx.device == (torch.device("cuda", index) if index is not None else torch.device("cpu"))
    assert calls.get("set_device") == index


def test_a_plain_process_joins_no_group(monkeypatch):
    import torch.distributed as dist

    from mtlkit.engine import distributed as D

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: pytest.fail("joined a group"))
    ctx = D.setup("cpu")
    assert (ctx.backend, ctx.enabled, ctx.world_size, ctx.rank) == (None, False, 1, 0)
