"""Learning check: every SegNet architecture, trained briefly on synthetic scenes, against
trivial predictors computed on the same validation set.

    python bench/learning_check.py                 # all eight architectures (minutes on 2 CPU cores)
    python bench/learning_check.py --arch mtan split --epochs 4

Each architecture is the shipped recipe ``nyuv2/<arch>`` loaded with ``synthetic=True`` and
overrides for a small run: SegNet at 1/8 width (``split_wide``: widths [8, 16, 32, 64, 128],
the shipped widths / 8; ``split_deep`` keeps ``deep = true``), 64 x 96 images, 7 classes,
256 training and 64 validation scenes, 8 epochs of batch 8 (256 steps), Adam at lr 1e-3
with a cosine decay, equal weighting, one torch thread.
Every architecture starts from the same seed and sees the same batches.

The trivial predictors use nothing but the training targets, and are scored here with
numpy, independently of the task plugins' metric code:

- segmentation: predict the training set's most frequent class everywhere (pixel accuracy
  and mIoU over the classes that occur, the same convention as the segmentation task);
- depth: predict the mean training depth everywhere (mean absolute error over valid pixels);
- normal: predict the normalised mean training normal everywhere (mean angle in degrees).

Margins are stated as model minus trivial for mIoU and pixel accuracy (percentage points,
higher is better), and trivial minus model for depth abs error (metres) and normal mean
angle (degrees), so a positive margin always means the model beats the trivial predictor.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

ARCHS = ("single", "stan", "split", "split_wide", "split_deep", "dense", "cross_stitch", "mtan")


@dataclass
class Settings:
    height: int = 64
    width: int = 96
    num_classes: int = 7
    num_train: int = 256
    num_val: int = 64
    epochs: int = 8
    batch_size: int = 8
    lr: float = 1e-3  # at 3e-3 Split Wide's depth did not beat the mean (1/8 width, 128-ch deepest level)
    schedule: str = "cosine"  # decays to 0 by the last epoch: final metrics less noisy than at a constant lr
    width_mult: float = 0.125
    seed: int = 0  # training: initialisation and batch order
    data_seed: int | None = None  # the rendered scenes (None: the same as seed)
    max_steps_per_epoch: int | None = None


def overrides(arch: str, s: Settings) -> list[str]:
    """``--set`` style overrides that shrink the ``nyuv2/<arch>`` recipe to a quick run."""
    # load_recipe(..., synthetic=True) swaps in the stand-in data set first, then applies
    # these, so they address [data.params] of the stand-in
    out = [
        f"data.params.height={s.height}", f"data.params.width={s.width}",
        f"data.params.num_train={s.num_train}", f"data.params.num_val={s.num_val}",
        f"data.params.num_classes={s.num_classes}",
        f"data.params.seed={s.seed if s.data_seed is None else s.data_seed}",
        f"tasks.segmentation.params.num_classes={s.num_classes}",
        f"optimizer.lr={s.lr}", f"schedule.name={s.schedule}", "weighting.name=equal",
        f"training.epochs={s.epochs}", f"training.batch_size={s.batch_size}", f"training.seed={s.seed}",
        f"training.eval_interval={s.epochs}", "training.device=cpu",
    ]
    if s.max_steps_per_epoch:
        out.append(f"training.max_steps_per_epoch={s.max_steps_per_epoch}")
    if arch == "split_wide":
        widths = [max(1, round(c * s.width_mult)) for c in (64, 128, 256, 512, 1024)]
        out.append(f"model.backbone.params.widths=[{', '.join(map(str, widths))}]")
    else:
        out.append(f"model.backbone.params.width={s.width_mult}")
    return out


class InMemory(Dataset):
    """The samples of a data set, rendered once (every architecture trains on the same ones)."""

    def __init__(self, dataset: Dataset) -> None:
        self.samples = [dataset[i] for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.samples[index]


# -- trivial predictors (numpy, from the samples) --------------------------------------------
def trivial_baselines(train: Dataset, val: Dataset, num_classes: int) -> dict[str, float]:
    def stack(ds, key):
        return np.stack([ds[i][key].numpy() for i in range(len(ds))])

    seg_tr, seg_va = stack(train, "segmentation"), stack(val, "segmentation")
    counts = np.bincount(seg_tr[(seg_tr >= 0) & (seg_tr < num_classes)].ravel(), minlength=num_classes)
    majority = int(counts.argmax())
    target = seg_va[(seg_va >= 0) & (seg_va < num_classes)].ravel()
    pixel_acc = 100.0 * float(np.mean(target == majority))
    # IoU per class of the constant prediction: the majority class's union is every pixel,
    # other occurring classes have intersection 0; average over classes that occur
    occurring = set(np.unique(target).tolist()) | {majority}
    ious = [float(np.mean(target == majority)) if c == majority else 0.0 for c in sorted(occurring)]
    miou = 100.0 * float(np.mean(ious))

    dep_tr, dep_va = stack(train, "depth"), stack(val, "depth")
    mean_depth = float(dep_tr[dep_tr != 0].mean())
    valid = dep_va != 0
    depth_abs = float(np.abs(dep_va[valid] - mean_depth).mean())

    nor_tr, nor_va = stack(train, "normal").astype(np.float64), stack(val, "normal").astype(np.float64)
    v_tr = np.abs(nor_tr).sum(1) > 0  # N x H x W, zero vector = invalid
    mean_normal = nor_tr.transpose(0, 2, 3, 1)[v_tr].mean(0)
    mean_normal /= np.linalg.norm(mean_normal)
    v_va = np.abs(nor_va).sum(1) > 0
    g = nor_va.transpose(0, 2, 3, 1)[v_va]
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    normal_mean = float(np.degrees(np.arccos(np.clip(g @ mean_normal, -1.0, 1.0))).mean())
    return {"miou": miou, "pixel_acc": pixel_acc, "depth_abs": depth_abs, "normal_mean": normal_mean,
            "majority_class": majority, "mean_depth": mean_depth, "mean_normal": mean_normal.tolist()}


# -- training -------------------------------------------------------------------------------
@dataclass
class Result:
    arch: str
    miou: float
    pixel_acc: float
    depth_abs: float
    normal_mean: float
    seconds: float
    params: int
    margins: dict[str, float] = field(default_factory=dict)


KEYS = ("miou", "pixel_acc", "depth_abs", "normal_mean")


def margins(result: dict[str, float], trivial: dict[str, float]) -> dict[str, float]:
    """Positive = better than the trivial predictor (see the module docstring)."""
    return {"miou": result["miou"] - trivial["miou"], "pixel_acc": result["pixel_acc"] - trivial["pixel_acc"],
            "depth_abs": trivial["depth_abs"] - result["depth_abs"],
            "normal_mean": trivial["normal_mean"] - result["normal_mean"]}


def load(arch: str, s: Settings):
    """The shrunk ``nyuv2/<arch>`` recipe on synthetic scenes (checked: the overrides took)."""
    from mtlkit.recipe.loader import load_recipe

    loaded = load_recipe(f"nyuv2/{arch}", overrides=overrides(arch, s), synthetic=True)
    data = loaded.recipe.data
    want = {"height": s.height, "width": s.width, "num_train": s.num_train, "num_val": s.num_val,
            "num_classes": s.num_classes}
    got = {k: data.params.get(k) for k in want}
    if data.name != "synthetic_scenes" or got != want:
        raise RuntimeError(f"nyuv2/{arch}: the overrides did not reach the synthetic data set: {data.name} {got}")
    return loaded


def train_one(arch: str, s: Settings, data: tuple[Dataset, Dataset] | None = None) -> tuple[dict, tuple]:
    """Train ``nyuv2/<arch>`` (shrunk) and return (val metrics, (train, val) data)."""
    from mtlkit.build import build_parts
    from mtlkit.engine import Trainer

    loaded = load(arch, s)
    parts = build_parts(loaded.recipe, with_data=data is None)
    if data is None:
        data = (InMemory(parts.train_data), InMemory(parts.val_data))
    r = loaded.recipe
    t0 = time.perf_counter()
    # the trainer's progress lines and evaluation tables go to stdout: keep the table readable
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(parts.model, parts.tasks, data[0], data[1], weighting=parts.weighting,
                          optimizer=r.optimizer, schedule=r.schedule, training=r.training, run_dir=None, quiet=True)
        metrics = trainer.fit()
    seconds = time.perf_counter() - t0
    out = {"miou": metrics["segmentation"]["miou"], "pixel_acc": metrics["segmentation"]["pixel_acc"],
           "depth_abs": metrics["depth"]["abs_err"], "normal_mean": metrics["normal"]["mean"],
           "seconds": seconds, "params": sum(p.numel() for p in parts.model.parameters())}
    return out, data


def render_data(s: Settings) -> tuple[Dataset, Dataset]:
    """The recipes' synthetic train / val sets (the same for every architecture), in memory."""
    from mtlkit.build import build_dataset

    data = load("mtan", s).recipe.data
    return (InMemory(build_dataset(data, "data", data.train_split)),
            InMemory(build_dataset(data, "data", data.val_split)))


