"""From command-line arguments to a tokenizer, training batches and the held-out set.

``--dataset-type auto`` picks by ``--train-data``: none -> synthetic; *.csv / *.tsv -> csv;
*.json -> pairs when its top level is a list (the seed's ``[{image_id, caption}]``), else coco;
*.tar or a brace pattern -> webdataset.

Held-out data: the synthetic "val" split; ``--val-data`` for the real formats; for COCO with
``--coco-karpathy``, its ``--coco-val-split``; without any of these, CSV and COCO hold out
``--val-samples`` items of the training file (a seeded choice, excluded from training); so do
``pairs`` files without ``--val-data``.
``--val-samples 0`` turns evaluation off.
"""

from __future__ import annotations

import io
import logging
import os
from argparse import Namespace
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from mmfast.train import synthetic
from mmfast.train.caption_pairs import CaptionPairs, is_pairs_file
from mmfast.train.datasets import CocoCaptions, CsvDataset
from mmfast.train.distributed import Dist
from mmfast.train.evaluate import EvalSet
from mmfast.train.loader import StepBatches, WebDatasetBatches, expand_shards, make_transform
from mmfast.train.models import ClipModel
from mmfast.train.tokenizers import ByteTokenizer, HFTokenizer, OpenClipTokenizer, Tokenizer, WordTokenizer

__all__ = ["dataset_type", "make_data", "make_tokenizer"]

log = logging.getLogger("mmfast.train")
SYNTHETIC_CONTEXT = 32
SYNTHETIC_TRAIN_LENGTH = 2**40  # sample i is generated on demand: the stream never repeats


def dataset_type(args: Namespace) -> str:
    """The data format ``--dataset-type`` names, or the one ``--train-data`` implies for "auto"."""
    kind = args.dataset_type
    if kind != "auto":
        return kind
    data = args.train_data or ""
    if not data:
        return "synthetic"
    if data.endswith((".csv", ".tsv")):
        return "csv"
    if data.endswith(".json"):
        first = data.split(",")[0]
        return "pairs" if os.path.isfile(first) and is_pairs_file(first) else "coco"
    if data.endswith(".tar") or "{" in data or "::" in data:
        return "webdataset"
    raise ValueError(f"cannot tell the format of --train-data {data!r}; set --dataset-type csv|coco|webdataset")


def make_tokenizer(args: Namespace) -> Tokenizer:
    """``--tokenizer``: auto (open_clip's for open_clip models, the folder's for hf:PATH when it has
    one, grammar words for synthetic data, bytes otherwise), words, bytes, hf:PATH."""
    choice = args.tokenizer
    if choice == "auto":
        if args.model.startswith("open_clip:"):
            return OpenClipTokenizer(args.model[len("open_clip:") :].partition(":")[0])
        if args.model.startswith("hf:") and _has_hf_tokenizer(args.model[3:]):
            return HFTokenizer(args.model[3:], _hf_context_length(args.model[3:]))
        choice = "words" if dataset_type(args) == "synthetic" else "bytes"
    if choice == "words":
        return WordTokenizer(synthetic.vocabulary(), SYNTHETIC_CONTEXT)
    if choice == "bytes":
        return ByteTokenizer(args.context_length)
    if choice.startswith("hf:"):
        return HFTokenizer(choice[3:], args.context_length)
    raise ValueError(f"--tokenizer must be auto, words, bytes or hf:PATH, got {choice!r}")


