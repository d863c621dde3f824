"""A SIGTERM sent to a training run's whole process group (GNU timeout, a batch scheduler's
preemption) stops it as one sent to the main process alone does: the step finishes, a
checkpoint is saved, exit 130. DataLoader workers leave the group, so it never reaches them
(the main process shuts them down); before, they died of it and the main process failed with
"DataLoader worker ... is killed by signal: Terminated" (seen on an H200 while inductor
compiled the first step). They must still die of a SIGTERM sent to them alone: multiprocessing
ends daemonic workers so at the main process's exit, and waits for them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtlkit.testing import TINY_CLASSIFICATION_RECIPE

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGTERM are POSIX")


def first_step_logged(run_dir: Path) -> bool:
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return False
    return any(json.loads(line).get("type") == "step" for line in log.read_text().splitlines() if line.strip())


@pytest.mark.timeout(180)
def test_sigterm_to_the_process_group_stops_after_the_step_with_workers_alive(tmp_path):
    recipe = tmp_path / "r.toml"
    # many small steps, two loader workers, one log line per step
    recipe.write_text(TINY_CLASSIFICATION_RECIPE.replace("num_train = 8", "num_train = 4000").replace(
        "epochs = 1", "epochs = 50\nnum_workers = 2\nlog_interval = 1"))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mtlkit", "run", str(recipe), "--run-dir", str(run), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: the workers join it
    try:
        deadline = time.monotonic() + 120
        while not first_step_logged(run):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no training step within 120 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)  # the main process and every worker
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "killed by signal" not in err, err
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "continue with mtlkit run --resume" in err
    from mtlkit.engine.checkpoint import load_checkpoint

    meta = load_checkpoint(run)[0]
    assert meta["global_step"] >= 1


EXIT_WITH_A_LIVE_WORKER_ITERATOR = """
import torch
from torch.utils.data import TensorDataset
from mtlkit.engine.config import TrainingConfig
from mtlkit.engine.sampling import make_loader

loader = make_loader(TensorDataset(torch.arange(64.0)), TrainingConfig(num_workers=2), torch.device("cpu"),
                     seed=0, batch_size=4)
batches = iter(loader)
first = next(batches)  # the iterator and its two workers are alive when the interpreter exits
print("batch", first[0].tolist(), flush=True)
"""


@pytest.mark.timeout(180)
def test_a_process_exits_with_a_worker_iterator_still_alive():
    # With workers ignoring SIGTERM this exit hung forever (multiprocessing's exit terminates
    # daemonic children, then joins them): the whole test suite's process never ended.
    try:
        done = subprocess.run([sys.executable, "-c", EXIT_WITH_A_LIVE_WORKER_ITERATOR], capture_output=True,
                              text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit within 90 s: its DataLoader workers outlived the exit")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("batch ")
