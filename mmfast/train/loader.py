"""Batches for training and evaluation: transforms, skip accounting, rank slices.

A training batch (``Batch``) holds one rank's slice of the global batch: uint8 images
(n, 3, S, S), the tokenized captions, the captions themselves, and the per-sample attributes
when the data set has them (the synthetic scenes: what hard negatives and zero-shot tasks vary).

Random-access data sets (synthetic, CSV, COCO) go through ``StepBatches``: the global batch of step
s is a fixed function of (seed, s), namely positions s*B .. s*B + B - 1 of a per-epoch permutation,
and rank r takes rows r*n .. r*n + n - 1 of it. So the data do not depend on the world size (one
process sees what two see together), and resuming at step s needs no loader state.

An unreadable sample is replaced by another drawn from a seeded stream (the batch keeps its size,
so every rank keeps the same local batch), counted, and reported with the batch; the trainer logs
the count. A data set where ``MAX_CONSECUTIVE_FAILURES`` candidates in a row fail is an error.

Webdataset shards go through ``WebDatasetBatches`` (a stream: shards split over ranks, shard order
shuffled per epoch; a resumed run starts a fresh pass at the resumed step's epoch seed).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mmfast.train.datasets import SampleError

__all__ = ["Batch", "StepBatches", "WebDatasetBatches", "collate", "make_transform"]

log = logging.getLogger("mmfast.train")
MAX_CONSECUTIVE_FAILURES = 20


@dataclass
class Batch:
    """One rank's slice of a global batch.

    images: (n, 3, S, S) uint8. texts: the tokenizer's dict of (n, L) int64. captions: n strings.
    attrs: {name: (n,) int64} or None. indices: (n,) int64 data-set indices. skipped: messages of
    the samples that could not be read and were replaced.
    """

    images: Tensor
    texts: dict[str, Tensor]
    captions: list[str]
    attrs: dict[str, Tensor] | None
    indices: Tensor
    skipped: list[str] = field(default_factory=list)


def make_transform(image_size: int, *, train: bool, augment: bool) -> Callable[[Any], Tensor]:
    """PIL image or uint8 tensor -> uint8 (3, S, S) tensor (torchvision transforms v2).

    Training with ``augment``: RandomResizedCrop(scale=(0.9, 1)) as open_clip; otherwise Resize
    (shorter side) + CenterCrop. A uint8 tensor that is already S x S passes unchanged.
    """
    from torchvision.transforms import v2  # noqa: PLC0415

    if train and augment:
        ops = [v2.RandomResizedCrop(image_size, scale=(0.9, 1.0), antialias=True)]
    else:
        ops = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    pipeline = v2.Compose([v2.ToImage(), *ops])

    def transform(image: Any) -> Tensor:
        if isinstance(image, Tensor) and image.shape[-2:] == (image_size, image_size):
            return image
        return pipeline(image).as_subclass(Tensor).to(torch.uint8)

    return transform


def collate(items: Sequence[dict[str, Any]], tokenizer: Callable, captions: Sequence[str]) -> Batch:
    """Stack transformed items (their "image" already a uint8 tensor) into a ``Batch``."""
    attrs = None
    if items and "attrs" in items[0]:
        attrs = {k: torch.tensor([int(it["attrs"][k]) for it in items], dtype=torch.long) for k in items[0]["attrs"]}
    return Batch(
        images=torch.stack([it["image"] for it in items]),
        texts=tokenizer(list(captions)),
        captions=list(captions),
        attrs=attrs,
        indices=torch.tensor([int(it["index"]) for it in items], dtype=torch.long),
    )


class StepBatches(torch.utils.data.Dataset):
    """``StepBatches(...)[s]`` is rank ``rank``'s ``Batch`` of training step s (see the module doc).

    Args:
        dataset: a random-access data set of items (see ``datasets.py``).
        transform: item image -> uint8 (3, S, S).
        tokenizer: captions -> {"input_ids", "attention_mask"}.
        global_batch: B, the batch over all ranks; must be divisible by ``world_size``.
        rank, world_size: this process's slice.
        seed: fixes the epoch permutations, caption choices and replacements.
        shuffle: permute each epoch (off for the synthetic stream, whose samples are i.i.d.).
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        transform: Callable[[Any], Tensor],
        tokenizer: Callable,
        *,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"--batch-size {global_batch} must be a positive multiple of the world size {world_size}")
        self.dataset, self.transform, self.tokenizer = dataset, transform, tokenizer
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.local_batch = global_batch // world_size
        self.seed, self.shuffle = seed, shuffle
        self.length = len(dataset)
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:  # steps are unbounded; the sampler chooses them
        return 2**62

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.length)
        if not self.shuffle:
            return offset
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng((self.seed, epoch)).permutation(self.length))
        return int(self._perm[1][offset])

    def _load(self, step: int, slot: int, position: int, skipped: list[str]) -> tuple[dict, str]:
        """The item for one batch slot, replacing unreadable samples from a seeded stream."""
        index = self._index(position)
        rng = np.random.default_rng((self.seed, step, self.rank, slot))
        for _ in range(MAX_CONSECUTIVE_FAILURES):
            try:
                item = self.dataset[index]
                item["image"] = self.transform(item["image"])
                caps = item["captions"]
                choice = (
                    caps[0]
                    if len(caps) == 1
                    else caps[np.random.default_rng((self.seed, position)).integers(len(caps))]
                )
                return item, choice
            except SampleError as e:
                skipped.append(str(e))
                index = int(rng.integers(self.length))
        raise RuntimeError(
            f"{MAX_CONSECUTIVE_FAILURES} samples in a row could not be read; the data look unreadable. "
            f"Last errors: {skipped[-3:]}"
        )

    def __getitem__(self, step: int) -> Batch:
        start = step * self.global_batch + self.rank * self.local_batch
        skipped: list[str] = []
        items, captions = [], []
        for slot in range(self.local_batch):
            item, caption = self._load(step, slot, start + slot, skipped)
            items.append(item)
            captions.append(caption)
        batch = collate(items, self.tokenizer, captions)
        batch.skipped = skipped
        return batch


