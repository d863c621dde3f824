"""The official release's COCO-style annotation files, read for :mod:`.dataset`: one split's
image files, labels, ids and classes. Every defect is refused with one line naming the file:
bad JSON, ids that are not integers, an image listed or annotated twice, file names outside
the data root, category ids of another domain. Also the folder listing both layouts use."""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath
from typing import Any

from mtlkit.errors import DataError, os_reason
from mtlkit.fsprobe import is_file, unreadable

from .domains import DOMAINS, category_offset


# ------------------------------------------------------------------------------ file system probes
def entries(folder: Path, folders: bool) -> list[Path]:
    """The sub-folders (``folders``) or the files of ``folder``."""
    try:
        return [p for p in folder.iterdir() if (p.is_dir() if folders else p.is_file())]
    except OSError as exc:
        raise unreadable(folder, exc) from None


# ------------------------------------------------------------------------------ annotation files
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file does not exist") from None
    except OSError as exc:
        raise DataError(f"{path}: annotation file cannot be read ({os_reason(exc)})") from None
    except RecursionError:
        raise DataError(f"{path}: not readable JSON (nested too deeply)") from None
    except ValueError as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from None


def _as_int(value: Any, path: Path, what: str) -> int:
    """A non-negative integer id. JSON numbers may arrive as floats (1e3, or Infinity/NaN,
    which Python's json accepts): integral finite ones are taken, anything else is refused
    here rather than failing later in int() or sorting."""
    if isinstance(value, bool):
        value = None
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or value < 0:
        raise DataError(f"{path}: {what} {value!r} is not a non-negative integer")
    return value


def _relative_file(name: Any, path: Path, image_id: int) -> str:
    """An image's file_name, which must stay inside the data root (no absolute path, no '..')."""
    if not isinstance(name, str) or not name:
        raise DataError(f"{path}: image {image_id}: file_name {name!r} is not a file name")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or Path(name).is_absolute() or ".." in parts or (parts and ":" in parts[0]):
        raise DataError(f"{path}: image {image_id}: file_name '{name}' points outside the data root")
    return name


def _categories(raw: dict, ann: Path, domain: str) -> tuple[int, int, list[str]]:
    """(offset, number of classes, class names) of the file's ``categories``."""
    categories = raw.get("categories") or []
    if not isinstance(categories, list):
        raise DataError(f"{ann}: 'categories' must be a list")
    ids_names = sorted((_as_int(c.get("id") if isinstance(c, dict) else None, ann, f"categories[{i}].id"),
                        str(c.get("name", i))) for i, c in enumerate(categories))
    cat_ids = [cid for cid, _ in ids_names]
    offset = cat_ids[0] if cat_ids else category_offset(domain)
    num_classes = len(cat_ids) if cat_ids else DOMAINS[domain]
    if cat_ids and cat_ids != list(range(offset, offset + num_classes)):
        raise DataError(f"{ann}: category ids are not consecutive from {offset}")
    return offset, num_classes, [name for _, name in ids_names]


def _check_domain(ann: Path, domain: str, offset: int, num_classes: int) -> None:
    """The release offsets each domain's category ids: a file whose ids start elsewhere
    belongs to another domain (or is not the release's), and would train on its images."""
    if offset != category_offset(domain):
        raise DataError(f"{ann}: category ids start at {offset}, but domain '{domain}' starts at "
                        f"{category_offset(domain)} (an annotation file of another domain?)")
    if num_classes > DOMAINS[domain]:
        raise DataError(f"{ann}: {num_classes} categories, more than domain '{domain}' has ({DOMAINS[domain]})")


def _labels(raw: dict, ann: Path, domain: str, position: dict[int, int], offset: int, num_classes: int) -> list[int]:
    """Each listed image's class (-1 where it has no annotation); an image annotated twice is refused."""
    labels = [-1] * len(position)
    annotations = raw.get("annotations") or []
    if not isinstance(annotations, list):
        raise DataError(f"{ann}: 'annotations' must be a list")
    seen: dict[int, int] = {}
    for i, a in enumerate(annotations):
        if not isinstance(a, dict):
            raise DataError(f"{ann}: every annotation must be an object")
        image_id = _as_int(a.get("image_id"), ann, f"annotations[{i}].image_id")
        if image_id not in position:
            raise DataError(f"{ann}: annotation for image id {image_id}, which is not in 'images'")
        if image_id in seen:
            raise DataError(f"{ann}: image id {image_id} is annotated twice "
                            f"(annotations[{seen[image_id]}] and annotations[{i}])")
        seen[image_id] = i
        cid = _as_int(a.get("category_id"), ann, f"annotations[{i}].category_id")
        cls = cid - offset
        if not 0 <= cls < num_classes:
            raise DataError(
                f"{ann}: category id {cid} of image {image_id} is outside domain '{domain}' "
                f"(ids {offset}..{offset + num_classes - 1})"
            )
        labels[position[image_id]] = cls
    return labels


def read_official_index(root: Path, domain: str, split: str, check_files: bool = True) -> dict[str, Any]:
    """Parse one split's annotation file: files, labels (-1 if unlabelled), ids, classes."""
    ann = root / "annotations" / (f"{domain}_test_stripped.json" if split == "test" else f"{domain}_{split}.json")
    raw = _read_json(ann)
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
        raise DataError(f"{ann}: expected a COCO-style object with an 'images' list")
    offset, num_classes, class_names = _categories(raw, ann, domain)

    files: list[str] = []
    ids: list[int] = []
    position: dict[int, int] = {}
    for i, entry in enumerate(raw["images"]):
        if not isinstance(entry, dict) or "file_name" not in entry or "id" not in entry:
            raise DataError(f"{ann}: every image needs 'id' and 'file_name'")
        image_id = _as_int(entry["id"], ann, f"images[{i}].id")
        if image_id in position:
            raise DataError(f"{ann}: image id {image_id} listed twice")
        position[image_id] = len(files)
        ids.append(image_id)
        files.append(_relative_file(entry["file_name"], ann, image_id))
    if not files:
        raise DataError(f"{ann}: the {split} split lists no images")

    labels = _labels(raw, ann, domain, position, offset, num_classes)
    # after the entries' own checks, which name the entry: this one is about the whole file
    _check_domain(ann, domain, offset, num_classes)
    if split != "test":
        missing = [ids[i] for i, lab in enumerate(labels) if lab < 0]
        if missing:
            raise DataError(f"{ann}: image id {missing[0]} has no annotation ({len(missing)} unlabelled)")

    # File names are relative to the release root; accept them relative to root/data too.
    listed = f"{ann}: lists '{files[0]}' but "
    base = root
    if not is_file(root / files[0], listed) and is_file(root / "data" / files[0], listed):
        base = root / "data"
    paths = [base / f for f in files]
    if check_files:
        for f, p in zip(files, paths):
            if not is_file(p, f"{ann}: lists '{f}' but "):
                raise DataError(f"{ann}: lists '{f}' but {p} is missing")
    return {"paths": paths, "labels": labels, "ids": ids, "offset": offset,
            "num_classes": num_classes, "class_names": class_names, "source": ann}
