"""The CLI end to end on a tiny recipe: run, resume, show, list, plugins, compare, plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mtlkit.cli import main
from mtlkit.engine.checkpoint import load_checkpoint, resolve_checkpoint

TINY = ["--set", "model.backbone.params.widths=[4, 8]", "--set", "data.params.size=8",
        "--set", "data.params.num_train=16", "--set", "data.params.num_val=8",
        "--set", "training.batch_size=8", "--set", "training.device='cpu'"]


def run_main(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def finished_run(tmp_path, capsys):
    run = tmp_path / "runs" / "shapes-a"
    rc, out, err = run_main(["run", "shapes", *TINY, "--set", "training.epochs=2", "--quiet",
                             "--run-dir", str(run)], capsys)
    assert rc == 0, err
    return run


def test_run_writes_a_complete_run_folder(finished_run):
    run = finished_run
    for name in ("recipe.toml", "log.jsonl", "results.json", "checkpoints/last.json", "checkpoints/best.json"):
        assert (run / name).is_file(), name
    # the pointers name complete step folders (the default best_metric: best and last may differ)
    for pointer in ("last", "best"):
        step = run / "checkpoints" / json.loads((run / "checkpoints" / f"{pointer}.json").read_text())["dir"]
        assert (step / "model.safetensors").is_file() and (step / "meta.json").is_file(), step
    # the resolved recipe holds the overrides and every default, and loads again
    from mtlkit.recipe.loader import load_recipe

    resolved = load_recipe(run / "recipe.toml")
    assert resolved.recipe.training.epochs == 2
    assert resolved.recipe.model.backbone.params == {"in_channels": 3, "widths": [4, 8]}
    records = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "eval"] == [1, 2]
    assert sum(r["type"] == "step" for r in records) == 4  # 16 samples / batch 8 x 2 epochs


def test_resume_through_the_cli_matches_an_uninterrupted_run(tmp_path, capsys):
    full, half = tmp_path / "full", tmp_path / "half"
    assert run_main(["run", "shapes", *TINY, "--set", "training.epochs=2", "--quiet", "--run-dir", str(full)],
                    capsys)[0] == 0
    assert run_main(["run", "shapes", *TINY, "--set", "training.epochs=1", "--quiet", "--run-dir", str(half)],
                    capsys)[0] == 0
    # the half run's recipe says 1 epoch: resume with 2
    rc, out, err = run_main(["run", "--resume", str(half), "--set", "training.epochs=2", "--quiet"], capsys)
    assert rc == 0, err
    a = load_file(str(resolve_checkpoint(full).with_name("model.safetensors")))
    b = load_file(str(resolve_checkpoint(half).with_name("model.safetensors")))
    model_keys = [k for k in a if k.startswith("model.")]
    assert model_keys and all(torch.equal(a[k], b[k]) for k in model_keys)


def test_show_list_plugins(capsys):
    rc, out, _ = run_main(["show", "shapes", *TINY], capsys)
    assert rc == 0 and "parameters per part" in out and "total" in out
    # the total printed equals an independent count of the composed model
    import mtlkit

    model = mtlkit.compose(backbone=("small_cnn", {"widths": [4, 8]}),
                           tasks={t: ("classification", {"num_classes": n, "target": t})
                                  for t, n in (("shape", 4), ("colour", 4), ("size", 3))})
    assert f"{sum(p.numel() for p in model.parameters()):,}" in out
    rc, out, _ = run_main(["list", "weighting"], capsys)
    assert rc == 0 and "pcgrad" in out and "segnet" not in out
    rc, out, _ = run_main(["list", "backbone", "small*"], capsys)
    assert "small_cnn" in out and "segnet" not in out
    rc, out, _ = run_main(["plugins"], capsys)
    assert rc == 0 and "mtlkit.plugins.weightings.equal" in out


def test_compare_and_plot(finished_run, tmp_path, capsys):
    out_prefix = tmp_path / "table"
    rc, out, err = run_main(["compare", str(finished_run), "--last", "2", "--baseline", str(finished_run),
                             "--out", str(out_prefix)], capsys)
    assert rc == 0, err
    md = (tmp_path / "table.md").read_text()
    csv_text = (tmp_path / "table.csv").read_text()
    assert "shape/accuracy" in md and "delta_m%" in csv_text
    # the table holds the mean of the last 2 evaluations, and Delta_m against itself is 0
    evals = [json.loads(l) for l in (finished_run / "log.jsonl").read_text().splitlines()
             if json.loads(l)["type"] == "eval"]
    mean_acc = sum(e["metrics"]["shape"]["accuracy"] for e in evals[-2:]) / 2
    row = csv_text.splitlines()[1].split(",")
    header = csv_text.splitlines()[0].split(",")
    assert abs(float(row[header.index("shape/accuracy")]) - mean_acc) < 1e-3
    assert float(row[header.index("delta_m%")]) == 0.0
    rc, out, err = run_main(["plot", str(finished_run)], capsys)
    assert rc == 0, err
    for name in ("curves.png", "predictions.png"):
        data = (finished_run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_module_entry_in_a_real_process(tmp_path):
    """The one plain CLI subprocess (the in-process tests cover the rest): `python -m mtlkit`
    runs main, and a user error leaves the process as one line and exit code 2, no traceback."""
    env = dict(os.environ, MTLKIT_LOAD_ENTRY_POINTS="0", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "mtlkit", "run", "quickstrt"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "did you mean 'quickstart'" in lines[0] and list(tmp_path.iterdir()) == []


def test_torchrun_cli_two_processes(tmp_path):
    """`torchrun -m mtlkit run RECIPE`: both ranks agree on one run folder, rank 0 writes it,
    and the distributed evaluation of the final weights equals a single-process one."""
    env = dict(os.environ, MTLKIT_LOAD_ENTRY_POINTS="0", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "-m", "mtlkit", "run", "shapes", *TINY, "--set", "training.epochs=1", "--set", "data.params.num_val=7",
         "--quiet", "--runs-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list((tmp_path / "runs" / "shapes").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    records = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    # 16 training samples over 2 ranks, batch 8 each: one step per epoch
    assert sum(r["type"] == "step" for r in records) == 1
    logged = [r for r in records if r["type"] == "eval"][-1]["metrics"]

    from mtlkit.build import build_parts
    from mtlkit.engine import Trainer, load_model_weights
    from mtlkit.recipe.loader import load_recipe

    parts = build_parts(load_recipe(run / "recipe.toml").recipe)
    load_model_weights(parts.model, run / "checkpoints" / "last.json")
    single = Trainer(parts.model, parts.tasks, parts.train_data, parts.val_data, training={"device": "cpu"},
                     quiet=True).evaluate()
    for task, values in single.items():
        assert logged[task]["accuracy"] == pytest.approx(values["accuracy"], abs=1e-9)
        assert logged[task]["loss"] == pytest.approx(values["loss"], rel=1e-5)


def test_torchrun_with_one_process_joins_gloo_and_trains_exactly_as_one_plain_process(tmp_path, capsys):
    """`torchrun --nproc_per_node=1`: the distributed path over one rank (a gloo group, DDP, the
    collectives; on CUDA the same path joins nccl, which a one-GPU machine can test so), and the
    same weights, bit for bit, as a plain process: DDP over one rank changes nothing."""
    env = dict(os.environ, MTLKIT_LOAD_ENTRY_POINTS="0", OMP_NUM_THREADS="1")
    args = ["run", "shapes", *TINY, "--set", "training.epochs=2", "--set", "training.device=cpu", "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone",
                           "-m", "mtlkit", *args, "--run-dir", str(tmp_path / "torchrun")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rc, _, err = run_main([*args, "--run-dir", str(tmp_path / "plain")], capsys)
    assert rc == 0, err
    (meta_t, state_t, _), (meta_p, state_p, _) = (load_checkpoint(tmp_path / name) for name in ("torchrun", "plain"))
    assert (meta_t["process_group"], meta_t["world_size"]) == ("gloo", 1)
    assert meta_p["process_group"] is None and meta_t["global_step"] == meta_p["global_step"] > 0
    assert state_t.keys() == state_p.keys()
    assert [k for k in state_t if not torch.equal(state_t[k], state_p[k])] == []


def test_params_prints_the_papers_column(capsys):
    rc, out, err = run_main(["params", "nyuv2/mtan", "nyuv2/split_wide"], capsys)
    assert rc == 0, err
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.splitlines() if line.startswith("│")}
    # MTAN: 44,229,073 parameters over one single-task SegNet (24,981,069), paper 1.77
    assert rows["nyuv2/mtan"][1:] == ["44,229,073", f"{44_229_073 / 24_981_069:.3f}", "1.77"]
    # Split Wide is measured against the standard SegNet, not the widened one
    assert rows["nyuv2/split_wide"][1:] == ["43,934,161", f"{43_934_161 / 24_981_069:.3f}", "1.75"]


def test_delta_m_per_evaluation_against_an_earlier_run(finished_run, tmp_path, capsys):
    """baselines = {task: RUN_DIR}: every evaluation logs Delta_m% against that run's result."""
    baseline = json.loads((finished_run / "results.json").read_text())["final"]
    run = tmp_path / "mtl"
    rc, out, err = run_main(["run", "shapes", *TINY, "--set", "training.epochs=1", "--set", "training.seed=3",
                             "--set", f"baselines.shape='{finished_run}'",
                             "--set", "baselines.size={accuracy = 50.0}", "--run-dir", str(run)], capsys)
    assert rc == 0, err
    assert "Delta_m" in out
    ev = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if '"eval"' in l][-1]
    m = ev["metrics"]
    # by hand: accuracy is higher-is-better; the baseline run's validation loss is recorded
    # but is no metric of Delta_m (mtlkit.delta_m.NOT_METRICS): mean over the 2 accuracies
    changes = [-(m["shape"]["accuracy"] - baseline["shape"]["accuracy"]) / baseline["shape"]["accuracy"],
               -(m["size"]["accuracy"] - 50.0) / 50.0]
    assert ev["delta_m"] == pytest.approx(100 * sum(changes) / 2, rel=1e-9)
    rc, _, err = run_main(["run", "shapes", *TINY, "--set", "baselines.shape='/no/such/run'",
                           "--run-dir", str(tmp_path / "x")], capsys)
    assert rc == 2 and "[baselines] shape" in err and not (tmp_path / "x").exists()


