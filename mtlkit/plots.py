"""PNG figures for a run folder: training curves, prediction panels, attention masks."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from .atomic import atomic_write_bytes  # noqa: E402
from .attention_masks import capture_attention_masks, first_samples as _first_samples  # noqa: E402,F401
from .errors import CheckpointError, ConfigError, os_reason  # noqa: E402
from .rundir import read_log  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write ({os_reason(exc)})") from None
    return path


def plot_curves(run: Path) -> Path:
    """Per-task mean training loss per epoch, and every evaluated metric per epoch."""
    return _save(_curves_figure(read_log(run)), run / "curves.png")


def _curves_figure(records: list[dict]):
    epochs = [r for r in records if r.get("type") == "epoch"]
    evals = [r for r in records if r.get("type") == "eval"]
    metric_keys = []
    for r in evals:
        for task, values in r["metrics"].items():
            for name in values:
                if (task, name) not in metric_keys:
                    metric_keys.append((task, name))
    n = 1 + len(metric_keys)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    ax = axes[0][0]
    tasks = sorted({t for r in epochs for t in r.get("losses", {})})
    for t in tasks:
        xs = [r["epoch"] for r in epochs if t in r["losses"]]
        ax.plot(xs, [r["losses"][t] for r in epochs if t in r["losses"]], marker="o", label=t)
    ax.set_title("training loss (epoch mean)")
    ax.set_xlabel("epoch")
    if tasks:
        ax.legend(fontsize=8)
    for i, (task, name) in enumerate(metric_keys, start=1):
        ax = axes[i // cols][i % cols]
        pts = [(r["epoch"], r["metrics"][task][name]) for r in evals if name in r["metrics"].get(task, {})]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(f"{task} / {name}")
        ax.set_xlabel("epoch")
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    return fig


def load_run_model(run: Path):
    """Rebuild a run's model, tasks and validation data; load its best (else last) weights."""
    from .build import Parts, build_data
    from .loaded_run import load_run

    loaded = load_run(run, "best")  # the best, else the last
    train, val = build_data(loaded.recipe)
    return Parts(model=loaded.model, tasks=loaded.tasks, weighting=None, train_data=train, val_data=val)


def _show(ax, kind: str, value: torch.Tensor, num_classes: int | None = None) -> None:
    ax.axis("off")
    v = value.detach().float().cpu()
    if kind == "image":
        ax.imshow(v[:3].permute(1, 2, 0).clamp(0, 1).numpy())
    elif kind == "segmentation":
        ax.imshow(v.numpy(), cmap="tab20", vmin=-1, vmax=max(19, (num_classes or 1) - 1), interpolation="nearest")
    elif kind == "normal":
        ax.imshow(((v[:3] + 1) / 2).permute(1, 2, 0).clamp(0, 1).numpy())
    else:
        ax.imshow(v.squeeze(0).numpy(), cmap="viridis")


def _display(task, pred: torch.Tensor) -> tuple[str, torch.Tensor]:
    act = getattr(task, "output_activation", "identity")
    if pred.dim() == 3 and act == "log_softmax":  # C x H x W scores
        return "segmentation", pred.argmax(0)
    if pred.dim() == 3 and pred.shape[0] == 3:
        return "normal", pred
    if pred.dim() == 3:
        return "depth", pred
    return "class", pred.argmax(-1) if pred.dim() == 1 else pred


def plot_predictions(run: Path, n_images: int = 3, parts=None) -> Path:
    return _save(_predictions_figure(run, n_images, parts or load_run_model(run)), run / "predictions.png")


