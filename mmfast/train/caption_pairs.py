"""The seed's annotation format: a JSON list of ``{"image_id", "caption"}`` and an image folder.

    [{"image_id": 42, "caption": "a dog on a beach"}, {"image_id": 42, "caption": "..."}, ...]

with image ``image_id`` at ``IMAGE_DIR/<image_id>.jpg`` (``--dataset-type pairs``, ``--image-dir``;
``--dataset-type auto`` picks it for a ``.json`` file whose top level is a list, COCO's format for
one that is an object). Entries with the same ``image_id`` are one image with several captions
(training draws one per step; retrieval counts a hit on any of them).

Bad input:
* not a list, an empty list, or an entry that is not an object with an int or str ``image_id``
  (a file stem, no path separators) and a str ``caption``: ``ValueError`` naming the flag, the
  entry's position and what was expected;
* captions whose image file does not exist (a missing file, or an ``image_id`` that does not name
  one, e.g. 42 against ``000000000042.jpg``): skipped, counted (``skipped``) and logged; when no
  image is found at all, a ``ValueError`` that shows what the folder holds instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from mmfast.train.datasets import _read_json, load_image

__all__ = ["CaptionPairs", "is_pairs_file"]

log = logging.getLogger("mmfast.train")
EXTENSION = ".jpg"


def is_pairs_file(path: str) -> bool:
    """Whether a JSON file's top level is a list (this format) rather than an object (COCO's)."""
    with open(path, encoding="utf-8") as f:
        while True:
            ch = f.read(1)
            if not ch or not ch.isspace():
                return ch == "["


def _check_entry(k: int, entry: Any, path: str, flag: str) -> str:
    """The entry's image_id as a file stem; a ValueError naming the entry when it is malformed."""
    where = f"{flag} {path!r} entry {k}"
    if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
        raise ValueError(f"{where} must be an object with 'image_id' and 'caption', got {str(entry)[:100]}")
    image_id, caption = entry["image_id"], entry["caption"]
    if isinstance(image_id, bool) or not isinstance(image_id, int | str) or str(image_id).strip() == "":
        raise ValueError(f"{where}: image_id must be an int or a non-empty str, got {image_id!r}")
    stem = str(image_id)
    if "/" in stem or os.sep in stem or stem in (".", ".."):
        raise ValueError(f"{where}: image_id {stem!r} must be a file name without {EXTENSION}, not a path")
    if not isinstance(caption, str):
        raise ValueError(f"{where}: caption must be a str, got {type(caption).__name__}")
    return stem


def _no_image_error(path: str, flag: str, image_dirs: Sequence[str], stems: list[str]) -> ValueError:
    present = []
    for d in image_dirs:
        present += sorted(os.listdir(d))[:3]
    shown = f"it holds {present}" if present else "it is empty"
    return ValueError(
        f"{flag} {path!r}: no image file found for any of its {len(stems)} image_ids in --image-dir "
        f"{list(image_dirs)} (expected <image_id>{EXTENSION}, e.g. {stems[0]}{EXTENSION}); {shown}. "
        "Do the image_ids match the file names?"
    )


class CaptionPairs(torch.utils.data.Dataset):
    """Items ``{"image": PIL RGB, "captions": [str, ...], "index": i}``, one per image_id with a file.

    Args:
        path: the annotation JSON (``--train-data`` / ``--val-data``).
        image_dirs: folders searched for ``<image_id>.jpg`` (first hit wins; ``--image-dir``).
        flag: the flag that gave ``path`` (for messages).
    """

    def __init__(self, path: str, image_dirs: Sequence[str], *, flag: str = "--train-data") -> None:
        if not image_dirs:
            raise ValueError("--image-dir is required for --dataset-type pairs (the folder of <image_id>.jpg files)")
        for d in image_dirs:
            if not os.path.isdir(d):
                raise FileNotFoundError(f"--image-dir {d!r} is not a folder")
        data = _read_json(path, flag)
        if not isinstance(data, list):
            raise ValueError(
                f"{flag} {path!r} must be a JSON list of {{image_id, caption}} objects, got a {type(data).__name__} "
                "(a COCO captions file? use --dataset-type coco)"
            )
        if not data:
            raise ValueError(f"{flag} {path!r} is an empty list: no annotations")
        captions: dict[str, list[str]] = {}
        for k, entry in enumerate(data):
            captions.setdefault(_check_entry(k, entry, path, flag), []).append(entry["caption"].strip())
        self.paths: list[str] = []
        self.captions: list[list[str]] = []
        self.image_ids: list[str] = []
        missing_ids = missing_caps = 0
        for stem, caps in captions.items():
            found = next((p for d in image_dirs if os.path.isfile(p := os.path.join(d, stem + EXTENSION))), None)
            if found is None:
                missing_ids += 1
                missing_caps += len(caps)
                continue
            self.paths.append(found)
            self.captions.append(caps)
            self.image_ids.append(stem)
        if not self.paths:
            raise _no_image_error(path, flag, image_dirs, list(captions))
        if missing_ids:
            log.warning(
                f"{flag} {path}: skipped {missing_caps} captions of {missing_ids} image_ids with no "
                f"<image_id>{EXTENSION} file in --image-dir {list(image_dirs)}"
            )
        self.skipped = missing_caps
        self.source = path

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": load_image(self.paths[index]), "captions": list(self.captions[index]), "index": index}
