"""Test-server submissions: the server's ``results.json`` (offset category ids) in a zip,
and ``mtlkit decathlon submit RUN_DIR``'s predictions for it."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mtlkit.errors import ConfigError, DataError, did_you_mean, os_reason

from mtlkit.atomic import atomic_write, probe_writable
from mtlkit.hookspecs import hookimpl
from mtlkit.fsprobe import creation_obstacle, nearest_existing, topmost_missing
from mtlkit.rundir import RUN_FOLDER_ENTRIES

from .domains import DOMAINS, TEST_SIZES, default_category_offsets

SUBMISSION_MEMBER = "results.json"


def submission_entries(
    predictions: Mapping[str, Iterable[Sequence[int]]], category_offsets: Mapping[str, int] | None = None
) -> list[dict[str, int]]:
    """The server's list of ``{"image_id", "category_id"}`` (offset ids) for ``predictions``:
    domain -> [(image_id, 0-based class), ...]."""
    offsets = dict(category_offsets) if category_offsets is not None else default_category_offsets()
    entries: list[dict[str, int]] = []
    seen: set[int] = set()
    for domain, rows in predictions.items():
        if domain not in offsets:
            raise ConfigError(
                f"submission: no category offset for domain '{domain}'{did_you_mean(domain, offsets)}"
            )
        offset = int(offsets[domain])
        limit = DOMAINS.get(domain)
        for row in rows:
            image_id, cls = (int(v) for v in row)
            if cls < 0 or (limit is not None and cls >= limit):
                raise DataError(f"submission: class {cls} of image {image_id} is outside domain '{domain}'")
            if image_id in seen:
                raise DataError(f"submission: image id {image_id} predicted twice (domain '{domain}')")
            seen.add(image_id)
            entries.append({"image_id": image_id, "category_id": offset + cls})
    return entries


def write_submission(
    predictions: Mapping[str, Iterable[Sequence[int]]],
    category_offsets: Mapping[str, int] | None,
    out_zip: str | os.PathLike,
) -> Path:
    """Write the test server's ``results.json`` (original, offset category ids) inside a
    zip at ``out_zip``, atomically (a temp file in the same folder, then ``os.replace``)."""
    entries = submission_entries(predictions, category_offsets)
    data = json.dumps(entries).encode()
    out = Path(out_zip)

    def write(fh: Any) -> None:
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(SUBMISSION_MEMBER, data)

    made = topmost_missing(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, write)  # removes its temp file when it fails
    except OSError as exc:
        if made is not None:  # a failed write leaves no folder it made either
            shutil.rmtree(made, ignore_errors=True)
        raise DataError(f"{out}: cannot write the submission zip ({os_reason(exc)})") from None
    return out


# what submit may replace in the run folder: its own earlier submission (the default --out)
_REPLACEABLE = "submission.zip"


def check_submission_out(run: str | os.PathLike, out: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse, before anything is predicted, a zip path ``out`` that would replace one of the
    run folder's own files (recipe.toml, results.json, ...) or write under its checkpoints/
    (symlinks and '..' resolved; RUN/submission.zip, the default, is allowed), that is a
    folder, whose parent is a file, or whose folder cannot be created or written."""
    out = Path(out)
    real_run = Path(os.path.realpath(run))
    for real in {Path(os.path.realpath(out)), Path(os.path.realpath(out.parent)) / out.name}:
        try:
            rel = real.relative_to(real_run)
        except ValueError:
            continue
        if not rel.parts:
            raise ConfigError(f"{flag} {out}: that is the run folder {run} itself; give the zip file's path")
        first = rel.parts[0].casefold()
        if first in RUN_FOLDER_ENTRIES and first != _REPLACEABLE:
            what = (f"the run folder's own {rel.parts[0]}" if len(rel.parts) == 1 else
                    f"inside the run folder's {rel.parts[0]}/")
            raise ConfigError(f"{flag} {out}: that is {what} ({run}); refusing to overwrite the run, give a "
                              f"path outside it (default: {Path(run) / _REPLACEABLE})")
    if out.is_dir():
        raise ConfigError(f"{flag} {out}: is a folder; give the path of the zip file to write")
    obstacle = creation_obstacle(out.parent)
    if obstacle is not None:
        raise ConfigError(f"{flag} {out}: cannot write there, {obstacle}")
    anc = nearest_existing(out.parent)
    try:  # what os.access cannot tell (root, a read-only mount, /proc): try it
        probe_writable(anc)
    except OSError as exc:
        raise DataError(f"{flag} {out}: cannot write in {anc} ({os_reason(exc)})") from None


