"""mmfast.train's data: the synthetic scenes, tokenizers, CSV / COCO / webdataset on generated
fixture files, bad input (missing paths, empty CSV, wrong columns, corrupt images) and the
world-size-independent batching.

The fixture writers here are shared with the other test_train_* files.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mmfast.train import synthetic
from mmfast.train.datasets import CocoCaptions, CsvDataset, SampleError, load_image
from mmfast.train.loader import StepBatches, WebDatasetBatches, make_transform
from mmfast.train.tokenizers import EOS, PAD, UNK, ByteTokenizer, WordTokenizer, build_tokenizer

SIZE = 48


# ------------------------------------------------------------------------------------------------
# fixture writers (rendered scenes saved as image files with their captions)
# ------------------------------------------------------------------------------------------------


def scene_files(folder, n: int, *, fmt: str = "png", seed: int = 0, corrupt: tuple[int, ...] = ()) -> list[tuple]:
    """n scenes written to folder/img_{i}.{fmt}; (file name, caption) pairs. Files listed in
    ``corrupt`` hold garbage bytes instead of an image."""
    os.makedirs(folder, exist_ok=True)
    ds = synthetic.SyntheticScenes("train", n, seed=seed, image_size=SIZE)
    out = []
    for i in range(n):
        sample = ds[i]
        name = f"img_{i}.{fmt}"
        path = os.path.join(folder, name)
        if i in corrupt:
            with open(path, "wb") as f:
                f.write(b"\x89PNG not really an image")
        else:
            Image.fromarray(sample["image"].permute(1, 2, 0).numpy()).save(path)
        out.append((name, sample["caption"]))
    return out


def write_csv(folder, n: int, *, sep: str = "\t", img_key="filepath", cap_key="title", corrupt=()) -> str:
    pairs = scene_files(os.path.join(folder, "images"), n, corrupt=corrupt)
    path = os.path.join(folder, "data.csv")
    with open(path, "w") as f:
        f.write(f"{img_key}{sep}{cap_key}\n")
        for name, cap in pairs:
            f.write(f"images/{name}{sep}{cap}\n")
    return path


def write_coco(folder, n: int, *, missing=(), no_caption=()) -> tuple[str, str, str]:
    """A COCO captions JSON (two captions per image), the image folder and a Karpathy split JSON
    (the last quarter of the images is "val", one image "restval", the rest "train")."""
    images_dir = os.path.join(folder, "train2017")
    pairs = scene_files(images_dir, n, fmt="jpg")
    for i in missing:
        os.remove(os.path.join(images_dir, pairs[i][0]))
    images = [{"id": 100 + i, "file_name": name} for i, (name, _) in enumerate(pairs)]
    anns = []
    for i, (_, cap) in enumerate(pairs):
        if i not in no_caption:
            anns += [{"image_id": 100 + i, "caption": cap}, {"image_id": 100 + i, "caption": "a scene : " + cap}]
    ann_path = os.path.join(folder, "captions_train2017.json")
    with open(ann_path, "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    split = ["val" if i >= 3 * n // 4 else ("restval" if i == 0 else "train") for i in range(n)]
    karpathy = {
        "images": [{"filename": name, "cocoid": 100 + i, "split": split[i]} for i, (name, _) in enumerate(pairs)]
    }
    karpathy_path = os.path.join(folder, "dataset_coco.json")
    with open(karpathy_path, "w") as f:
        json.dump(karpathy, f)
    return ann_path, images_dir, karpathy_path


def write_shards(folder, n_shards: int, per_shard: int, *, corrupt=(), seed: int = 0) -> str:
    """Webdataset tar shards folder/shard-{0..n-1}.tar with key.png + key.txt members; the
    global sample numbers in ``corrupt`` get garbage image bytes. Returns the brace pattern."""
    os.makedirs(folder, exist_ok=True)
    ds = synthetic.SyntheticScenes("train", n_shards * per_shard, seed=seed, image_size=SIZE)
    for s in range(n_shards):
        with tarfile.open(os.path.join(folder, f"shard-{s}.tar"), "w") as tar:
            for j in range(per_shard):
                k = s * per_shard + j
                buf = io.BytesIO()
                Image.fromarray(ds[k]["image"].permute(1, 2, 0).numpy()).save(buf, format="PNG")
                image = b"garbage" if k in corrupt else buf.getvalue()
                for ext, data in (("png", image), ("txt", ds[k]["caption"].encode())):
                    info = tarfile.TarInfo(f"sample{k:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(folder, "shard-{0.." + str(n_shards - 1) + "}.tar")


def word_tokenizer():
    return WordTokenizer(synthetic.vocabulary(), 32)


# ------------------------------------------------------------------------------------------------
# synthetic scenes and tokenizers
# ------------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_splits_differ():
    a, b = synthetic.SyntheticScenes("val", 50, seed=3), synthetic.SyntheticScenes("val", 50, seed=3)
    for i in (0, 17, 49):
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"]
        assert a[i]["image"].dtype == torch.uint8 and a[i]["image"].shape == (3, 48, 48)
    train = synthetic.SyntheticScenes("train", 50, seed=3)
    other_seed = synthetic.SyntheticScenes("val", 50, seed=4)
    assert sum(train[i]["caption"] == a[i]["caption"] for i in range(50)) <= 1
    assert sum(other_seed[i]["caption"] == a[i]["caption"] for i in range(50)) <= 1
    with pytest.raises(ValueError, match="split"):
        synthetic.SyntheticScenes("holdout", 5)
    with pytest.raises(IndexError):
        a[50]


def test_held_out_captions_nearly_unique_and_grounded():
    ds = synthetic.SyntheticScenes("val", 1000, seed=0)
    attrs = [ds.attributes(i) for i in range(1000)]
    captions = [synthetic.caption(a) for a in attrs]
    assert len(set(captions)) >= 990
    vocab = set(synthetic.vocabulary())
    assert all(set(c.split()) <= vocab for c in captions)
    # every attribute value is used, and every caption names each group's colour and shape
    for q in range(4):
        used = [a for a in attrs if a[f"q{q}_count"] > 0]
        assert {a[f"q{q}_colour"] for a in used} == set(range(len(synthetic.COLOURS)))
    a = attrs[0]
    for q in range(4):
        if a[f"q{q}_count"]:
            assert tuple(synthetic.COLOURS)[a[f"q{q}_colour"]] in captions[0]
            assert synthetic.QUADRANTS[q] in captions[0]


def test_rendering_draws_the_described_colours():
    attrs = {"bg": 0, **{f"q{q}_{k}": -1 for q in range(4) for k in ("size", "colour", "shape")}}
    attrs.update({f"q{q}_count": 0 for q in range(4)})
    attrs.update(q1_count=2, q1_size=1, q1_colour=0, q1_shape=1)  # two large red squares, top right
    img = np.asarray(synthetic.render(attrs, 48, np.random.default_rng(0))).astype(int)
    red = (img[..., 0] > 150) & (img[..., 1] < 90)
    assert red[:24, 24:].sum() > 40 and red[:, :24].sum() == 0 and red[24:].sum() == 0


def test_word_tokenizer_layout():
    tok = word_tokenizer()
    text = "two small red circles in the top left on a grey background"
    out = tok([text, "zebra"])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape == (2, 32) and ids.dtype == torch.long
    n = int(mask[0].sum())
    assert n == len(text.split()) + 2 and ids[0, n - 1] == EOS and (ids[0, n:] == PAD).all()
    assert ids[1, 1] == UNK
    long = tok([" ".join(["red"] * 100)])
    assert long["input_ids"][0, -1] == EOS and long["attention_mask"].all()
    again = build_tokenizer(tok.spec())
    assert torch.equal(again(["red circle"])["input_ids"], tok(["red circle"])["input_ids"])
    with pytest.raises(TypeError):
        tok("not a list")


def test_byte_tokenizer():
    tok = ByteTokenizer(16)
    out = tok(["héllo"])
    n = int(out["attention_mask"][0].sum())
    assert n == len("héllo".encode()) + 2 and out["input_ids"][0, n - 1] == EOS
    assert bytes(int(i) - 4 for i in out["input_ids"][0, 1 : n - 1]).decode() == "héllo"


# ------------------------------------------------------------------------------------------------
# CSV, COCO, webdataset
# ------------------------------------------------------------------------------------------------


def test_csv_loads_with_open_clip_flags(tmp_path):
    path = write_csv(tmp_path, 6, sep=",", img_key="image", cap_key="text")
    ds = CsvDataset(path, img_key="image", caption_key="text", separator=",")
    assert len(ds) == 6
    item = ds[2]
    assert (
        item["image"].size == (SIZE, SIZE)
        and item["captions"][0] == synthetic.SyntheticScenes("train", 6)[2]["caption"]
    )


@pytest.mark.parametrize(
    "content, kwargs, error, match",
    [
        (None, {}, FileNotFoundError, "--train-data"),
        ("", {}, ValueError, "empty"),
        ("filepath\ttitle\n", {}, ValueError, "no rows"),
        ("filepath\ttitle\na.png\tx\n", {"img_key": "path"}, ValueError, "--csv-img-key 'path'"),
        ("filepath\ttitle\na.png\tx\n", {"caption_key": "caption"}, ValueError, "--csv-caption-key"),
        ("filepath,title\na.png,x\n", {}, ValueError, "--csv-separator"),  # tab expected, commas given
    ],
)
def test_csv_bad_input_is_a_clear_error(tmp_path, content, kwargs, error, match):
    path = tmp_path / "data.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=match):
        CsvDataset(str(path), **kwargs)


def test_coco_captions_with_karpathy_split(tmp_path, caplog):
    ann, images, karpathy = write_coco(tmp_path, 8, missing=(2,), no_caption=(3,))
    with caplog.at_level(logging.WARNING, logger="mmfast.train"):
        full = CocoCaptions([ann], [images])
    assert len(full) == 6 and "skipped 1 images without captions and 1 missing image files" in caplog.text
    assert all(len(c) == 2 for c in full.captions)
    train = CocoCaptions([ann], [images], karpathy=karpathy, split="train")  # train + restval
    val = CocoCaptions([ann], [images], karpathy=karpathy, split="val")
    assert sorted(train.image_ids) == [100, 101, 104, 105] and sorted(val.image_ids) == [106, 107]
    with pytest.raises(ValueError, match="no image in split 'test'"):
        CocoCaptions([ann], [images], karpathy=karpathy, split="test")
    with pytest.raises(FileNotFoundError, match="--coco-images"):
        CocoCaptions([ann], [str(tmp_path / "nope")])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoCaptions([str(tmp_path / "bad.json")], [images])


def test_webdataset_batches_skip_corrupt_samples(tmp_path):
    pattern = write_shards(tmp_path, 2, 5, corrupt=(3,))
    transform = make_transform(SIZE, train=False, augment=False)
    stream = iter(WebDatasetBatches(pattern, transform, word_tokenizer(), local_batch=4))
    first, second = next(stream), next(stream)
    assert first.images.shape == (4, 3, SIZE, SIZE) and first.images.dtype == torch.uint8
    assert len(first.skipped) + len(second.skipped) == 1 and "unreadable image" in first.skipped[0] + "".join(
        second.skipped
    )
    assert next(stream).images.shape[0] == 4  # the next epoch goes on
    with pytest.raises(ValueError, match="2 shard"):
        WebDatasetBatches(pattern, transform, word_tokenizer(), local_batch=4, rank=0, world_size=3)
    with pytest.raises(FileNotFoundError, match="shard"):
        WebDatasetBatches(str(tmp_path / "x-{0..1}.tar"), transform, word_tokenizer(), local_batch=4)


def test_webdataset_without_readable_samples_is_an_error(tmp_path):
    pattern = write_shards(tmp_path, 1, 3, corrupt=(0, 1, 2))
    stream = iter(
        WebDatasetBatches(pattern, make_transform(SIZE, train=False, augment=False), word_tokenizer(), local_batch=2)
    )
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(stream)


# ------------------------------------------------------------------------------------------------
# batching: corrupt images, world-size independence
# ------------------------------------------------------------------------------------------------


def _steps(ds, batch, **kw):
    return StepBatches(ds, make_transform(SIZE, train=False, augment=False), word_tokenizer(), global_batch=batch, **kw)


def test_corrupt_images_are_replaced_and_counted(tmp_path):
    path = write_csv(tmp_path, 10, corrupt=(1, 4))
    ds = CsvDataset(path)
    with pytest.raises(SampleError, match="img_1.png"):
        ds[1]
    batches = _steps(ds, 10, shuffle=False)
    b = batches[0]
    assert b.images.shape[0] == 10 and len(b.skipped) >= 2  # full batch; each unreadable draw counted
    assert any("img_1.png" in m for m in b.skipped) and any("img_4.png" in m for m in b.skipped)
    assert 1 not in b.indices.tolist() and 4 not in b.indices.tolist()


def test_unreadable_data_set_is_an_error_not_a_hang(tmp_path):
    path = write_csv(tmp_path, 3, corrupt=(0, 1, 2))
    with pytest.raises(RuntimeError, match="could not be read"):
        _steps(CsvDataset(path), 2)[0]


def test_global_batch_does_not_depend_on_world_size(tmp_path):
    ds = synthetic.SyntheticScenes("train", 40, seed=1)
    one = _steps(ds, 8, seed=5)
    two = [_steps(ds, 8, seed=5, rank=r, world_size=2) for r in range(2)]
    for step in (0, 4, 7):  # step 5 crosses into the second epoch (40 items / 8)
        whole = one[step]
        halves = [t[step] for t in two]
        assert torch.equal(whole.images, torch.cat([h.images for h in halves]))
        assert whole.captions == halves[0].captions + halves[1].captions
        assert torch.equal(whole.attrs["bg"], torch.cat([h.attrs["bg"] for h in halves]))
    epoch0 = torch.cat([one[s].indices for s in range(5)])
    assert sorted(epoch0.tolist()) == list(range(40))  # an epoch visits every item once
    with pytest.raises(ValueError, match="multiple of the world size"):
        _steps(ds, 9, rank=0, world_size=2)


def test_make_data_rejects_batch_not_divisible_by_world():
    from mmfast.train.data_setup import make_data  # noqa: PLC0415
    from mmfast.train.distributed import Dist  # noqa: PLC0415

    args = SimpleNamespace(dataset_type="synthetic", batch_size=7, train_data=None)
    with pytest.raises(ValueError, match="--batch-size 7 is not divisible by the world size 2"):
        make_data(args, None, None, Dist(rank=0, world_size=2))


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(SampleError, match="missing image file"):
        load_image(str(tmp_path / "none.png"))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(SampleError, match="bad.jpg"):
        load_image(str(tmp_path / "bad.jpg"))
