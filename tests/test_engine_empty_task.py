"""A task with no valid target in a batch (every label ignored, every depth 0, ...).

Its loss is 0 and its gradient row is 0. Gradient-level weightings must then solve for the
other tasks alone: with the zero row left in, MGDA's min-norm point is 0 and IMTL-G puts
all the weight on the empty task, so the shared trunk stops learning. The task plugins
must give 0, never 0/0 = NaN (which the engine would stop on).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mtlkit.engine import Trainer
from mtlkit.plugin_manager import get_registry
from mtlkit.plugins.tasks.classification import Classification, ClassificationParams

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_common import make_data, make_model  # noqa: E402
from test_engine_grad_ddp import BASE_PARAMS, grad_level_configs  # noqa: E402

NUM_CLASSES = {"shape": 4, "colour": 4, "size": 3}


class MaskedClassification(Classification):
    """Classification where label -1 means "not annotated" (tests only)."""

    def loss(self, prediction, target):
        target = target.long()
        if not bool((target != -1).any()):
            return prediction.sum() * 0.0  # what the dense tasks do with nothing valid
        return F.nll_loss(prediction, target, ignore_index=-1)


class Unlabelled(Dataset):
    """``dataset``'s samples with the labels of ``blank`` tasks set to -1."""

    def __init__(self, dataset, blank):
        self.dataset, self.blank = dataset, set(blank)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        sample = dict(self.dataset[i])
        for t in self.blank:
            sample[t] = torch.tensor(-1)
        return sample


def make_tasks(names):
    return {t: MaskedClassification(ClassificationParams(num_classes=NUM_CLASSES[t], target=t), name=t)
            for t in names}


def fit(model, names, weighting, blank=(), optimizer=None, run_dir=None, steps=1, precision="fp32"):
    """``steps`` SGD steps on batches of 8 (one step: the update is exactly the method's)."""
    tasks = make_tasks(names)
    train, _ = make_data(num_train=16, num_val=2)
    trainer = Trainer(model, tasks, Unlabelled(train, blank), weighting=weighting,
                      optimizer=optimizer or dict(name="sgd", lr=0.2),
                      training=dict(epochs=1, batch_size=8, seed=1, device="cpu", max_steps_per_epoch=steps,
                                    precision=precision),
                      run_dir=run_dir, quiet=True)
    trainer.fit()
    return trainer


def shared(model, state=None):
    """The shared parameters, flat (from ``state``, a state_dict, if given)."""
    if state is None:
        return torch.cat([p.detach().reshape(-1) for p in model.shared_parameters()])
    ids = {id(p) for p in model.shared_parameters()}
    return torch.cat([state[k].reshape(-1) for k, p in model.named_parameters() if id(p) in ids])


def build(name, params, names):
    return get_registry().get("weighting", name).build(params, task_names=list(names))


@pytest.mark.parametrize("name,params", grad_level_configs(), ids=lambda v: str(v) if isinstance(v, dict) else v)
def test_an_empty_task_is_left_out_of_the_gradient_aggregation(tmp_path, name, params):
    all3, present = ("shape", "colour", "size"), ("shape", "colour")
    model = make_model(make_tasks(all3), seed=0)
    start = copy.deepcopy(model.state_dict())
    fit(model, all3, build(name, params, all3), blank=["size"], run_dir=tmp_path)
    # the same network without the empty task's head, trained on the other two tasks
    alone = make_model(make_tasks(present), seed=1)
    alone.load_state_dict(start, strict=False)  # shared trunk and the two heads
    fit(alone, present, build(name, params, present))

    s0 = shared(model, start)
    moved = float((shared(model) - s0).norm() / s0.norm())
    assert moved > 1e-3, f"the shared trunk did not learn ({moved:.1e})"
    diff = float((shared(model) - shared(alone)).abs().max() / shared(alone).abs().max())
    assert diff < 1e-5, f"differs from the method on the other tasks alone by {diff:.1e}"
    # the empty task's head has a zero gradient: plain SGD leaves it as it was
    for k, v in model.heads["size"].state_dict().items():
        assert torch.equal(v, start["heads.size." + k])
    # the log reports the left-out task's weight as 0
    steps = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    weights = [r["weights"] for r in steps if r["type"] == "step"]
    assert weights and all(set(w) == set(all3) and w["size"] == 0.0 for w in weights)
    assert all(w["shape"] != 0.0 or w["colour"] != 0.0 for w in weights)


@pytest.mark.parametrize("name", sorted({n for n, _ in grad_level_configs()}))
def test_one_task_left_moves_the_trunk_along_its_gradient(name):
    names = ("shape", "size")
    model = make_model(make_tasks(names), seed=0)
    s0 = shared(model).clone()
    fit(model, names, build(name, BASE_PARAMS.get(name, {}), names), blank=["size"])
    # reference: loss-level sum of losses = the shape loss alone (size's is 0)
    ref = make_model(make_tasks(names), seed=0)
    fit(ref, names, None, blank=["size"])
    d, r = shared(model) - s0, shared(ref) - s0
    assert torch.isfinite(d).all() and float(d.norm()) > 1e-3 * float(s0.norm())
    # a single task's gradient has one sensible direction, whatever the method's scale
    assert float(d @ r / (d.norm() * r.norm())) > 0.9999