def predict_domain(model, dataset, domain: str, batch_size: int = 64) -> list[tuple[int, int]]:
    """(image_id, 0-based class) for every image of ``dataset``, running only ``domain``'s branch."""
    import torch
    from torch.utils.data import DataLoader

    rows: list[tuple[int, int]] = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with torch.no_grad():
        for batch in loader:
            if "image_id" not in batch:
                raise ConfigError(f"domain '{domain}': its data set gives no image_id (use the 'decathlon' data set)")
            scores = model(batch["image"], tasks=[domain])[domain]
            rows.extend(zip(batch["image_id"].tolist(), scores.argmax(1).tolist()))
    return rows


def split_predictions(run, split: str = "test") -> tuple[dict[str, list[tuple[int, int]]], dict[str, int]]:
    """(domain -> [(image_id, class)], domain -> category offset) for every domain of a
    loaded many-to-many run (:class:`mtlkit.loaded_run.LoadedRun`) on ``split``."""
    recipe = run.recipe
    if not recipe.many_to_many:
        raise ConfigError(f"{run.run_dir}: not a many-to-many (Decathlon) run: its recipe has a single [data] section")
    import torch

    from mtlkit.build import training_split
    from mtlkit.engine.bn_stats import domain_bn_layers, domain_statistics
    from mtlkit.engine.distributed import DistContext
    from mtlkit.engine.precision import resolve

    # as in evaluation during training, BatchNorm layers shared by the domains get each
    # domain's statistics from its training data before it is predicted (the run's
    # training.domain_bn_stats; see mtlkit.engine.bn_stats)
    cfg = resolve(recipe.training, torch.device("cpu"))  # predictions run on the CPU
    bns = domain_bn_layers(run.model, cfg, dict.fromkeys(recipe.tasks))
    predictions, offsets = {}, {}
    datasets = {domain: run.dataset(domain, split) for domain in recipe.tasks}
    for domain, data in datasets.items():
        if getattr(data, "server_image_ids", True) is False:
            raise ConfigError(f"domain '{domain}': {getattr(data, 'source', 'its data')} is an ImageFolder copy, "
                              "whose image ids are file positions, not the test server's: a submission needs the "
                              "official layout (annotations/<domain>_test_stripped.json)")
    for domain, task in recipe.tasks.items():
        data = datasets[domain]
        train = run.dataset(domain, training_split(recipe, task.data)) if bns else None
        dataset_domain = getattr(data, "domain", domain)
        with domain_statistics(run.model, bns, domain, train, run.tasks, cfg, DistContext()):
            predictions[dataset_domain] = predict_domain(_DomainView(run.model, domain, dataset_domain), data,
                                                         dataset_domain, recipe.training.batch_size)
        offsets[dataset_domain] = int(getattr(data, "category_offset", 0))
    return predictions, offsets


def write_results(run, split: str, out_dir: Path) -> list[Path]:
    """``mtlkit predict RUN --split SPLIT --out DIR``: the server's zipped results.json of
    every domain's ``split`` as ``DIR/submission.zip``."""
    predictions, offsets = split_predictions(run, split)
    return [write_submission(predictions, offsets, Path(out_dir) / "submission.zip")]


def submit_run(run: Path, out: Path, checkpoint: str = "best") -> dict[str, int]:
    """Predict the test split of every domain of the run's recipe with its ``checkpoint``
    (``best``, else ``last``) and write the submission zip ``out`` (checked first, see
    :func:`check_submission_out`); returns the number of predictions per domain."""
    from mtlkit.loaded_run import load_run

    check_submission_out(run, out)  # before the run is loaded and predicted
    predictions, offsets = split_predictions(load_run(run, checkpoint), "test")
    write_submission(predictions, offsets, out)
    return {domain: len(rows) for domain, rows in predictions.items()}


def coverage_gaps(counts: Mapping[str, int]) -> list[str]:
    """Why a submission with ``counts`` (domain -> test predictions) is not the whole test set
    the server scores: the Decathlon score sums all ten domains, each over its full test split
    (the release's sizes, ``TEST_SIZES``). Empty when it is complete."""
    gaps = []
    missing = [d for d in DOMAINS if d not in counts]
    if missing:
        gaps.append(f"no predictions for {len(missing)} of the ten domains ({', '.join(missing)}): "
                    "the server scores them 0")
    for domain, n in counts.items():
        if domain in TEST_SIZES and n != TEST_SIZES[domain]:
            gaps.append(f"{domain}: {n} predictions, the release's test split has {TEST_SIZES[domain]} images")
    return gaps


class _DomainView:
    """Runs the recipe's task ``task`` while predictions are keyed by the data set's domain."""

    def __init__(self, model, task: str, domain: str) -> None:
        self.model, self.task, self.domain = model, task, domain

    def __call__(self, x, tasks):
        return {self.domain: self.model(x, tasks=[self.task])[self.task]}


@hookimpl
def register_result_writers(register):
    for name in ("decathlon", "synthetic_decathlon"):
        register(name, write_results, description="the test server's results.json (offset category ids), zipped")
