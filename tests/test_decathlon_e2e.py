"""The Visual Decathlon end to end through the CLI, on tiny written data: synth-decathlon
writes the official layout, a many-to-many MTAN run trains on it, `decathlon submit`
writes the server's results.json, `model.init_from` loads only the globbed tensors, and
`compare` shows per-domain accuracy, their mean and the Decathlon score."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mtlkit.cli import main
from mtlkit.plugins.decathlon.domains import DOMAINS
from mtlkit.plugins.decathlon.score import decathlon_score

RUN_DOMAINS = {"svhn": 10, "daimlerpedcls": 2, "gtsrb": 6}  # synthetic class counts
SIZE = 24


def _task_toml(domain: str, num_classes: int, root: Path, task: str | None = None) -> str:
    return (f'[tasks.{task or domain}]\nname = "classification"\nparams = {{ num_classes = {num_classes} }}\n'
            f'data = {{ name = "decathlon", params = {{ root = "{root.as_posix()}", domain = "{domain}", '
            f'image_size = {SIZE}, crop = {SIZE}, pad = 2 }} }}\n\n')


COMMON = """
[weighting]
name = "equal"

[optimizer]
name = "sgd"
lr = 0.05
momentum = 0.9

[training]
epochs = 1
batch_size = 8
seed = 0
device = "cpu"
domain_order = "round_robin"
"""


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("decathlon") / "decathlon-synth"
    rc = main(["data", "synth-decathlon", str(out), "--n-train", "8", "--n-val", "4", "--n-test", "4",
               "--image-size", str(SIZE)])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def mtan_run(written, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("runs")
    recipe = base / "tiny_mtan_decathlon.toml"
    text = ('name = "tiny_mtan_decathlon"\n\n[model.backbone]\nname = "wrn"\n'
            'params = { depth = 10, widen_factor = 1 }\n\n[model.attention]\nname = "mtan"\n\n')
    text += "".join(_task_toml(d, n, written) for d, n in RUN_DOMAINS.items())
    recipe.write_text(text + COMMON)
    run = base / "mtan"
    assert main(["run", str(recipe), "--quiet", "--run-dir", str(run)]) == 0
    return run


def _annotations(root: Path, domain: str, split: str) -> dict:
    name = f"{domain}_test_stripped.json" if split == "test" else f"{domain}_{split}.json"
    return json.loads((root / "annotations" / name).read_text())


def _checkpoint(run: Path) -> Path:
    """The weights of the run's one checkpoint. These runs train one epoch, so best and last
    are the same step folder (asserted here); choosing best over last when they differ is
    tested in tests/test_checkpoint_atomic.py (init_from loads best, not last)."""
    names = {json.loads((run / "checkpoints" / f"{p}.json").read_text())["dir"]
             for p in ("best", "last") if (run / "checkpoints" / f"{p}.json").is_file()}
    assert len(names) == 1, names
    return run / "checkpoints" / names.pop() / "model.safetensors"


# -- (a) the written layout reads back -------------------------------------------------------
def test_synth_decathlon_writes_the_official_layout_and_the_loader_reads_it(written):
    from mtlkit.plugins.decathlon.dataset import DecathlonDataset, DecathlonParams
    from mtlkit.plugins.decathlon.synthetic import SYNTHETIC_CLASSES

    counts = {"train": 8, "val": 4, "test": 4}
    for i, domain in enumerate(DOMAINS):
        for split, n in counts.items():
            assert len(list((written / "data" / domain / split).glob("*.jpg"))) == n
            ann = _annotations(written, domain, split)
            cat_ids = sorted(c["id"] for c in ann["categories"])
            # offset ids: domain i (official order) starts at (i + 1) * 10^7 + 1
            assert cat_ids == list(range((i + 1) * 10**7 + 1, (i + 1) * 10**7 + 1 + SYNTHETIC_CLASSES[domain]))
            assert ("annotations" in ann) == (split != "test")
            ds = DecathlonDataset(DecathlonParams(root=str(written), domain=domain, image_size=SIZE, crop=SIZE,
                                                  augment=False), split=split)
            assert len(ds) == n and ds.category_offset == cat_ids[0]
            sample = ds[0]
            assert sample["image"].shape == (3, SIZE, SIZE)
            assert sample["image_id"] == ann["images"][0]["id"]
            if split == "test":
                assert set(ds.labels) == {-1}
            else:
                by_id = {a["image_id"]: a["category_id"] - cat_ids[0] for a in ann["annotations"]}
                assert ds.labels == [by_id[im["id"]] for im in ann["images"]]


# -- (b) run, then submit --------------------------------------------------------------------
def test_run_then_submit_writes_one_offset_prediction_per_test_image(mtan_run, written, capsys):
    from mtlkit.build import build_parts
    from mtlkit.engine import load_model_weights
    from mtlkit.engine.bn_stats import domain_bn_layers, domain_statistics
    from mtlkit.engine.distributed import DistContext
    from mtlkit.plugins.decathlon.dataset import DecathlonDataset, DecathlonParams
    from mtlkit.recipe.loader import load_recipe

    out = mtan_run / "sub.zip"
    assert main(["decathlon", "submit", str(mtan_run), "--out", str(out)]) == 0
    with zipfile.ZipFile(out) as zf:
        assert zf.namelist() == ["results.json"]  # nothing else
        entries = json.loads(zf.read("results.json"))
    assert isinstance(entries, list) and all(set(e) == {"image_id", "category_id"} for e in entries)
    got = {e["image_id"]: e["category_id"] for e in entries}
    assert len(got) == len(entries)  # one entry per image

    # Independently: the test annotation files name the images and the valid (offset) ids,
    # and the model's own argmax plus the smallest category id gives each prediction. The
    # WRN's BatchNorm is shared by the domains: each domain is predicted with its own
    # statistics (their values are checked in tests/test_bn_stats.py).
    loaded = load_recipe(mtan_run / "recipe.toml")
    parts = build_parts(loaded.recipe)
    model = parts.model
    load_model_weights(model, _checkpoint(mtan_run).with_name("meta.json"))
    model.eval()
    bns = domain_bn_layers(model, loaded.recipe.training, parts.train_data)
    assert len(bns) > 10  # the WRN's and the shared f convs' BatchNorm
    expected: dict[int, int] = {}
    mixed = 0
    for domain in RUN_DOMAINS:
        ann = _annotations(written, domain, "test")
        valid = {c["id"] for c in ann["categories"]}
        ids = [im["id"] for im in ann["images"]]
        assert all(got[i] in valid for i in ids), domain
        ds = DecathlonDataset(DecathlonParams(root=str(written), domain=domain, image_size=SIZE, crop=SIZE,
                                              pad=2), split="test")
        images = torch.stack([ds[k]["image"] for k in range(len(ds))])
        with domain_statistics(model, bns, domain, parts.train_data[domain], parts.tasks, loaded.recipe.training,
                               DistContext()), torch.no_grad():
            pred = model(images, tasks=[domain])[domain].argmax(1).tolist()
        with torch.no_grad():
            mixed += model(images, tasks=[domain])[domain].argmax(1).tolist() != pred  # training's statistics
        expected.update({i: min(valid) + p for i, p in zip(ids, pred)})
    assert got == expected  # exactly the run's domains' test images, nothing more
    assert mixed >= 1  # training's statistics would predict otherwise (here: in all 3 domains)


def test_predict_split_writes_the_same_results_file_as_submit(mtan_run, tmp_path, capsys):
    assert main(["decathlon", "submit", str(mtan_run), "--out", str(tmp_path / "sub.zip")]) == 0
    capsys.readouterr()
    assert main(["predict", str(mtan_run), "--split", "test", "--out", str(tmp_path / "pred")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "pred" / "submission.zip")]

    def entries(path: Path) -> list:
        with zipfile.ZipFile(path) as zf:
            assert zf.namelist() == ["results.json"]
            return json.loads(zf.read("results.json"))

    assert entries(tmp_path / "pred" / "submission.zip") == entries(tmp_path / "sub.zip")


def test_predict_on_an_image_file_is_the_domain_evaluation_sample(mtan_run, written, tmp_path):
    """An image file goes through each domain's own preparation: the same tensor as that
    domain's evaluation sample (8-bit, resized, centre crop, the domain's mean/std), and the
    top-5 file ranks each domain's scores on its preparation of the file."""
    from mtlkit.plugins.decathlon.dataset import DecathlonDataset, DecathlonParams
    from mtlkit.predict import read_input

    model = _model(mtan_run)
    data = {d: DecathlonDataset(DecathlonParams(root=str(written), domain=d, image_size=SIZE, crop=SIZE, pad=2),
                                split="val") for d in RUN_DOMAINS}
    for domain, ds in data.items():
        assert ds.mean is not None  # normalised per domain
        assert torch.equal(ds.prepare_input(read_input(ds.paths[1])), ds[1]["image"]), domain
    file = data["svhn"].paths[1]
    big = tmp_path / "big.png"  # any size: resized as the release's images were
    Image.open(file).resize((3 * SIZE, 2 * SIZE)).save(big)
    assert main(["predict", str(mtan_run), str(file), str(big), "--out", str(tmp_path / "o")]) == 0
    for path in (file, big):
        top = json.loads((tmp_path / "o" / f"{path.stem}.top5.json").read_text())
        assert set(top) == set(RUN_DOMAINS)
        for domain, ds in data.items():
            with torch.no_grad():
                scores = model(ds.prepare_input(read_input(path))[None], tasks=[domain])[domain][0]
            assert [c["class"] for c in top[domain]] == scores.argsort(descending=True)[:5].tolist(), domain
            assert len(top[domain]) == min(5, RUN_DOMAINS[domain])