@pytest.mark.parametrize("name", sorted({n for n, _ in grad_level_configs()}))
def test_all_tasks_empty_leaves_the_trunk_alone(tmp_path, name):
    names = ("shape", "colour")
    model = make_model(make_tasks(names), seed=0)
    start = shared(model).clone()
    # weight decay and momentum would move the trunk on a zero gradient; there is none
    fit(model, names, build(name, BASE_PARAMS.get(name, {}), names), blank=names, run_dir=tmp_path, steps=2,
        optimizer=dict(name="sgd", lr=0.2, momentum=0.9, weight_decay=0.1))
    assert torch.equal(shared(model), start)
    steps = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(r["weights"] == {"shape": 0.0, "colour": 0.0} for r in steps if r["type"] == "step")


@pytest.mark.parametrize("name,params", [("imtl", {"mode": "loss"}), ("mgda", {})])
def test_all_tasks_empty_under_fp16_loss_scaling(name, params):
    """fp16: a step with no gradient at all (IMTL-L takes no backward) has nothing for the
    scaler to unscale or check; it is skipped, not an error."""
    names = ("shape", "colour")
    model = make_model(make_tasks(names), seed=0)
    start = shared(model).clone()
    fit(model, names, build(name, params, names), blank=names, steps=2, precision="fp16",
        optimizer=dict(name="sgd", lr=0.2, momentum=0.9, weight_decay=0.1))
    assert torch.equal(shared(model), start)


# -- the task plugins: nothing valid gives a zero loss, not NaN ------------------------------
# every registered task: how its target says "no valid value" (None: it has no such value)
INVALID = {
    "segmentation": lambda b, h, w: torch.full((b, h, w), -1, dtype=torch.long),
    "depth": lambda b, h, w: torch.zeros(b, 1, h, w),
    "normal": lambda b, h, w: torch.zeros(b, 3, h, w),
    "classification": None,  # every label is a class: a sample without one is not a sample
}


@pytest.mark.parametrize("name", sorted(get_registry().components["task"]))
def test_task_loss_with_no_valid_target_is_zero(name):
    assert name in INVALID, f"task '{name}': say in INVALID how its target marks a missing value"
    if INVALID[name] is None:
        pytest.skip(f"task '{name}' has no invalid target value")
    comp = get_registry().get("task", name)
    task = comp.build(comp.tiny or {}, name=name)
    logits = torch.randn(2, task.out_channels, 5, 6, requires_grad=True)
    from mtlkit.contracts import apply_activation

    loss = task.loss(apply_activation(task.output_activation, logits), INVALID[name](2, 5, 6))
    assert loss.dim() == 0 and float(loss.detach()) == 0.0  # 0/0 would be NaN
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def task_entries(weighting, k):
    """The weighting's per-task state: its tensors (buffers, parameters) whose first
    dimension is the task count, and its JSON state's lists of that length."""
    out = {n: v.detach().clone() for n, v in list(weighting.named_buffers()) + list(weighting.named_parameters())
           if v.dim() >= 1 and v.shape[0] == k}
    out.update({f"state[{n}]": torch.tensor(v, dtype=torch.float64) for n, v in weighting.get_state().items()
                if isinstance(v, list) and len(v) == k and all(isinstance(x, (int, float)) for x in v)})
    return out


@pytest.mark.parametrize("blank", [["size"], ["shape", "colour", "size"]], ids=["one", "all"])
@pytest.mark.parametrize("name,params", grad_level_configs(), ids=lambda v: str(v) if isinstance(v, dict) else v)
def test_an_empty_task_keeps_its_per_task_state(name, params, blank):
    """Two steps without a target for ``blank``: their entries of the weighting's state (FAMO's
    logits and Adam moments, GradNorm's weights and L(0), MoCo's tracked gradient and lambda,
    DB-MTL's averages, ExcessMTL's sums, IMTL's scales, Auto-Lambda's lambdas, ...) are as
    they were, and nothing the weighting holds is NaN."""
    all3 = ("shape", "colour", "size")
    model = make_model(make_tasks(all3), seed=0)
    weighting = build(name, params, all3)
    before = task_entries(weighting, 3)
    fit(model, all3, weighting, blank=blank, steps=2)
    after = task_entries(weighting, 3)
    assert before.keys() == after.keys()
    for key, old in before.items():
        for t in blank:
            k = all3.index(t)
            new = after[key][k]
            ref = old[k] if old.shape == after[key].shape else torch.zeros_like(new)  # (K, 0) until first use
            assert torch.equal(new, ref), f"{name}: {key} of the empty task '{t}' changed"
    for n, v in list(weighting.named_buffers()) + list(weighting.named_parameters()):
        assert torch.isfinite(v).all(), f"{name}: {n} is not finite"


def test_uncertainty_log_variance_of_an_empty_task_stays():
    """Loss-level uncertainty weighting through the engine: two steps without a ``size``
    label leave its log-variance as it was (its regulariser is masked on the device: the
    step reads nothing), while the other tasks' move."""
    all3 = ("shape", "colour", "size")
    weighting = build("uncertainty", {}, all3)
    before = weighting.log_vars.detach().clone()
    fit(make_model(make_tasks(all3), seed=0), all3, weighting, blank=["size"], steps=2,
        optimizer=dict(name="sgd", lr=0.2, momentum=0.9))
    after = weighting.log_vars.detach()
    assert torch.equal(after[2], before[2])
    assert (after[:2] - before[:2]).abs().min() > 1e-3