def _identity(src: Any) -> Any:  # a picklable node splitter: the shard list is already per rank
    return src


class WebDatasetBatches:
    """Local batches from webdataset tar shards (image: jpg/jpeg/png/webp, caption: txt).

    Shards are split over ranks (shard k goes to rank k % world_size; fewer shards than ranks is an
    error, since a rank without data would leave the others waiting); each epoch visits this
    rank's shards in a seeded order. Samples whose image does not decode, or that lack an image or
    a caption, are skipped and counted (reported with the batch).
    """

    IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

    def __init__(
        self,
        urls: str,
        transform: Callable[[Any], Tensor],
        tokenizer: Callable,
        *,
        local_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_epoch: int = 0,
    ) -> None:
        self.shards = expand_shards(urls)
        if len(self.shards) < world_size:
            raise ValueError(f"--train-data has {len(self.shards)} shard(s) but there are {world_size} ranks")
        self.my_shards = self.shards[rank::world_size]
        self.transform, self.tokenizer, self.local_batch = transform, tokenizer, local_batch
        self.seed, self.epoch = seed, start_epoch

    def _samples(self, shards: list[str], skipped: list[str]) -> Iterator[dict[str, Any]]:
        import webdataset as wds  # noqa: PLC0415

        def handler(exn: Exception) -> bool:
            skipped.append(f"webdataset: {exn}")
            return True

        ds = wds.WebDataset(shards, shardshuffle=False, nodesplitter=_identity, handler=handler, empty_check=False)
        for i, raw in enumerate(ds):
            key = next((k for k in self.IMAGE_KEYS if k in raw), None)
            where = f"{raw.get('__url__', '?')}:{raw.get('__key__', i)}"
            if key is None or "txt" not in raw:
                skipped.append(f"{where}: missing image or txt entry")
                continue
            try:
                with Image.open(io.BytesIO(raw[key])) as im:
                    image = im.convert("RGB")
            except Exception as e:  # noqa: BLE001 - any decode failure is a skipped sample
                skipped.append(f"{where}: unreadable image: {e}")
                continue
            yield {"image": self.transform(image), "captions": [raw["txt"].decode("utf-8").strip()], "index": i}

    def __iter__(self) -> Iterator[Batch]:
        skipped: list[str] = []
        while True:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.my_shards))
            items, produced = [], 0
            for item in self._samples([self.my_shards[k] for k in order], skipped):
                items.append(item)
                if len(items) == self.local_batch:
                    batch = collate(items, self.tokenizer, [it["captions"][0] for it in items])
                    batch.skipped, skipped = skipped, []
                    produced += 1
                    items = []
                    yield batch
            if produced == 0:
                raise ValueError(
                    f"the shards {self.my_shards} gave fewer than one batch ({self.local_batch}) of readable "
                    f"samples in a whole pass; skipped: {len(skipped)} ({skipped[:3]})"
                )
            self.epoch += 1


def expand_shards(urls: str) -> list[str]:
    """Brace-expanded shard list ("data/{000..009}.tar"), also "::"-separated lists; every local
    shard must exist."""
    import os  # noqa: PLC0415

    import braceexpand  # noqa: PLC0415 - a webdataset dependency

    shards = [s for part in urls.split("::") for s in braceexpand.braceexpand(part)]
    missing = [s for s in shards if "://" not in s and not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"webdataset shard(s) not found: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return shards