def _model(run: Path):
    from mtlkit.build import build_model
    from mtlkit.engine import load_model_weights
    from mtlkit.recipe.loader import load_recipe

    model, _ = build_model(load_recipe(run / "recipe.toml").recipe)
    load_model_weights(model, _checkpoint(run).with_name("meta.json"))
    return model.eval()


# -- (c) init_from with include/exclude globs --------------------------------------------------
def test_init_from_loads_exactly_the_globbed_tensors(mtan_run, written, tmp_path, capsys):
    from mtlkit.build import build_model
    from mtlkit.earlier_runs import init_from
    from mtlkit.recipe.loader import load_recipe

    # finetune-style: one domain, a plain split network, only the shared body from the MTAN run
    recipe = tmp_path / "tiny_finetune.toml"
    recipe.write_text(
        'name = "tiny_finetune"\n\n[model.backbone]\nname = "wrn"\nparams = { depth = 10, widen_factor = 1 }\n\n'
        '[model.attention]\nname = "split"\n\n'
        f'[model.init_from]\npath = "{mtan_run.as_posix()}"\ninclude = ["backbone.*"]\n'
        'exclude = ["backbone.conv1.*", "*.num_batches_tracked"]\n\n'
        + _task_toml("svhn", 10, written, task="target") + COMMON)
    loaded = load_recipe(recipe)
    model, _ = build_model(loaded.recipe)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    init_from(model, loaded.recipe.model.init_from)
    after = model.state_dict()

    source = load_file(str(_checkpoint(mtan_run)))
    source = {k.removeprefix("model."): v for k, v in source.items() if k.startswith("model.")}
    loaded_keys = {k for k in after if k.startswith("backbone.") and not k.startswith("backbone.conv1.")
                   and not k.endswith("num_batches_tracked")}
    assert loaded_keys
    changed = 0
    for key, value in after.items():
        if key in loaded_keys:
            assert torch.equal(value, source[key]), key
            changed += not torch.equal(value, fresh[key])
        else:
            assert torch.equal(value, fresh[key]), key  # heads, conv1, counters: fresh init
    assert changed > len(loaded_keys) // 2  # the trained body really differs from a fresh one
    assert any(k.startswith("backbone.conv1.") for k in after) and any(k.startswith("heads.") for k in after)

    # ... and the same recipe runs through the CLI
    assert main(["run", str(recipe), "--quiet", "--run-dir", str(tmp_path / "ft"),
                 "--set", "training.max_steps_per_epoch=1"]) == 0


