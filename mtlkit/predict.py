"""``mtlkit predict``: a trained run's every task on image files or ``.npy`` arrays.

:func:`predict_files` loads the run's best (else last) checkpoint (:func:`mtlkit.loaded_run.load_run`),
reads every input first (an unreadable one is a one-line error before anything is
written), refuses output files that already exist (unless ``overwrite``), and writes per
input ``NAME``:

- ``NAME.safetensors``: each task's raw output at the input's own size (class scores,
  depth, normals, as the task's activation gives them);
- ``NAME.png``: the panel (:mod:`mtlkit.panels`): input | segmentation | depth | normals;
- ``NAME.top5.json``: for classification tasks, the five best classes with names.

Inputs reach the network as the run's data set makes its evaluation images: a data set
with ``prepare_input(image)`` (e.g. resizing, cropping and normalising per domain) is
asked to; otherwise the image is resized to the size of the data set's samples (or, with
``tile=True``, cut into tiles of that size) and dense outputs are resized back to the
input's size. Class names come from the data set's ``class_names`` (a list, or a dict
target -> list).

:func:`predict_split` writes a data set's official results file for a whole split, through
the data set plugin's ``register_result_writers`` hook (the core knows no results format).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .atomic import atomic_write, atomic_write_bytes, atomic_write_json
from .contracts import apply_activation
from .errors import ConfigError, DataError, PluginError, did_you_mean, os_reason
from .fsprobe import creation_obstacle, topmost_missing
from .loaded_run import LoadedRun, load_run
from .predict_inputs import read_input

# -- running the model -----------------------------------------------------------------------
@dataclass
class Group:
    """Tasks that share one input: every task (one-to-many), or one task with its own data
    set (many-to-many)."""

    tasks: list[str]
    dataset: Any
    size: tuple[int, int] | None  # the training input size, when the core resizes

    def class_names(self, target: str) -> list[str]:
        names = getattr(self.dataset, "class_names", None)
        if isinstance(names, dict):
            names = names.get(target)
        return [str(n) for n in names] if names is not None else []


def groups(run: LoadedRun) -> list[Group]:
    out = []
    for task, ref in run.data_refs().items():
        ds = run.dataset(task)
        size = None
        if not callable(getattr(ds, "prepare_input", None)):
            if len(ds) == 0:
                raise DataError(f"{ref.name}: the data set is empty, so its input size is unknown")
            size = tuple(int(s) for s in torch.as_tensor(ds[0]["image"]).shape[-2:])
        out.append(Group(tasks=list(run.tasks) if task is None else [task], dataset=ds, size=size))
    return out


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _tiled(model, x: torch.Tensor, size: tuple[int, int], tasks: list[str]) -> dict[str, torch.Tensor]:
    """Dense outputs of ``x`` (1 x 3 x H x W) from tiles of ``size`` (edges padded by replication)."""
    th, tw = size
    h, w = x.shape[-2:]
    rows, cols = math.ceil(h / th), math.ceil(w / tw)
    padded = F.pad(x, (0, cols * tw - w, 0, rows * th - h), mode="replicate")
    tiles = torch.cat([padded[..., r * th:(r + 1) * th, c * tw:(c + 1) * tw] for r in range(rows) for c in range(cols)])
    out = model(tiles, tasks=tasks)
    stitched = {}
    for t, y in out.items():
        if y.dim() != 4:
            continue
        grid = y.reshape(rows, cols, y.shape[1], th, tw).permute(2, 0, 3, 1, 4).reshape(1, y.shape[1], rows * th, cols * tw)
        stitched[t] = grid[..., :h, :w]
    return stitched


@torch.no_grad()
def run_group(run: LoadedRun, group: Group, image: torch.Tensor, tile: bool = False) -> dict[str, torch.Tensor]:
    """Each of the group's tasks on ``image`` (3 x H x W in [0, 1]): {task: output without the
    batch dimension}, dense outputs at the image's own size."""
    h, w = image.shape[-2:]
    prepare = getattr(group.dataset, "prepare_input", None)
    x = prepare(image)[None] if callable(prepare) else _resize(image[None], group.size)
    out = dict(run.model(x, tasks=group.tasks))
    if tile and group.size is not None:
        out.update(_tiled(run.model, image[None], group.size, group.tasks))
    result = {}
    for t in group.tasks:
        y = out[t].float()
        if y.dim() == 4 and tuple(y.shape[-2:]) != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
            act = run.tasks[t].output_activation
            if act in ("log_softmax", "l2_normalize"):  # both are idempotent: back onto their set
                y = apply_activation(act, y)
        result[t] = y[0].contiguous()
    return result


