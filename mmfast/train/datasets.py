"""Image-caption data sets in the formats of the field, plus the embedded synthetic one.

Every map-style data set here returns, for index i, a dict::

    {"image": PIL.Image (RGB) or uint8 (3, H, W) tensor, "captions": [str, ...] (>= 1),
     "index": i [, "attrs": {name: int}]}

Reading a sample may fail (a missing or corrupt image file): ``__getitem__`` then raises
``SampleError`` naming the file, and the loader skips the sample, counts it and logs it (see
``loader.py``), never silently. Problems that make a data set unusable as a whole (a missing path,
an empty CSV, a wrong column name, no readable sample at all) raise a ``ValueError`` /
``FileNotFoundError`` naming the command-line flag at construction.

* ``CsvDataset``: open_clip's CSV/TSV format (``--csv-img-key``, ``--csv-caption-key``,
  ``--csv-separator``); image paths relative to the CSV file's folder (or ``--data-root``).
* ``CocoCaptions``: a COCO captions annotations JSON (``images`` + ``annotations``) and the image
  folders; optionally a Karpathy split JSON (``dataset_coco.json``) choosing the split.
* ``webdataset``: see ``loader.WebDatasetBatches`` (a stream, not random-access).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["CocoCaptions", "CsvDataset", "SampleError", "load_image"]

log = logging.getLogger("mmfast.train")

KARPATHY_TRAIN = ("train", "restval")


class SampleError(Exception):
    """A sample that cannot be read (the loader skips it and counts it)."""


def load_image(path: str) -> Image.Image:
    """Decode an image file to RGB with PIL; ``SampleError`` (naming the file) when it cannot."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise SampleError(f"missing image file {path}") from e
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise SampleError(f"unreadable image {path}: {e}") from e


def _need_file(path: str, flag: str) -> None:
    if not path:
        raise ValueError(f"{flag} is required for this --dataset-type")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path!r} is not a file")


class CsvDataset(torch.utils.data.Dataset):
    """open_clip's CSV format: one (image path, caption) pair per row.

    Args:
        path: the CSV/TSV file (``--train-data`` / ``--val-data``).
        img_key, caption_key: the column names (``--csv-img-key``, ``--csv-caption-key``).
        separator: the field separator (``--csv-separator``; open_clip's default is a tab).
        root: folder that relative image paths start from (default: the CSV file's folder).
        flag: the command-line flag that gave ``path`` (for error messages).
    """

    def __init__(
        self,
        path: str,
        *,
        img_key: str = "filepath",
        caption_key: str = "title",
        separator: str = "\t",
        root: str | None = None,
        flag: str = "--train-data",
    ) -> None:
        _need_file(path, flag)
        if len(separator) != 1:
            raise ValueError(f"--csv-separator must be one character, got {separator!r}")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=separator)
            columns = reader.fieldnames or []
            rows = list(reader)
        if not columns:
            raise ValueError(f"{flag} {path!r} is empty (no header row)")
        for key, opt in ((img_key, "--csv-img-key"), (caption_key, "--csv-caption-key")):
            if key not in columns:
                raise ValueError(
                    f"{opt} {key!r} is not a column of {path!r}; its columns are {columns} "
                    f"(separator {separator!r}; set --csv-separator if the columns look merged)"
                )
        if not rows:
            raise ValueError(f"{flag} {path!r} has a header but no rows")
        root = root if root is not None else os.path.dirname(os.path.abspath(path))
        self.paths = [os.path.join(root, r[img_key] or "") for r in rows]
        self.captions = [r[caption_key] or "" for r in rows]
        self.source = path

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": load_image(self.paths[index]), "captions": [self.captions[index]], "index": index}


def _find_image(name: str, folders: Sequence[str], subdir: str | None) -> str | None:
    for folder in folders:
        for candidate in (os.path.join(folder, name), os.path.join(folder, subdir or "", name)):
            if os.path.isfile(candidate):
                return candidate
    return None


def _read_json(path: str, flag: str) -> Any:
    _need_file(path, flag)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {path!r} is not valid JSON: {e}") from e