def run(archs, s: Settings, log=print) -> tuple[dict[str, float], list[Result]]:
    data = render_data(s)
    trivial = trivial_baselines(data[0], data[1], s.num_classes)
    results = []
    for arch in archs:
        m, _ = train_one(arch, s, data)
        res = Result(arch=arch, margins=margins(m, trivial), **m)
        results.append(res)
        log(f"  {arch:<13} done in {res.seconds:6.1f} s")
    return trivial, results


def table(trivial: dict[str, float], results: list[Result]) -> str:
    lines = [f"{'arch':<13} {'params':>9} {'time s':>7} | {'mIoU':>6} {'pixAcc':>6} {'depth':>6} {'normal':>6} |"
             f" {'d mIoU':>7} {'d pAcc':>7} {'d depth':>7} {'d norm':>7}"]
    lines.append(f"{'trivial':<13} {'':>9} {'':>7} | {trivial['miou']:6.2f} {trivial['pixel_acc']:6.2f} "
                 f"{trivial['depth_abs']:6.3f} {trivial['normal_mean']:6.2f} |")
    for r in results:
        m = r.margins
        lines.append(f"{r.arch:<13} {r.params:>9,} {r.seconds:7.1f} | {r.miou:6.2f} {r.pixel_acc:6.2f} "
                     f"{r.depth_abs:6.3f} {r.normal_mean:6.2f} | {m['miou']:+7.2f} {m['pixel_acc']:+7.2f} "
                     f"{m['depth_abs']:+7.3f} {m['normal_mean']:+7.2f}")
    lines.append("margins: model - trivial for mIoU / pixel acc (points); trivial - model for depth abs err (m) "
                 "and normal mean angle (deg); positive = beats the trivial predictor")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--epochs", type=int, default=Settings.epochs)
    ap.add_argument("--lr", type=float, default=Settings.lr)
    ap.add_argument("--num-train", type=int, default=Settings.num_train)
    ap.add_argument("--num-val", type=int, default=Settings.num_val)
    ap.add_argument("--num-classes", type=int, default=Settings.num_classes)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: these small models run several times faster "
                         "on one thread than on two when the machine is shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = Settings(epochs=args.epochs, lr=args.lr, num_train=args.num_train, num_val=args.num_val,
                 num_classes=args.num_classes)
    print(f"settings: {s}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    t0 = time.perf_counter()
    trivial, results = run(args.arch, s)
    print(f"trivial predictors: majority class {trivial['majority_class']}, mean depth "
          f"{trivial['mean_depth']:.3f} m, mean normal {np.round(trivial['mean_normal'], 3).tolist()}")
    print(table(trivial, results))
    print(f"total {time.perf_counter() - t0:.1f} s")
    worst = {k: min(r.margins[k] for r in results) for k in KEYS}
    print("smallest margins: " + ", ".join(f"{k} {v:+.3f}" for k, v in worst.items()))
    return 0 if all(v > 0 for v in worst.values()) and all(math.isfinite(v) for v in worst.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
