"""training.precision / compile / channels_last / deterministic / num_workers on the CPU.

The same code paths run on CUDA (tests/test_gpu.py checks them there); on the CPU autocast
supports bf16 and fp16 and torch.amp.GradScaler("cpu") scales losses, so every branch of
the engine's precision handling is exercised here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mtlkit.engine import Trainer
from mtlkit.engine.checkpoint import load_checkpoint
from mtlkit.engine.precision import loader_workers
from mtlkit.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_common import MeanGrad, make_data, make_model, make_tasks, state_equal  # noqa: E402

CFG = dict(epochs=2, batch_size=4, log_interval=100, seed=5, device="cpu")  # 16 samples: 4 steps an epoch


def build(run_dir=None, weighting=None, optimizer=None, **training):
    tasks = make_tasks()
    train, val = make_data(num_train=16)
    model = make_model(tasks)
    trainer = Trainer(model, tasks, train, val, weighting=weighting(list(tasks)) if weighting else None,
                      optimizer=optimizer or {"name": "sgd", "lr": 0.05}, training={**CFG, **training},
                      run_dir=run_dir, quiet=True)
    return trainer, model


def conv_output_dtypes(model):
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    return seen


def max_rel_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return max(((sa[k].float() - sb[k].float()).norm() / (sb[k].float().norm() + 1e-12)).item()
               for k in sa if sa[k].is_floating_point())


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
@pytest.mark.parametrize("weighting", [None, MeanGrad], ids=["loss-level", "gradient-level"])
def test_autocast_runs_the_forward_in_low_precision_and_tracks_fp32(precision, dtype, weighting):
    ref, ref_model = build(weighting=weighting, epochs=1)
    ref.fit()
    low, low_model = build(weighting=weighting, epochs=1, precision=precision)
    seen = conv_output_dtypes(low_model)
    metrics = low.fit()
    assert seen and set(seen) == {dtype}  # the convolutions ran in the low precision
    assert all(p.dtype == torch.float32 for p in low_model.parameters())  # master weights stay fp32
    assert all(v == v for m in metrics.values() for v in m.values())
    # 4 SGD steps from the same start: low precision moves the weights nearly as fp32 does
    moved = max_rel_diff(low_model, make_model(make_tasks()))
    assert max_rel_diff(low_model, ref_model) < 0.1 * max(moved, 1e-3) + 2e-2


def test_fp16_scaler_state_is_checkpointed_and_resume_is_bit_identical(tmp_path):
    for d in "abc":
        (tmp_path / d).mkdir()
    whole, whole_model = build(tmp_path / "a", precision="fp16")
    whole.fit()
    first, _ = build(tmp_path / "b", precision="fp16", epochs=1)
    first.fit()
    meta = load_checkpoint(tmp_path / "b")[0]
    assert meta["scaler"]["scale"] == first.precision.scaler.get_scale() > 0
    second, second_model = build(tmp_path / "b", precision="fp16")
    second.fit(resume_from=tmp_path / "b")
    assert state_equal(second_model, whole_model)
    assert second.precision.scaler.state_dict() == whole.precision.scaler.state_dict()
    # a checkpoint without scaler state cannot resume an fp16 run
    build(tmp_path / "c", epochs=1)[0].fit()
    with pytest.raises(ConfigError, match="loss-scaler state"):
        build(tmp_path / "c", precision="fp16")[0].fit(resume_from=tmp_path / "c")


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("weighting", [None, MeanGrad], ids=["loss-level", "gradient-level"])
def test_fp16_overflow_skips_the_step_and_lowers_the_scale(weighting, fused):
    trainer, model = build(weighting=weighting, epochs=1, precision="fp16", max_steps_per_epoch=1,
                           optimizer={"name": "adam", "lr": 0.05, "fused": fused})
    trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # fp16 overflows
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    trainer.fit()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the overflowed step was skipped
    assert trainer.precision.scaler.get_scale() == 2.0 ** 126  # backoff 0.5


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_a_fused_optimiser_takes_the_same_steps(name):
    """optimizer.fused builds torch's fused optimiser over the same groups (the weighting's
    without weight decay), which takes the same steps. Compared on gradients that are not
    rounding noise: a convolution's bias before BatchNorm has a true gradient of 0, which
    Adam turns into steps of +-lr from the noise alone."""
    from mtlkit.engine.config import OptimizerConfig
    from mtlkit.engine.optim import build_optimizer
    from test_engine_common import Uncertainty

    params = {"name": name, "lr": 0.05, "weight_decay": 1e-2, **({"momentum": 0.9} if name == "sgd" else {})}
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        model, weighting = torch.nn.Linear(6, 3), Uncertainty(["a", "b"])
        opt = build_optimizer(OptimizerConfig(**params, fused=fused), model, weighting)
        assert bool(opt.defaults.get("fused")) == fused and opt.param_groups[1]["weight_decay"] == 0.0
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in [*model.parameters(), *weighting.parameters()]:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs.append([p.detach().clone() for p in [*model.parameters(), *weighting.parameters()]])
    for a, b in zip(*runs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    trainer, _ = build(epochs=1, optimizer={**params, "fused": True})
    assert trainer.optimizer.defaults["fused"]


@pytest.mark.parametrize("fused, reads_per_step", [(False, 1), (True, 0)])
def test_fp16_with_a_fused_optimiser_leaves_the_overflow_check_on_the_device(monkeypatch, fused, reads_per_step):
    """torch's loss scaler reads its overflow flag back (item()) before a plain optimiser's
    step; a fused optimiser takes the flag as a tensor and skips the update on the device."""
    trainer, _ = build(epochs=1, precision="fp16", optimizer={"name": "adam", "lr": 1e-3, "fused": fused})
    reads, real = [], torch.Tensor.item

    def item(self):
        if "grad_scaler" in sys._getframe(1).f_code.co_filename:
            reads.append(1)
        return real(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    trainer.fit()
    monkeypatch.undo()
    assert trainer.global_step == 4 and len(reads) == reads_per_step * trainer.global_step


def test_compile_matches_eager_and_bad_backend_is_one_line():
    eager, eager_model = build(epochs=1)
    eager.fit()
    torch._dynamo.reset()
    comp, comp_model = build(epochs=1, compile=True, compile_backend="eager")
    assert comp.model is not comp_model  # the trainer steps a compiled wrapper
    comp.fit()
    assert max_rel_diff(comp_model, eager_model) < 1e-5
    torch._dynamo.reset()
    with pytest.raises(ConfigError, match="training.compile") as err:
        build(compile=True, compile_backend="no_such_backend")
    assert "\n" not in str(err.value)


def test_compile_mode_reaches_torch_compile_and_marks_each_cuda_graph_step(monkeypatch):
    """reduce-overhead (CUDA graphs) is handed to torch.compile, and every training step
    starts with cudagraph_mark_step_begin (the graphs may then reuse the last step's
    output memory); the default mode passes no mode and marks nothing."""
    calls, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    for mode, expect in (("default", None), ("reduce-overhead", "reduce-overhead")):
        calls.clear(), marks.clear()
        trainer, _ = build(epochs=1, compile=True, compile_mode=mode)
        trainer.fit()
        assert calls == [{"backend": "inductor", "mode": expect}]
        assert len(marks) == (trainer.global_step if expect else 0) and trainer.global_step > 0


@pytest.mark.parametrize("bad, message", [
    ({"compile_mode": "reduce-overhead"}, "needs compile = true"),
    ({"compile": True, "compile_backend": "eager", "compile_mode": "max-autotune"}, "needs compile_backend"),
    ({"compile": True, "compile_mode": "fastest"}, "compile_mode"),
])
def test_compile_mode_mistakes_are_one_line(bad, message):
    with pytest.raises(ConfigError, match=message) as err:
        build(**bad)
    assert "\n" not in str(err.value)


def test_channels_last_keeps_the_function():
    ref, ref_model = build(epochs=1)
    ref.fit()
    cl, cl_model = build(epochs=1, channels_last=True)
    convs = [m.weight for m in cl_model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                         for w in convs if w.shape[-1] > 1)
    cl.fit()
    assert max_rel_diff(cl_model, ref_model) < 1e-4


def test_deterministic_switches_torch_to_deterministic_algorithms():
    was = torch.are_deterministic_algorithms_enabled()
    try:
        build(deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was)


def test_num_workers_default(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert loader_workers(None, cpu) == 0 and loader_workers(3, cpu) == 3 and loader_workers(3, cuda) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert loader_workers(None, cuda) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_workers(None, cuda) == 3  # 16 CPUs / 4 ranks - 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_workers(None, cuda) == 0


def test_unknown_precision_is_a_one_line_training_error():
    with pytest.raises(ConfigError, match=r"\[training\].*precision") as err:
        build(precision="fp8")
    assert "\n" not in str(err.value)


def test_auto_settings_resolve_per_device(monkeypatch):
    from mtlkit.engine.config import TrainingConfig
    from mtlkit.engine.precision import resolve

    cfg = TrainingConfig(precision="auto")
    cpu = resolve(cfg, torch.device("cpu"))
    assert (cpu.precision, cpu.num_workers) == ("fp32", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    cuda = resolve(cfg, torch.device("cuda", 0))
    assert (cuda.precision, cuda.num_workers) == ("bf16", 8)
    # compile keeps the loader's workers (tests/test_stop_signal_workers.py: what killed them)
    assert resolve(TrainingConfig(compile=True), torch.device("cuda", 0)).num_workers == 8
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve(cfg, torch.device("cuda", 0)).precision == "fp32"
    # compile and channels-last "auto": on CUDA only; compile's worker rule follows the decision
    both = TrainingConfig(compile="auto", channels_last="auto")
    on_cpu, on_cuda = resolve(both, torch.device("cpu")), resolve(both, torch.device("cuda", 0))
    assert (on_cpu.compile, on_cpu.channels_last) == (False, False)
    assert (on_cuda.compile, on_cuda.channels_last, on_cuda.num_workers) == (True, True, 8)
    explicit = TrainingConfig(precision="fp16", channels_last=False, num_workers=2)
    assert resolve(explicit, torch.device("cuda", 0)) == explicit  # explicit choices stay


def test_fp16_is_refused_for_a_weighting_that_owns_its_backward():
    from mtlkit.plugin_manager import get_registry

    famo = get_registry().get("weighting", "famo")
    tasks = make_tasks()
    train, val = make_data(num_train=16)
    with pytest.raises(ConfigError, match=r"^weighting: .*owns its backward.*bf16") as err:
        Trainer(make_model(tasks), tasks, train, val, weighting=famo.build({}, task_names=list(tasks)),
                training={**CFG, "precision": "fp16"}, quiet=True)
    assert "\n" not in str(err.value)