def _predictions_figure(run: Path, n_images: int, parts):
    if parts.val_data is None:
        raise CheckpointError(f"{run}: the recipe has no validation split to draw")
    domain, batch = _first_samples(parts.val_data, n_images)
    tasks = [domain] if domain else list(parts.tasks)
    with torch.no_grad():
        out = parts.model(batch["image"], tasks=tasks)
    n = batch["image"].shape[0]
    cols = 1 + 2 * len(tasks)
    fig, axes = plt.subplots(n, cols, figsize=(2.6 * cols, 2.2 * n), squeeze=False)
    for i in range(n):
        _show(axes[i][0], "image", batch["image"][i])
        axes[0][0].set_title("input")
        for j, t in enumerate(tasks):
            task = parts.tasks[t]
            kind, pred = _display(task, out[t][i])
            target = batch[task.target][i]
            ax_t, ax_p = axes[i][1 + 2 * j], axes[i][2 + 2 * j]
            if kind == "class":
                for ax, label, val in ((ax_t, "target", target), (ax_p, "prediction", pred)):
                    ax.axis("off")
                    ax.text(0.5, 0.5, f"{label}: {int(val)}", ha="center", va="center")
            else:
                _show(ax_t, kind, target, task.out_channels)
                _show(ax_p, kind, pred, task.out_channels)
            if i == 0:
                ax_t.set_title(f"{t} target")
                ax_p.set_title(f"{t} prediction")
    return fig


def plot_attention(run: Path, n_images: int = 2, levels: list[int] | None = None, parts=None,
                   strict: bool = False) -> Path:
    """The paper's 'attention masks as feature selectors': each task's mask (channel mean)
    at chosen levels, for a few validation images. ``strict``: a level the model does not
    have is an error (else such levels are left out)."""
    fig = _attention_figure(n_images, levels, parts or load_run_model(run), strict)
    return _save(fig, run / "attention.png")


def _attention_figure(n_images: int, levels: list[int] | None, parts, strict: bool):
    domain, batch = _first_samples(parts.val_data, n_images)
    tasks = [domain] if domain else list(parts.tasks)
    masks = capture_attention_masks(parts.model, batch["image"], tasks)
    n_levels = min((len(v) for v in masks.values() if v), default=0)
    if n_levels == 0:
        raise CheckpointError("this model's task-specific modules hold no attention masks to draw")
    wrong = [lv for lv in levels or [] if not 0 <= lv < n_levels]
    if strict and wrong:
        raise ConfigError(f"plot --levels: level {wrong[0]} does not exist, this model has {n_levels} "
                          f"attention levels (0 to {n_levels - 1})")
    levels = [lv for lv in (levels or [0, n_levels // 2, n_levels - 1]) if 0 <= lv < n_levels] or [0]
    n = batch["image"].shape[0]
    cols = 1 + len(tasks) * len(levels)
    fig, axes = plt.subplots(n, cols, figsize=(2.4 * cols, 2.2 * n), squeeze=False)
    for i in range(n):
        _show(axes[i][0], "image", batch["image"][i])
        col = 1
        for t in tasks:
            for lv in levels:
                ax = axes[i][col]
                ax.axis("off")
                ax.imshow(masks[t][lv][i].mean(0).cpu().numpy(), cmap="magma", vmin=0, vmax=1)
                if i == 0:
                    ax.set_title(f"{t} L{lv}", fontsize=8)
                col += 1
    return fig


def plot_run(run: Path, n_images: int = 3, attention: bool = False, levels: list[int] | None = None,
             strict_levels: bool = False) -> list[Path]:
    """curves.png, predictions.png (and attention.png) in ``run``. Every figure is drawn
    before the first is written: whatever refuses the run (recipe, log, checkpoint, a level
    the model lacks) leaves the folder as it was."""
    if n_images < 1:
        raise ConfigError(f"plot --images: {n_images}, expected at least 1")
    parts = load_run_model(run)
    records = read_log(run)
    if parts.val_data is None:
        raise CheckpointError(f"{run}: the recipe has no validation split to draw")
    if attention and not isinstance(getattr(parts.model, "task_specific", None), nn.ModuleDict):
        raise CheckpointError("this model has no task-specific attention modules (use an mtan recipe)")
    figures = []
    try:
        figures.append((_curves_figure(records), run / "curves.png"))
        figures.append((_predictions_figure(run, n_images, parts), run / "predictions.png"))
        if attention:
            figures.append((_attention_figure(n_images, levels, parts, strict_levels), run / "attention.png"))
    except BaseException:
        for fig, _ in figures:
            plt.close(fig)
        raise
    return [_save(fig, path) for fig, path in figures]
