"""Test-server submissions: the server's ``results.json`` (offset category ids) in a zip,
and ``mtlkit decathlon submit RUN_DIR``'s predictions for it."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mtlkit.errors import ConfigError, DataError, did_you_mean

from mtlkit.atomic import atomic_write
from .domains import DOMAINS, default_category_offsets

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

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write)
    return out


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


def submit_run(run: Path, out: Path, checkpoint: str = "best") -> int:
    """Predict the test split of every domain of the run's recipe with its ``checkpoint``
    (``best``, else ``last``) and write the submission zip ``out``; returns the count.

    As in evaluation during training, BatchNorm layers shared by the domains get each
    domain's statistics from its training data before it is predicted (the run's
    ``training.domain_bn_stats``; see :mod:`mtlkit.engine.bn_stats`)."""
    import torch

    from mtlkit.build import build_dataset, build_parts, training_split
    from mtlkit.domains import freeze_shared
    from mtlkit.engine import load_model_weights
    from mtlkit.engine.bn_stats import domain_bn_layers, domain_statistics
    from mtlkit.engine.checkpoint import resolve_checkpoint
    from mtlkit.engine.distributed import DistContext
    from mtlkit.engine.precision import resolve
    from mtlkit.recipe.loader import load_recipe

    loaded = load_recipe(run / "recipe.toml")
    recipe = loaded.recipe
    if not recipe.many_to_many:
        raise ConfigError(f"{run}: not a many-to-many (Decathlon) run: its recipe has a single [data] section")
    ckpt = resolve_checkpoint(run, checkpoint)  # "best": the best, else the last
    parts = build_parts(recipe, with_data=False)
    if recipe.model.freeze_shared:  # its frozen BatchNorm statistics are the extractor's, as in training
        freeze_shared(parts.model)
    load_model_weights(parts.model, ckpt)
    parts.model.eval()
    cfg = resolve(recipe.training, torch.device("cpu"))  # predictions run on the CPU
    bns = domain_bn_layers(parts.model, cfg, dict.fromkeys(recipe.tasks))
    train = {t: build_dataset(ref.data, f"tasks.{t}.data", training_split(recipe, ref.data))
             for t, ref in recipe.tasks.items()} if bns else {}
    predictions, offsets = {}, {}
    for domain, task in recipe.tasks.items():
        test = build_dataset(task.data, f"tasks.{domain}.data", "test")
        dataset_domain = getattr(test, "domain", domain)
        with domain_statistics(parts.model, bns, domain, train.get(domain), parts.tasks, cfg, DistContext()):
            predictions[dataset_domain] = predict_domain(_DomainView(parts.model, domain, dataset_domain), test,
                                                         dataset_domain, recipe.training.batch_size)
        offsets[dataset_domain] = int(getattr(test, "category_offset", 0))
    write_submission(predictions, offsets, out)
    return sum(len(v) for v in predictions.values())


class _DomainView:
    """Runs the recipe's task ``task`` while predictions are keyed by the data set's domain."""

    def __init__(self, model, task: str, domain: str) -> None:
        self.model, self.task, self.domain = model, task, domain

    def __call__(self, x, tasks):
        return {self.domain: self.model(x, tasks=[self.task])[self.task]}