def _karpathy_split(path: str, split: str) -> tuple[set, set, dict[Any, str]]:
    """Ids and file names of the Karpathy split's images (train = train + restval), and each
    image's sub-folder (``filepath``)."""
    data = _read_json(path, "--coco-karpathy")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"--coco-karpathy {path!r} has no 'images' list (expected Karpathy's dataset_coco.json)")
    wanted = KARPATHY_TRAIN if split == "train" else (split,)
    ids, names, subdirs = set(), set(), {}
    for im in data["images"]:
        if im.get("split") in wanted:
            if "cocoid" in im:
                ids.add(im["cocoid"])
            names.add(im.get("filename"))
            subdirs[im.get("filename")] = im.get("filepath")
    if not names:
        raise ValueError(f"--coco-karpathy {path!r} has no image in split {split!r}")
    return ids, names, subdirs


def _check_coco_entry(entry: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, dict) or any(k not in entry for k in keys):
        raise ValueError(f"{where} must be an object with {' and '.join(map(repr, keys))}, got {str(entry)[:100]}")


class CocoCaptions(torch.utils.data.Dataset):
    """COCO captions: one item per image, with all of its captions.

    Args:
        annotations: one or more captions JSON files ({"images": [{"id", "file_name"}],
            "annotations": [{"image_id", "caption"}]}).
        image_dirs: folders searched for each ``file_name`` (first hit wins).
        karpathy: optional Karpathy split JSON; then only the images of ``split`` are kept
            ("train" means train + restval, as is customary).
        split: the Karpathy split ("train", "val", "test").
        flag: the flag that gave ``annotations`` (for messages).

    Images with no caption or whose file is missing are left out, and the count is logged.
    """

    def __init__(
        self,
        annotations: Sequence[str],
        image_dirs: Sequence[str],
        *,
        karpathy: str | None = None,
        split: str = "train",
        flag: str = "--train-data",
    ) -> None:
        if not image_dirs:
            raise ValueError("--coco-images is required for --dataset-type coco (the image folder(s))")
        for d in image_dirs:
            if not os.path.isdir(d):
                raise FileNotFoundError(f"--coco-images {d!r} is not a folder")
        keep_ids, keep_names, subdirs = _karpathy_split(karpathy, split) if karpathy else (None, None, {})
        captions: dict[Any, list[str]] = defaultdict(list)
        files: dict[Any, str] = {}
        for path in annotations:
            data = _read_json(path, flag)
            if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
                raise ValueError(f"{flag} {path!r} is not a COCO captions file (needs 'images' and 'annotations')")
            for k, im in enumerate(data["images"]):
                _check_coco_entry(im, ("id", "file_name"), f"{flag} {path!r} images[{k}]")
                files[im["id"]] = im["file_name"]
            for k, ann in enumerate(data["annotations"]):
                _check_coco_entry(ann, ("image_id", "caption"), f"{flag} {path!r} annotations[{k}]")
                captions[ann["image_id"]].append(str(ann["caption"]).strip())
        self.paths, self.captions, self.image_ids = [], [], []
        no_caption = missing = 0
        orphans = sum(len(caps) for image_id, caps in captions.items() if image_id not in files)
        for image_id, name in files.items():
            if keep_ids is not None and image_id not in keep_ids and name not in keep_names:
                continue
            if not captions.get(image_id):
                no_caption += 1
                continue
            found = _find_image(name, image_dirs, subdirs.get(name))
            if found is None:
                missing += 1
                continue
            self.paths.append(found)
            self.captions.append(captions[image_id])
            self.image_ids.append(image_id)
        where = f"{flag} {', '.join(annotations)}" + (f" (Karpathy split {split!r})" if karpathy else "")
        if no_caption or missing:
            log.warning(f"{where}: skipped {no_caption} images without captions and {missing} missing image files")
        if orphans:
            log.warning(f"{where}: skipped {orphans} captions whose image_id is not in the file's 'images' list")
        if not self.paths:
            raise ValueError(f"{where}: no image with captions found in --coco-images {list(image_dirs)}")
        self.skipped = no_caption + missing + orphans

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": load_image(self.paths[index]), "captions": list(self.captions[index]), "index": index}