# -- what is written --------------------------------------------------------------------------
def top_classes(scores: torch.Tensor, names: Sequence[str], k: int = 5) -> list[dict[str, Any]]:
    """The ``k`` best classes of log-probabilities ``scores`` (C)."""
    p = scores.float().exp()
    p = p / p.sum()
    values, index = p.topk(min(k, p.numel()))
    return [{"class": int(i), "name": names[i] if i < len(names) else f"class {int(i)}", "probability": float(v)}
            for v, i in zip(values.tolist(), index.tolist())]


def panes(run: LoadedRun, image: torch.Tensor, outputs: dict[str, torch.Tensor], names: dict[str, list[str]]):
    """The panel's panes: the input, then one per task."""
    from .panels import Pane

    out = [Pane("image", "input", image.permute(1, 2, 0).numpy())]
    for t, y in outputs.items():
        act = run.tasks[t].output_activation
        if y.dim() == 3 and act == "log_softmax":
            out.append(Pane("labels", t, y.argmax(0).numpy(), num_classes=y.shape[0], names=names.get(t, [])))
        elif y.dim() == 3 and y.shape[0] == 3 and act == "l2_normalize":
            out.append(Pane("rgb", f"{t} (RGB = (n+1)/2)", ((y + 1) / 2).permute(1, 2, 0).numpy()))
        elif y.dim() == 3:
            title = t if y.shape[0] == 1 else f"{t} (channel 0 of {y.shape[0]})"
            out.append(Pane("scalar", title, y[0].numpy()))
        elif y.dim() == 1 and act == "log_softmax":
            top = [(c["name"], c["probability"]) for c in top_classes(y, names.get(t, []))]
            out.append(Pane("classes", f"{t}: top 5", top=top))
    return out


def _stems(inputs: Sequence[Path]) -> list[str]:
    """Output names: each input's stem, made unique with -2, -3, ... (never another input's stem)."""
    plain, used, out = {p.stem for p in inputs}, set(), []
    for p in inputs:
        name, n = p.stem, 1
        while name in used or (n > 1 and name in plain):
            n += 1
            name = f"{p.stem}-{n}"
        used.add(name)
        out.append(name)
    return out


def _refuse_overwrites(inputs: Sequence[Path], outputs: Sequence[Path], out_dir: Path, overwrite: bool) -> None:
    """Before any prediction: an output path that is an input or a folder is refused, and one
    that exists unless ``overwrite``."""
    real = {os.path.realpath(p): p for p in inputs}
    for o in outputs:
        if os.path.realpath(o) in real:
            raise DataError(f"{real[os.path.realpath(o)]}: predict would overwrite this input with its output "
                            f"{o}; choose another --out folder")
        if o.is_dir():
            raise DataError(f"{o}: a folder lies at this output's path; choose another --out folder")
    existing = [o for o in outputs if os.path.lexists(o)]
    if existing and not overwrite:
        n = len(existing)
        many = f"{n} output {'file already exists' if n == 1 else 'files already exist'} in {out_dir}"
        raise DataError(f"{existing[0]}: already exists ({many}); pass --overwrite to replace "
                        f"{'it' if n == 1 else 'them'}, or choose another --out folder")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: the output folder is a file")
    obstacle = creation_obstacle(out)
    if obstacle is not None:
        raise DataError(f"{out}: cannot write there ({obstacle})")


def predict_files(run_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike,
                  which: str = "best", tile: bool = False, overwrite: bool = False) -> list[Path]:
    """Predict every input with the run's model; returns the files written (see the module).
    An output file that exists is refused, before anything is computed, unless ``overwrite``."""
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ConfigError("predict: give at least one input file (or --split)")
    out_dir = Path(out)
    _check_out(out_dir)
    stems = _stems(paths)
    outputs = [out_dir / f"{s}{ext}" for s in stems for ext in OUTPUTS]  # in writing order
    _refuse_overwrites(paths, outputs, out_dir, overwrite)
    run = load_run(run_dir, which)
    ckpts = Path(os.path.realpath(Path(run.run_dir) / "checkpoints"))
    if ckpts == Path(os.path.realpath(out_dir)) or ckpts in Path(os.path.realpath(out_dir)).parents:
        raise DataError(f"{out_dir}: --out lies in the run's checkpoints folder; choose another folder")
    for p in paths:  # every input readable before anything is written
        read_input(p)
    parts = groups(run)
    names = {t: g.class_names(run.tasks[t].target) for g in parts for t in g.tasks}
    created = _make_out(out_dir)
    written: list[Path] = []
    try:
        for stem, p in zip(stems, paths):  # one input at a time: outputs can be large
            _predict_one(run, parts, names, p, out_dir / stem, tile, written)
    except BaseException:
        if created is not None:  # a folder this call made holds only this call's files
            shutil.rmtree(created, ignore_errors=True)
        raise
    return written


