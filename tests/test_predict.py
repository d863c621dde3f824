"""``mtlkit predict`` on a tiny synthetic-scenes run: the panel's segmentation is the metric
code's argmax, the PNG has the panel's size and shows the input pixel for pixel, raw outputs
round-trip, tiles and .npy inputs, class names and top-5 for classification, and bad input
(an unreadable image, a foreign checkpoint, no run folder) is one line with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mtlkit.cli import main
from mtlkit.testing import TINY_CLASSIFICATION_RECIPE
from test_cli_bad_input import one_line_error
from tiny_recipes import TINY_SEGMENTATION_RECIPE

DENSE = TINY_SEGMENTATION_RECIPE.replace("[data]", '[tasks.depth]\nname = "depth"\n[tasks.normal]\nname = "normal"\n'
                                         "[data]")
SIZE = 32  # the recipe's scenes are 32 x 32


def _train(base: Path, text: str) -> Path:
    (base / "tiny.toml").write_text(text)
    assert main(["run", str(base / "tiny.toml"), "--quiet", "--run-dir", str(base / "run")]) == 0
    return base / "run"


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("dense"), DENSE)


def _scene(h: int, w: int, index: int = 0) -> np.ndarray:
    """A synthetic validation scene at another size than the training one, as H x W x 3 uint8."""
    from mtlkit.plugins.datasets.synthetic_scenes import render_sample

    return (render_sample(0, "val", index, h, w, 7, 0.02)["image"] * 255 + 0.5).astype(np.uint8)


def _model(run: Path):
    """The run's model, rebuilt and loaded here without mtlkit.predict."""
    from mtlkit.build import build_model
    from mtlkit.engine import load_model_weights
    from mtlkit.recipe.loader import load_recipe

    model, tasks = build_model(load_recipe(run / "recipe.toml").recipe)
    load_model_weights(model, run)
    return model.eval(), tasks


def _decode_labels(pane: np.ndarray, num_classes: int) -> np.ndarray:
    from mtlkit.panels import palette

    colours = palette(num_classes).astype(np.int64)
    distance = ((pane[:, :, None, :].astype(np.int64) - colours[None, None]) ** 2).sum(-1)
    assert (distance.min(-1) == 0).all(), "a segmentation pixel is not a palette colour"
    return distance.argmin(-1)


def test_panel_segmentation_is_the_metric_argmax_and_the_png_has_the_panel_size(dense_run, tmp_path):
    from mtlkit.panels import Pane, panel_layout

    h, w = 24, 40  # neither the training size nor its aspect
    Image.fromarray(_scene(h, w)).save(tmp_path / "room.png")
    assert main(["predict", str(dense_run), str(tmp_path / "room.png"), "--out", str(tmp_path / "out")]) == 0
    raw = load_file(str(tmp_path / "out" / "room.safetensors"))
    seg = raw["segmentation"]
    assert seg.shape == (7, h, w) and raw["depth"].shape == (1, h, w) and raw["normal"].shape == (3, h, w)

    png = np.asarray(Image.open(tmp_path / "out" / "room.png").convert("RGB"))
    # the layout the panel was drawn on (input, segmentation with its legend, depth, normals)
    labels = seg.argmax(0).numpy()
    layout = panel_layout([Pane("image", ""), Pane("labels", "", labels, num_classes=7), Pane("scalar", ""),
                           Pane("rgb", "")], h, w)
    assert (png.shape[1], png.shape[0]) == layout.size
    assert png.shape[1] > 4 * w * layout.scale and png.shape[0] > h * layout.scale
    k = layout.scale

    def pane(i: int) -> np.ndarray:
        left, top, right, bottom = layout.boxes[i]
        return png[top:bottom:k, left:left + w * k:k]

    assert np.array_equal(pane(0), np.asarray(Image.open(tmp_path / "room.png")))  # the input, pixel for pixel
    decoded = _decode_labels(pane(1), 7)
    task = _model(dense_run)[1]["segmentation"]
    state = task.metrics()
    state.update(seg[None], torch.from_numpy(decoded)[None])  # the metric's own argmax against the panel
    assert state.compute()["pixel_acc"] == pytest.approx(100.0)
    normals = pane(3).astype(np.float64) / 255 * 2 - 1
    assert np.allclose(normals, raw["normal"].permute(1, 2, 0).numpy(), atol=2.5 / 255)


def test_raw_outputs_round_trip_at_the_training_size_and_are_valid_at_others(dense_run, tmp_path):
    arr = _scene(SIZE, SIZE, index=1).astype(np.float32) / 255  # .npy, 3 x H x W floats
    np.save(tmp_path / "same.npy", arr.transpose(2, 0, 1))
    Image.fromarray(_scene(20, 52, index=1)).save(tmp_path / "other.jpg")
    out = tmp_path / "out"
    assert main(["predict", str(dense_run), str(tmp_path / "same.npy"), str(tmp_path / "other.jpg"),
                 "--out", str(out)]) == 0
    model, _ = _model(dense_run)
    with torch.no_grad():
        expected = model(torch.from_numpy(arr.transpose(2, 0, 1).copy())[None])
    raw = load_file(str(out / "same.safetensors"))
    for t, y in expected.items():
        assert torch.allclose(raw[t], y[0], atol=1e-5), t
    other = load_file(str(out / "other.safetensors"))
    assert other["segmentation"].shape == (7, 20, 52)
    # resized back, then put back on the task's output set: log-probabilities and unit normals
    assert torch.allclose(other["segmentation"].exp().sum(0), torch.ones(20, 52), atol=1e-4)
    assert torch.allclose(other["normal"].norm(dim=0), torch.ones(20, 52), atol=1e-4)
    assert sorted(p.name for p in out.iterdir()) == ["other.png", "other.safetensors", "same.png", "same.safetensors"]


