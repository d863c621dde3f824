"""training.train_on = "train+val" (the Decathlon test-server protocol): each domain trains on
its train and val splits joined, there is no validation data (no evaluation, no best
checkpoint), and `decathlon submit` then takes the last checkpoint."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from mtlkit.errors import DataError
from mtlkit.plugins.decathlon.dataset import DecathlonDataset, DecathlonParams
from mtlkit.plugins.decathlon.synthetic import SyntheticDecathlon, SyntheticDecathlonParams, write_decathlon_layout
from mtlkit.runner import build_trainer

N = 4


def test_decathlon_train_val_is_both_labelled_splits_augmented_as_train(tmp_path):
    root = tmp_path / "d"
    write_decathlon_layout(root, n_train=3, n_val=2, n_test=1, image_size=24, domains=["cifar100", "svhn"])
    for domain, augmented in (("cifar100", True), ("svhn", False)):  # the reference leaves svhn alone
        params = DecathlonParams(root=str(root), domain=domain, image_size=24, crop=24, augmentation="reference")
        train, val = DecathlonDataset(params, "train"), DecathlonDataset(params, "val")
        both = DecathlonDataset(params, "train+val")
        assert len(both) == 5 and both.image_ids == train.image_ids + val.image_ids
        assert both.labels == train.labels + val.labels and both.num_classes == train.num_classes
        assert both.augment == train.augment == augmented and not val.augment
    with pytest.raises(DataError, match=r"unknown split 'train\+test'"):
        DecathlonDataset(params, "train+test")


def test_synthetic_train_val_is_the_train_images_then_the_val_images():
    p = SyntheticDecathlonParams(domain="svhn", size=16, n=N)
    both, train, val = (SyntheticDecathlon(p, s) for s in ("train+val", "train", "val"))
    assert len(both) == 2 * N
    for i in range(2 * N):
        ref = train[i] if i < N else val[i - N]
        assert torch.equal(both[i]["image"], ref["image"]) and both[i]["image_id"] == ref["image_id"]


RECIPE = """
name = "tiny_train_val"
[model.backbone]
name = "small_cnn"
params = { widths = [4, 8] }
[model.attention]
name = "split"
[tasks.svhn]
name = "classification"
params = { num_classes = 10 }
data = { name = "synthetic_decathlon", params = { domain = "svhn", size = 16, n = 4 } }
[tasks.omniglot]
name = "classification"
params = { num_classes = 20 }
data = { name = "synthetic_decathlon", params = { domain = "omniglot", size = 16, n = 4 } }
[optimizer]
name = "sgd"
lr = 0.01
[training]
epochs = 1
batch_size = 2
device = "cpu"
train_on = "train+val"
best_metric = "svhn/accuracy"
"""


def test_a_train_val_run_trains_on_both_splits_and_submits_its_last_checkpoint(tmp_path):
    from mtlkit.plugins.decathlon.submission import submit_run

    path = tmp_path / "r.toml"
    path.write_text(RECIPE)
    built = build_trainer(path, run_dir=tmp_path / "run")
    trainer = built.trainer
    assert trainer.val_data is None
    assert {d: len(ds) for d, ds in trainer.train_data.items()} == {"svhn": 2 * N, "omniglot": 2 * N}
    # one epoch visits every sample of both splits: svhn's val images are indices 4..7
    plan = trainer.epoch_plan(0)
    assert sorted(i for _, b in plan for i, _ in b) == list(range(4 * N))
    val_ids = {SyntheticDecathlon(SyntheticDecathlonParams(domain="svhn", size=16, n=N), "val")[i]["image_id"]
               for i in range(N)}
    assert {trainer.train_data["svhn"][i]["image_id"] for i in range(N, 2 * N)} == val_ids
    built.fit()
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "step" for r in records) == 2 * (2 * N) // 2  # 2 domains x 8 samples / batch 2
    assert not any(r["type"] == "eval" for r in records)
    results = json.loads((run / "results.json").read_text())
    assert results["best"] is None and results["final"] is None  # best_metric has nothing to select by
    assert not (run / "checkpoints" / "best.json").exists()
    # the submission takes the last checkpoint; the shared BatchNorm is recomputed on train+val
    n = sum(submit_run(run, tmp_path / "sub.zip").values())
    assert n == 2 * N  # the test splits (n images each)
    with zipfile.ZipFile(tmp_path / "sub.zip") as zf:
        assert len(json.loads(zf.read("results.json"))) == n
