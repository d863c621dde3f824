"""``mtlkit decathlon submit RUN_DIR``: test-set predictions as the server's results.json."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .errors import ConfigError


def predict_domain(model, dataset, domain: str, batch_size: int = 64) -> list[tuple[int, int]]:
    """(image_id, 0-based class) for every image of ``dataset``, running only ``domain``'s branch."""
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
    from .build import build_dataset, build_parts
    from .decathlon import write_submission
    from .engine import load_model_weights
    from .engine.checkpoint import resolve_checkpoint
    from .recipe.loader import load_recipe

    loaded = load_recipe(run / "recipe.toml")
    recipe = loaded.recipe
    if not recipe.many_to_many:
        raise ConfigError(f"{run}: not a many-to-many (Decathlon) run: its recipe has a single [data] section")
    ckpt = resolve_checkpoint(run, checkpoint)  # "best": the best, else the last
    parts = build_parts(recipe, with_data=False)
    load_model_weights(parts.model, ckpt)
    parts.model.eval()
    predictions, offsets = {}, {}
    for domain, task in recipe.tasks.items():
        test = build_dataset(task.data, f"tasks.{domain}.data", "test")
        dataset_domain = getattr(test, "domain", domain)
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
