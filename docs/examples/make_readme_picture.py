"""The README's picture: a short quickstart run, then ``mtlkit predict`` on a scene it never saw.

    python docs/examples/make_readme_picture.py              # writes docs/images/quickstart_predict.png
    python docs/examples/make_readme_picture.py --epochs 4   # half the training, half the time

The run is the ``quickstart`` recipe (MTAN, SegNet at 1/8 width, 64 x 96 synthetic scenes,
8 epochs, which the recipe puts at about 2 minutes on 2 CPU cores); the scene is sample 0
of the synthetic scenes' test split (the run trains on the train split and evaluates on
val), rendered at twice the training size, so the picture also shows the resize to the
training size and back. On a busy machine set ``OMP_NUM_THREADS=1``: threads that wait
for each other on shared cores slow training many times over.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import mtlkit
from mtlkit.plugins.datasets.synthetic_scenes import render_sample
from mtlkit.predict import predict_files

HERE = Path(__file__).resolve().parent


def make_picture(out: Path, epochs: int, device: str) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        result = mtlkit.run_recipe("quickstart", overrides={"training.epochs": epochs, "training.device": device},
                                   run_dir=tmp / "run")
        trained = time.perf_counter() - start
        scene = render_sample(0, "test", 0, 128, 192, num_classes=7, noise=0.02)["image"]
        Image.fromarray((np.clip(scene, 0, 1) * 255 + 0.5).astype(np.uint8)).save(tmp / "scene.png")
        predict_files(result.run_dir, [tmp / "scene.png"], tmp / "predicted")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp / "predicted" / "scene.png", out)
        miou = result.metrics["segmentation"]["miou"]
        print(f"{epochs} epochs in {trained:.0f} s on {device}: val mIoU {miou:.1f}; wrote {out}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=HERE.parent / "images" / "quickstart_predict.png")
    args = p.parse_args()
    make_picture(args.out, args.epochs, args.device)


if __name__ == "__main__":
    main()
