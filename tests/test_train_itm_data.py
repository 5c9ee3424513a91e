"""The seed's annotation format (a JSON list of {image_id, caption} + IMAGE_DIR/<image_id>.jpg) on
generated fixture files, beside COCO's; format detection; bad input (an empty list, malformed
entries, captions without an image file, image_ids that do not name the files)."""

from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import pytest
from PIL import Image

from mmfast.train import synthetic
from mmfast.train.caption_pairs import CaptionPairs, is_pairs_file
from mmfast.train.data_setup import dataset_type
from mmfast.train.datasets import CocoCaptions
from tests.test_train_data import SIZE, write_coco


def write_pairs(folder, n: int, *, missing=(), ids=None, name="train.json") -> tuple[str, str]:
    """n scenes saved as folder/images/<image_id>.jpg (image_id = 100 + i unless ``ids`` is given)
    and the JSON list: one caption per image, two for even i. Images in ``missing`` are not written."""
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    ds = synthetic.SyntheticScenes("train", n, seed=1, image_size=SIZE)
    ids = ids or [100 + i for i in range(n)]
    entries = []
    for i in range(n):
        sample = ds[i]
        if i not in missing:
            Image.fromarray(sample["image"].permute(1, 2, 0).numpy()).save(os.path.join(images, f"{ids[i]}.jpg"))
        entries.append({"image_id": ids[i], "caption": sample["caption"]})
        if i % 2 == 0:
            entries.append({"image_id": ids[i], "caption": "a scene : " + sample["caption"]})
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(entries, f)
    return path, images


def write_json(folder, data) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "ann.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def test_pairs_format_groups_captions_per_image(tmp_path):
    path, images = write_pairs(tmp_path, 6)
    ds = CaptionPairs(path, [images])
    assert len(ds) == 6 and ds.skipped == 0 and ds.image_ids == [str(100 + i) for i in range(6)]
    item = ds[2]
    assert item["index"] == 2 and item["image"].size == (SIZE, SIZE) and item["image"].mode == "RGB"
    assert len(item["captions"]) == 2 and item["captions"][1] == "a scene : " + item["captions"][0]
    assert len(ds[3]["captions"]) == 1
    # a string image_id names the file the same way
    path2, images2 = write_pairs(tmp_path / "str", 3, ids=["a1", "b2", "c3"])
    assert CaptionPairs(path2, [images2]).image_ids == ["a1", "b2", "c3"]


def test_format_detection_tells_pairs_from_coco(tmp_path):
    pairs, _ = write_pairs(tmp_path / "p", 2)
    coco, _, _ = write_coco(tmp_path / "c", 4)
    assert is_pairs_file(pairs) and not is_pairs_file(coco)
    args = lambda data: SimpleNamespace(dataset_type="auto", train_data=data)  # noqa: E731
    assert dataset_type(args(pairs)) == "pairs" and dataset_type(args(coco)) == "coco"


def test_captions_without_an_image_file_are_skipped_and_counted(tmp_path, caplog):
    path, images = write_pairs(tmp_path, 6, missing=(0, 3))
    with caplog.at_level(logging.WARNING, logger="mmfast.train"):
        ds = CaptionPairs(path, [images])
    assert len(ds) == 4 and ds.skipped == 3  # image 0 had two captions, image 3 one
    assert "skipped 3 captions of 2 image_ids" in caplog.text


def test_image_ids_that_do_not_name_the_files_are_a_clear_error(tmp_path):
    path, images = write_pairs(tmp_path, 3)
    for name in os.listdir(images):  # COCO-style zero-padded names: 100.jpg -> 000000000100.jpg
        os.rename(os.path.join(images, name), os.path.join(images, name.rjust(16, "0")))
    with pytest.raises(ValueError, match=r"no image file found.*000000000100\.jpg.*match the file names"):
        CaptionPairs(path, [images])


@pytest.mark.parametrize(
    "data,match",
    [
        ([], "empty list"),
        ({"images": [], "annotations": []}, "must be a JSON list.*--dataset-type coco"),
        ([{"image_id": 1}], "entry 0 must be an object with 'image_id' and 'caption'"),
        ([{"image_id": 1, "caption": "x"}, "oops"], "entry 1 must be an object"),
        ([{"image_id": 1.5, "caption": "x"}], "entry 0: image_id must be an int or a non-empty str"),
        ([{"image_id": "", "caption": "x"}], "image_id must be an int or a non-empty str"),
        ([{"image_id": "../etc/x", "caption": "x"}], "not a path"),
        ([{"image_id": 3, "caption": None}], "caption must be a str"),
    ],
)
def test_bad_annotation_files(tmp_path, data, match):
    path = write_json(tmp_path, data)
    os.makedirs(tmp_path / "images", exist_ok=True)
    with pytest.raises(ValueError, match=match) as e:
        CaptionPairs(path, [str(tmp_path / "images")], flag="--val-data")
    assert "--val-data" in str(e.value)


def test_bad_paths(tmp_path):
    path, images = write_pairs(tmp_path, 2)
    with pytest.raises(ValueError, match="--image-dir is required"):
        CaptionPairs(path, [])
    with pytest.raises(FileNotFoundError, match="--image-dir"):
        CaptionPairs(path, [str(tmp_path / "nowhere")])
    with pytest.raises(FileNotFoundError, match="--train-data"):
        CaptionPairs(str(tmp_path / "none.json"), [images])


def test_coco_captions_of_unknown_image_ids_are_counted(tmp_path, caplog):
    ann, images, _ = write_coco(tmp_path, 4)
    with open(ann) as f:
        data = json.load(f)
    data["annotations"].append({"image_id": 999, "caption": "an image that is not listed"})
    with open(ann, "w") as f:
        json.dump(data, f)
    with caplog.at_level(logging.WARNING, logger="mmfast.train"):
        ds = CocoCaptions([ann], [images])
    assert len(ds) == 4 and ds.skipped == 1
    assert "skipped 1 captions whose image_id is not in the file's 'images' list" in caplog.text


def test_coco_bad_input(tmp_path, caplog):
    """COCO's format: an empty annotation list is an error; an image whose file is missing is
    skipped and counted; a malformed entry is an error naming it."""
    ann, images, _ = write_coco(tmp_path, 4)
    with open(ann) as f:
        data = json.load(f)
    empty = write_json(tmp_path / "empty", {**data, "annotations": []})
    with pytest.raises(ValueError, match="no image with captions found"):
        CocoCaptions([empty], [images], flag="--val-data")
    os.remove(os.path.join(images, data["images"][1]["file_name"]))
    with caplog.at_level(logging.WARNING, logger="mmfast.train"):
        ds = CocoCaptions([ann], [images])
    assert len(ds) == 3 and ds.skipped == 1 and "1 missing image files" in caplog.text
    bad = write_json(tmp_path / "bad", {**data, "annotations": [*data["annotations"], {"caption": "no id"}]})
    with pytest.raises(ValueError, match=r"--train-data .*annotations\[\d+\] must be an object with 'image_id'"):
        CocoCaptions([bad], [images])
    bad = write_json(tmp_path / "bad2", {**data, "images": [{"id": 1}]})
    with pytest.raises(ValueError, match=r"images\[0\] must be an object with 'id' and 'file_name'"):
        CocoCaptions([bad], [images])