OUTPUTS = (".safetensors", ".png", ".top5.json")


def _make_out(out_dir: Path) -> Path | None:
    """Create ``out_dir``; return the top-most folder this created (None: it existed)."""
    top = topmost_missing(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot create the output folder ({os_reason(exc)})") from None
    return top


def _predict_one(run: LoadedRun, parts: list[Group], names: dict[str, list[str]], p: Path, base: Path,
                 tile: bool, written: list[Path]) -> None:
    """One input's outputs, ``base`` + each of :data:`OUTPUTS`, appended to ``written``."""
    from safetensors.torch import save

    from .panels import draw_panel

    image = read_input(p)
    outputs: dict[str, torch.Tensor] = {}
    for g in parts:
        outputs.update(run_group(run, g, image, tile=tile))
    meta = {"input": str(p), "run": str(run.run_dir), "checkpoint": str(run.checkpoint)}
    atomic_write_bytes(base.with_name(base.name + ".safetensors"), save(outputs, metadata=meta))
    written.append(base.with_name(base.name + ".safetensors"))
    panel, _ = draw_panel(panes(run, image, outputs, names), *image.shape[-2:])
    atomic_write(base.with_name(base.name + ".png"), lambda fh, im=panel: im.save(fh, format="PNG"))
    written.append(base.with_name(base.name + ".png"))
    classes = {t: top_classes(y, names.get(t, [])) for t, y in outputs.items()
               if y.dim() == 1 and run.tasks[t].output_activation == "log_softmax"}
    if classes:
        atomic_write_json(base.with_name(base.name + ".top5.json"), classes)
        written.append(base.with_name(base.name + ".top5.json"))


# -- whole splits: the data set's official results file ------------------------------------------
Writer = Callable[[LoadedRun, str, Path], list[Path]]


def result_writers(pm: Any = None) -> dict[str, tuple[Writer, str, str]]:
    """{data set name: (write, description, plugin)} from every ``register_result_writers``."""
    from .plugin_manager import get_plugin_manager

    pm = pm or get_plugin_manager()
    pm.load_entry_points()

    def once() -> dict[str, tuple[Writer, str, str]]:
        table: dict[str, tuple[Writer, str, str]] = {}

        def registrar(plugin: str):
            def register(dataset: str, write: Writer, description: str = "") -> None:
                if not isinstance(dataset, str) or not dataset or not callable(write):
                    raise PluginError(f"plugin '{plugin}': a result writer needs a data set name and a callable")
                if dataset in table:
                    raise PluginError(f"plugin '{plugin}': a result writer for data set '{dataset}' is already "
                                      f"registered by plugin '{table[dataset][2]}'")
                table[dataset] = (write, description, plugin)

            return register

        pm.call_each("register_result_writers", registrar)
        return table

    return pm.collect(once)


def predict_split(run_dir: str | os.PathLike, split: str, out: str | os.PathLike, which: str = "best") -> list[Path]:
    """The official results file of the run's data set for a whole ``split``, written by the
    data set plugin's result writer into ``out``; returns the files written."""
    out_dir = Path(out)
    _check_out(out_dir)
    run = load_run(run_dir, which)
    names = sorted({ref.name for ref in run.data_refs().values()})
    writers = result_writers()
    missing = [n for n in names if n not in writers]
    if missing:
        known = ", ".join(sorted(writers)) or "none"
        raise ConfigError(f"predict --split: no results-file writer for data set '{missing[0]}'"
                          f"{did_you_mean(missing[0], writers)} (writers: {known}); give input files instead")
    if len(names) != 1:
        raise ConfigError(f"predict --split: the run mixes data sets {names}; a results file covers one")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return list(writers[names[0]][0](run, split, out_dir))
    except BaseException:
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a writer that failed leaves no empty folder behind
        raise