def test_synth_scenes_command_writes_the_nyuv2_layout(tmp_path, capsys):
    out = tmp_path / "scenes"
    rc, _, err = run_main(["data", "synth-scenes", str(out), "--n", "3", "--n-val", "2", "--height", "32",
                           "--width", "48", "--num-classes", "7"], capsys)
    assert rc == 0, err
    from mtlkit.plugin_manager import get_registry

    val = get_registry().get("dataset", "nyuv2").build({"root": str(out), "num_classes": 7}, split="val")
    same = get_registry().get("dataset", "synthetic_scenes").build(
        {"height": 32, "width": 48, "num_train": 3, "num_val": 2, "num_classes": 7}, split="val")
    assert len(val) == 2
    for key in ("image", "segmentation", "depth", "normal"):
        assert torch.allclose(val[1][key].float(), same[1][key].float(), atol=1e-6), key
    before = sorted(p.name for p in out.rglob("*"))
    rc, _, err = run_main(["data", "synth-scenes", str(out), "--n", "1"], capsys)
    assert rc == 2 and str(out) in err and sorted(p.name for p in out.rglob("*")) == before


def test_plot_attention_masks_of_an_mtan_run(tmp_path, capsys):
    run = tmp_path / "qs"
    rc, _, err = run_main(["run", "quickstart", "--set", "model.backbone.params.width=0.0625",
                           "--set", "data.params.height=32", "--set", "data.params.width=32",
                           "--set", "data.params.num_train=4", "--set", "data.params.num_val=2",
                           "--set", "training.epochs=1", "--set", "training.batch_size=2",
                           "--set", "training.device='cpu'", "--quiet", "--run-dir", str(run)], capsys)
    assert rc == 0, err
    rc, out, err = run_main(["plot", str(run), "--attention", "--images", "2"], capsys)
    assert rc == 0, err
    assert (run / "attention.png").read_bytes()[:4] == b"\x89PNG"
    from mtlkit.plots import capture_attention_masks, load_run_model

    parts = load_run_model(run)
    x = torch.rand(2, 3, 32, 32)
    masks = capture_attention_masks(parts.model, x, list(parts.tasks))
    # one sigmoid mask per SegNet tap (5 encoder + 5 decoder levels) for every task
    assert all(len(v) == len(parts.model.backbone.feature_info) == 10 for v in masks.values())
    assert all(0 <= float(m.min()) and float(m.max()) <= 1 for v in masks.values() for m in v)


def test_freeze_shared_trains_only_task_specific_parts(tmp_path, capsys):
    """model.freeze_shared (the Decathlon 'feature' baseline): the shared backbone's weights
    and BatchNorm statistics stay as initialised, the heads train."""
    from mtlkit.build import build_parts
    from mtlkit.recipe.loader import load_recipe

    sets = [*TINY, "--set", "training.epochs=1", "--set", "model.freeze_shared=true"]
    run = tmp_path / "frozen"
    rc, _, err = run_main(["run", "shapes", *sets, "--quiet", "--run-dir", str(run)], capsys)
    assert rc == 0, err
    fresh = build_parts(load_recipe(run / "recipe.toml").recipe, with_data=False).model.state_dict()
    trained = {k[len("model."):]: v for k, v in load_checkpoint(run)[1].items() if k.startswith("model.")}
    backbone = [k for k in fresh if k.startswith("backbone.")]
    heads = [k for k in fresh if k.startswith("heads.")]
    assert backbone and heads
    assert all(torch.equal(fresh[k], trained[k]) for k in backbone)  # weights and running stats
    assert any(not torch.equal(fresh[k], trained[k]) for k in heads)