def _has_hf_tokenizer(path: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    return any(os.path.isfile(os.path.join(path, n)) for n in names)


def _hf_context_length(path: str) -> int:
    from transformers import AutoConfig  # noqa: PLC0415

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return int(getattr(config, "text_config", config).max_position_embeddings)


def _csv(args: Namespace, path: str, flag: str) -> CsvDataset:
    return CsvDataset(
        path,
        img_key=args.csv_img_key,
        caption_key=args.csv_caption_key,
        separator=args.csv_separator,
        root=args.data_root,
        flag=flag,
    )


def _coco(args: Namespace, path: str, flag: str, split: str) -> CocoCaptions:
    dirs = [p for p in (args.coco_images or "").split(",") if p]
    return CocoCaptions(path.split(","), dirs, karpathy=args.coco_karpathy, split=split, flag=flag)


def _pairs(args: Namespace, path: str, flag: str) -> CaptionPairs:
    return CaptionPairs(path, [p for p in (args.image_dir or "").split(",") if p], flag=flag)


def _train_val_datasets(args: Namespace) -> tuple[Any, Any]:
    """(training data set, held-out data set or None) for the random-access formats."""
    kind = dataset_type(args)
    if kind == "pairs":
        train = _pairs(args, args.train_data, "--train-data")
        val = _pairs(args, args.val_data, "--val-data") if args.val_data else None
    elif kind == "csv":
        train, val = _csv(args, args.train_data, "--train-data"), None
        if args.val_data:
            val = _csv(args, args.val_data, "--val-data")
    elif kind == "coco":
        train = _coco(args, args.train_data, "--train-data", "train")
        val = None
        if args.val_data:
            val = _coco(args, args.val_data, "--val-data", args.coco_val_split)
        elif args.coco_karpathy:
            val = _coco(args, args.train_data, "--train-data", args.coco_val_split)
    else:
        raise ValueError(f"--dataset-type must be synthetic, csv, coco, pairs or webdataset, got {kind!r}")
    if val is None and args.val_samples > 0:
        train, val = _hold_out(train, args.val_samples, args.seed)
    return train, val


def _hold_out(dataset: Any, n: int, seed: int) -> tuple[Any, Any]:
    if n >= len(dataset):
        raise ValueError(
            f"--val-samples {n} would hold out the whole training set ({len(dataset)} items); pass --val-data or a "
            "smaller --val-samples"
        )
    perm = np.random.default_rng((seed, 7)).permutation(len(dataset))
    log.info(f"holding out {n} of {len(dataset)} training items for evaluation (no --val-data)")
    return torch.utils.data.Subset(dataset, sorted(perm[n:].tolist())), torch.utils.data.Subset(
        dataset, sorted(perm[:n].tolist())
    )


def make_data(
    args: Namespace, model: ClipModel, tokenizer: Tokenizer, d: Dist
) -> tuple[Callable[[int], Iterator], EvalSet | None]:
    """(a function start_step -> iterator over this rank's ``Batch`` of steps start_step, ...;
    this rank's share of the held-out items, or None with --val-samples 0)."""
    kind = dataset_type(args)
    if args.batch_size < 1 or args.batch_size % d.world_size:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the world size {d.world_size}")
    train, val = (None, None) if kind in ("synthetic", "webdataset") else _train_val_datasets(args)
    return _train_batches(args, model, tokenizer, d, kind, train), _evalset(args, model, d, kind, val)


def _train_batches(
    args: Namespace, model: ClipModel, tokenizer: Tokenizer, d: Dist, kind: str, train: Any
) -> Callable[[int], Iterator]:
    transform = make_transform(model.image_size, train=True, augment=args.augment)
    if kind == "webdataset":
        stream = WebDatasetBatches(
            args.train_data, transform, tokenizer, local_batch=args.batch_size // d.world_size, rank=d.rank,
            world_size=d.world_size, seed=args.seed,
        )  # fmt: skip

        def start_wds(start: int) -> Iterator:
            stream.epoch = start  # a resumed stream starts a fresh seeded pass
            return iter(stream)

        return start_wds
    if kind == "synthetic":
        length = args.train_samples or SYNTHETIC_TRAIN_LENGTH
        data = synthetic.SyntheticScenes("train", length, seed=args.seed, image_size=model.image_size)
        shuffle = bool(args.train_samples)
    else:
        data, shuffle = train, True
    steps = StepBatches(
        data, transform, tokenizer, global_batch=args.batch_size, rank=d.rank, world_size=d.world_size,
        seed=args.seed, shuffle=shuffle,
    )  # fmt: skip

    def start_map(start: int) -> Iterator:
        loader = torch.utils.data.DataLoader(
            steps, batch_size=None, sampler=range(start, args.steps), num_workers=args.workers,
            prefetch_factor=2 if args.workers else None,
        )  # fmt: skip
        return iter(loader)

    return start_map


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return dict(self.items[i])


def _wds_items(urls: str, limit: int) -> _ListDataset:
    """The first ``limit`` readable samples of webdataset shards, as a list (for evaluation)."""
    import webdataset as wds  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    items = []
    for raw in wds.WebDataset(expand_shards(urls), shardshuffle=False, empty_check=False):
        key = next((k for k in WebDatasetBatches.IMAGE_KEYS if k in raw), None)
        if key is None or "txt" not in raw:
            continue
        try:
            with Image.open(io.BytesIO(raw[key])) as im:
                image = im.convert("RGB")
        except Exception:  # noqa: BLE001,S112 - an unreadable held-out image is left out
            continue
        items.append({"image": image, "captions": [raw["txt"].decode("utf-8").strip()], "index": len(items)})
        if len(items) >= limit:
            break
    if not items:
        raise ValueError(f"--val-data {urls!r} has no readable sample")
    return _ListDataset(items)


def _evalset(args: Namespace, model: ClipModel, d: Dist, kind: str, val: Any) -> EvalSet | None:
    if args.val_samples <= 0:
        return None
    transform = make_transform(model.image_size, train=False, augment=False)
    if kind == "synthetic":
        val = synthetic.SyntheticScenes("val", args.val_samples, seed=args.seed, image_size=model.image_size)
    elif kind == "webdataset":
        if not args.val_data:
            raise ValueError("webdataset training needs --val-data (held-out shards) or --val-samples 0")
        val = _wds_items(args.val_data, args.val_samples)
    return EvalSet(val, transform, rank=d.rank, world_size=d.world_size, limit=args.val_samples)
