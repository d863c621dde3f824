"""Where ``mtlkit data fetch decathlon ROOT`` gets the Visual Decathlon: the devkit (COCO-style
annotations), the nine domains of the data archive (one tar per domain inside it) and
ImageNet's part, unpacked into the official layout the ``decathlon`` loader reads
(``ROOT/annotations/*.json``, ``ROOT/data/<domain>/{train,val,test}/*.jpg``).

Sizes and sha256 are those recorded for these files by TensorFlow Datasets
(``visual_domain_decathlon/checksums.tsv``); the Decathlon site publishes none itself.
"""

from __future__ import annotations

from mtlkit.hookspecs import hookimpl

VGG = "http://www.robots.ox.ac.uk/~vgg/share/"


@hookimpl
def register_data_sources(register):
    from mtlkit.fetch import Archive

    register("decathlon", [
        Archive(name="devkit", url=VGG + "decathlon-1.0-devkit.tar.gz", format="tar.gz", size=23503205,
                sha256="f86d9e128678434ff2a3a374f00eb3e2ec2267e15e53ddae5f19ff19378b5ff7",
                places=(("aircraft_train.json", "annotations"),), note="annotations, 23.5 MB"),
        Archive(name="data", url=VGG + "decathlon-1.0-data.tar.gz", format="tar.gz", size=406351554,
                sha256="8eca928bda025d855c91a78db45b3b18bc322efd7b1462a041e62c27b3c83c25", inner="*.tar",
                places=(("aircraft/train", "data"),), note="nine domains, 406 MB"),
        Archive(name="imagenet", url="http://www.image-net.org/image/decathlon/decathlon-1.0-data-imagenet.tar",
                format="tar", size=6535075840,
                sha256="93caac18a907266f917136849c1db7bbf88dd595120af1a8eea7177138962e4a",
                places=(("imagenet12/train", "data"),),
                note="imagenet12, 6.5 GB; image-net.org may ask you to sign in and accept ImageNet's terms"),
    ], recipe="decathlon/mtan", description="the Visual Decathlon (devkit, data, ImageNet part) in the official layout")
