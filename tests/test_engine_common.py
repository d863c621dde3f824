"""Helpers shared by the engine tests (tiny models and data; no tests here)."""

from __future__ import annotations

import torch

from mtlkit.contracts import Weighting
from mtlkit.plugins.attention.split import SplitNetwork, SplitParams
from mtlkit.plugins.backbones.small_cnn import SmallCNN, SmallCNNParams
from mtlkit.plugins.datasets.synthetic_classification import (SyntheticClassification,
                                                              SyntheticClassificationParams)
from mtlkit.plugin_manager import get_registry
from mtlkit.plugins.tasks.classification import Classification, ClassificationParams

TASKS = ("shape", "colour")


def make_tasks(names=TASKS, num_colours=4):
    classes = {"shape": 4, "colour": num_colours, "size": 3}
    return {t: Classification(ClassificationParams(num_classes=classes[t], target=t), name=t) for t in names}


def make_model(tasks, seed=0, dropout=0.0, widths=(4, 8)):
    torch.manual_seed(seed)
    return SplitNetwork(
        SplitParams(),
        backbone=lambda: SmallCNN(SmallCNNParams(widths=list(widths))),
        heads={t: (lambda c, _t=t: get_registry().get("head", "classifier").build(
            {"dropout": dropout}, in_channels=c, task=tasks[_t])) for t in tasks},
        tasks=tasks,
    )


def make_data(num_train=24, num_val=7, size=8, seed=0):
    p = SyntheticClassificationParams(size=size, num_train=num_train, num_val=num_val, seed=seed)
    return SyntheticClassification(p, "train"), SyntheticClassification(p, "val")


class Uncertainty(Weighting):
    """A loss-level weighting with a trained parameter and JSON state (tests only)."""

    def __init__(self, task_names):
        super().__init__(task_names)
        self.log_vars = torch.nn.Parameter(torch.full((len(task_names),), -0.5))
        self.epochs_seen = []

    def combine(self, losses):
        return sum(losses[t] / (2 * self.log_vars[i].exp()) + self.log_vars[i] / 2
                   for i, t in enumerate(self.task_names) if t in losses)

    def on_epoch_end(self, epoch, mean_losses):
        self.epochs_seen.append([epoch, mean_losses])

    def get_state(self):
        return {"epochs_seen": self.epochs_seen}

    def set_state(self, state):
        self.epochs_seen = [list(x) for x in state.get("epochs_seen", [])]


class MeanGrad(Weighting):
    """Gradient-level: the mean of the task gradients (tests only)."""

    requires_grads = "shared"

    def __init__(self, task_names):
        super().__init__(task_names)
        self.calls = 0

    def combine_grads(self, grads, losses):
        self.calls += 1
        return grads.mean(0)


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
