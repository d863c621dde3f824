"""The engine tells seeded-augmentation data sets which epoch it is (``set_epoch``): each
epoch then sees different crops and flips, and a second run sees exactly the same ones."""

from __future__ import annotations

import numpy as np
import torch

import mtlkit
from mtlkit.build import build_tasks
from mtlkit.engine import Trainer
from mtlkit.plugin_manager import get_registry

SIZE = 32


def write_nyu(root, n=1):
    for split in ("train", "val"):
        for i in range(n):
            g = np.random.default_rng([7, i])
            arrays = {
                "image": g.uniform(0, 1, (SIZE, SIZE, 3)).astype(np.float32),
                "label": g.integers(-1, 13, (SIZE, SIZE)).astype(np.float32),
                "depth": g.uniform(0.5, 8, (SIZE, SIZE, 1)).astype(np.float32),
            }
            for folder, a in arrays.items():
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                np.save(root / split / folder / f"{i}.npy", a)


def images_seen(root, epochs=4, seed=3):
    """The image the model receives in each epoch (one training sample, batch 1)."""
    ds = get_registry().get("dataset", "nyuv2").build(
        {"root": str(root), "augment": True, "seed": seed, "targets": ["segmentation", "depth"]}, split="train")
    torch.manual_seed(0)
    tasks = build_tasks({"segmentation": ("segmentation", {"num_classes": 13}), "depth": "depth"})
    model = mtlkit.compose(backbone=("segnet", {"width": 0.0625}), attention="split", tasks=tasks)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    trainer = Trainer(model, tasks, ds, training={"epochs": epochs, "batch_size": 1, "device": "cpu"},
                      quiet=True)
    trainer.fit()
    return seen


def test_each_epoch_gets_its_own_augmentation_reproducibly(tmp_path):
    write_nyu(tmp_path)
    first = images_seen(tmp_path)
    assert len(first) == 4
    distinct = {tuple(x.flatten()[:64].tolist()) for x in first}
    assert len(distinct) >= 2, "every epoch saw the same crop and flip"
    again = images_seen(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