# -- (d) compare: per-domain accuracy, mean and score --------------------------------------------
def test_compare_shows_per_domain_accuracy_mean_and_score(mtan_run, tmp_path, capsys):
    capsys.readouterr()
    prefix = tmp_path / "table"
    assert main(["compare", str(mtan_run), "--last", "1", "--out", str(prefix)]) == 0
    printed = capsys.readouterr().out
    assert "score" in printed and "real data only" in printed
    rows = list(csv.reader((tmp_path / "table.csv").read_text().splitlines()))
    header, row = rows[0], rows[1]
    for d in RUN_DOMAINS:
        assert f"{d}/accuracy" in header
    last = [json.loads(l) for l in (mtan_run / "log.jsonl").read_text().splitlines()
            if json.loads(l)["type"] == "eval"][-1]["metrics"]
    acc = {d: last[d]["accuracy"] for d in RUN_DOMAINS}
    assert float(row[header.index("mean")]) == pytest.approx(sum(acc.values()) / len(acc), abs=0.01)
    assert float(row[header.index("score")]) == pytest.approx(decathlon_score(acc), abs=0.5)
    md = (tmp_path / "table.md").read_text()
    assert "| mean | score |" in md and "real data only" in md


def test_submit_notes_what_the_server_will_miss(mtan_run, tmp_path, capsys):
    """The run predicts 3 of the ten domains on 4-image test splits: the notes name the 7
    domains the server will score 0 and each domain whose count is not the release's."""
    from mtlkit.plugins.decathlon.domains import TEST_SIZES

    assert main(["decathlon", "submit", str(mtan_run), "--out", str(tmp_path / "sub.zip")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"wrote {4 * len(RUN_DOMAINS)} predictions ({len(RUN_DOMAINS)} domains) to {tmp_path / 'sub.zip'}"
    notes = [line for line in lines if line.startswith("note: ")]
    missing = [d for d in DOMAINS if d not in RUN_DOMAINS]
    assert notes[0] == f"note: no predictions for 7 of the ten domains ({', '.join(missing)}): the server scores them 0"
    assert notes[1:] == [f"note: {d}: 4 predictions, the release's test split has {TEST_SIZES[d]} images"
                         for d in RUN_DOMAINS]


def test_submit_refuses_a_run_on_an_imagefolder_copy_whose_ids_are_not_the_servers(written, tmp_path, capsys):
    """A run trained on an ImageFolder copy of the same images: that layout's image ids are
    file positions, so a submission from it would score nothing; submit says so in one line
    naming the domain, exits non-zero and writes no zip."""
    import shutil

    from mtlkit.plugins.decathlon.dataset import DecathlonDataset, DecathlonParams

    copy = tmp_path / "imagefolder"
    for domain in RUN_DOMAINS:
        for split in ("train", "val", "test"):
            ds = DecathlonDataset(DecathlonParams(root=str(written), domain=domain), split=split)
            for path, label in zip(ds.paths, ds.labels):
                dst = copy / domain / split / ("" if label < 0 else str(label)) / path.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, dst)
    recipe = tmp_path / "tiny_imagefolder.toml"
    tasks = "".join(_task_toml(d, n, copy).replace("pad = 2", 'pad = 2, layout = "imagefolder"')
                    for d, n in RUN_DOMAINS.items())
    recipe.write_text('name = "tiny_imagefolder"\n\n[model.backbone]\nname = "wrn"\n'
                      'params = { depth = 10, widen_factor = 1 }\n\n[model.attention]\nname = "split"\n\n'
                      + tasks + COMMON)
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--quiet", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    out = tmp_path / "sub.zip"
    assert main(["decathlon", "submit", str(run), "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "domain 'svhn'" in err[0] and "ImageFolder" in err[0] and "official layout" in err[0], err
    assert sorted(tmp_path.iterdir()) == sorted([copy, recipe, run])  # no zip, no temp file