def test_tiles_are_the_model_on_each_tile(dense_run, tmp_path):
    arr = np.concatenate([_scene(SIZE, SIZE, 2), _scene(SIZE, SIZE, 3)], axis=1)  # two tiles side by side
    Image.fromarray(arr).save(tmp_path / "wide.png")
    assert main(["predict", str(dense_run), str(tmp_path / "wide.png"), "--out", str(tmp_path / "o"), "--tile"]) == 0
    raw = load_file(str(tmp_path / "o" / "wide.safetensors"))
    model, _ = _model(dense_run)
    x = torch.from_numpy(arr.astype(np.float32) / 255).permute(2, 0, 1)
    with torch.no_grad():
        left, right = model(x[None, :, :, :SIZE]), model(x[None, :, :, SIZE:])
    for t in ("segmentation", "depth", "normal"):
        assert torch.allclose(raw[t][..., :SIZE], left[t][0], atol=1e-5), t
        assert torch.allclose(raw[t][..., SIZE:], right[t][0], atol=1e-5), t


def test_classification_writes_top5_with_names(tmp_path):
    from mtlkit.plugins.datasets.synthetic_classification import SHAPE_NAMES

    run = _train(tmp_path, TINY_CLASSIFICATION_RECIPE)
    Image.fromarray(np.full((12, 12, 3), 200, np.uint8)).save(tmp_path / "flat.png")
    assert main(["predict", str(run), str(tmp_path / "flat.png"), "--out", str(tmp_path / "o")]) == 0
    top = json.loads((tmp_path / "o" / "flat.top5.json").read_text())["shape"]
    scores = load_file(str(tmp_path / "o" / "flat.safetensors"))["shape"]
    order = scores.argsort(descending=True).tolist()
    assert [c["class"] for c in top] == order  # 4 classes: all of them, best first
    assert [c["name"] for c in top] == [SHAPE_NAMES[i] for i in order]
    assert sum(c["probability"] for c in top) == pytest.approx(1.0, abs=1e-5)
    assert Image.open(tmp_path / "o" / "flat.png").size[0] > 12


# -- bad input: one line, exit 2, nothing written ---------------------------------------------
def test_unreadable_image(dense_run, tmp_path, capsys):
    Image.fromarray(_scene(SIZE, SIZE)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    one_line_error(capsys, ["predict", str(dense_run), str(tmp_path / "good.png"), str(tmp_path / "broken.png"),
                            "--out", str(tmp_path / "out")], "broken.png", "cannot read as an image", folder=tmp_path)
    assert not (tmp_path / "out").exists()


def test_checkpoint_from_another_recipe(dense_run, tmp_path, capsys):
    run = Path(shutil.copytree(dense_run, tmp_path / "run"))
    recipe = run / "recipe.toml"
    text = recipe.read_text()
    assert "seed = 0" in text
    recipe.write_text(text.replace("seed = 0", "seed = 1"))  # same shapes: only the hash tells
    Image.fromarray(_scene(SIZE, SIZE)).save(tmp_path / "a.png")
    one_line_error(capsys, ["predict", str(run), str(tmp_path / "a.png"), "--out", str(tmp_path / "out")],
                   "meta.json", "different recipe", folder=tmp_path)
    assert not (tmp_path / "out").exists()


def test_missing_run_folder(tmp_path, capsys):
    Image.fromarray(_scene(SIZE, SIZE)).save(tmp_path / "a.png")
    one_line_error(capsys, ["predict", str(tmp_path / "nope"), str(tmp_path / "a.png"), "--out",
                            str(tmp_path / "out")], "nope", "not a run folder", folder=tmp_path)
    assert not (tmp_path / "out").exists()


def test_split_without_a_results_writer(dense_run, tmp_path, capsys):
    one_line_error(capsys, ["predict", str(dense_run), "--split", "val", "--out", str(tmp_path / "out")],
                   "synthetic_scenes", "no results-file writer", folder=tmp_path)


def test_the_palette_is_fixed_and_distinct():
    from mtlkit.panels import IGNORE_COLOUR, colour_labels, palette

    big = palette(1623)  # omniglot's class count
    assert len({tuple(c) for c in big}) == 1623 and tuple(IGNORE_COLOUR) not in {tuple(c) for c in big}
    assert np.array_equal(palette(7), big[:7])  # class i has one colour whatever the class count
    labels = np.array([[0, 6], [-1, 3]])
    assert colour_labels(labels, 7).tolist() == [[big[0].tolist(), big[6].tolist()],
                                                 [list(IGNORE_COLOUR), big[3].tolist()]]
