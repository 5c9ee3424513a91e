"""Tokenizers that need no download.

Every tokenizer maps a list of captions to {"input_ids": (B, L) int64, "attention_mask": (B, L)
int64} (1 = token, 0 = padding) padded to its ``context_length``, with the end-of-text token at
the last real position (CLIP pools there), and describes itself with ``spec()`` so that a
checkpoint can rebuild it (``build_tokenizer(spec)``).

* ``words``: a word-level vocabulary (the synthetic grammar's words by default); unknown words map
  to <unk>.
* ``bytes``: UTF-8 bytes, for any text (real captions with the small default model).
* ``hf:PATH``: a transformers tokenizer saved in a local folder (``AutoTokenizer``).
* ``open_clip:ARCH``: open_clip's tokenizer for ARCH (its BPE vocabulary ships with the package).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["ByteTokenizer", "Tokenizer", "WordTokenizer", "build_tokenizer"]

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")


class Tokenizer(Protocol):
    vocab_size: int
    context_length: int
    eos_token_id: int
    pad_token_id: int

    def __call__(self, texts: Sequence[str]) -> dict[str, Tensor]: ...

    def spec(self) -> dict[str, Any]: ...


def _pack(rows: list[list[int]], context_length: int) -> dict[str, Tensor]:
    """<bos> ids <eos>, truncated so that <eos> stays last, padded with <pad>."""
    ids = torch.full((len(rows), context_length), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), context_length), dtype=torch.long)
    for i, row in enumerate(rows):
        row = [BOS, *row[: context_length - 2], EOS]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str")


class WordTokenizer:
    """Whitespace-separated words over a fixed vocabulary (case-folded)."""

    def __init__(self, words: Sequence[str], context_length: int = 32) -> None:
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3, got {context_length}")
        self.words = [w for w in dict.fromkeys(words) if w not in SPECIALS]
        self.index = {w: i + len(SPECIALS) for i, w in enumerate(self.words)}
        self.vocab_size = len(SPECIALS) + len(self.words)
        self.context_length = context_length
        self.eos_token_id, self.pad_token_id = EOS, PAD

    def __call__(self, texts: Sequence[str]) -> dict[str, Tensor]:
        _check_texts(texts)
        return _pack([[self.index.get(w, UNK) for w in t.lower().split()] for t in texts], self.context_length)

    def spec(self) -> dict[str, Any]:
        return {"kind": "words", "words": list(self.words), "context_length": self.context_length}


class ByteTokenizer:
    """UTF-8 bytes (ids 4..259)."""

    def __init__(self, context_length: int = 77) -> None:
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3, got {context_length}")
        self.vocab_size = len(SPECIALS) + 256
        self.context_length = context_length
        self.eos_token_id, self.pad_token_id = EOS, PAD

    def __call__(self, texts: Sequence[str]) -> dict[str, Tensor]:
        _check_texts(texts)
        return _pack([[b + len(SPECIALS) for b in t.encode("utf-8")] for t in texts], self.context_length)

    def spec(self) -> dict[str, Any]:
        return {"kind": "bytes", "context_length": self.context_length}


class HFTokenizer:
    """A transformers tokenizer from a local folder, padded to ``context_length``."""

    def __init__(self, path: str, context_length: int) -> None:
        from transformers import AutoTokenizer  # noqa: PLC0415

        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
        self.path, self.context_length = path, context_length
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self.tok)
        self.eos_token_id, self.pad_token_id = self.tok.eos_token_id, self.tok.pad_token_id or 0

    def __call__(self, texts: Sequence[str]) -> dict[str, Tensor]:
        _check_texts(texts)
        out = self.tok(
            list(texts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return {"input_ids": out["input_ids"].long(), "attention_mask": out["attention_mask"].long()}

    def spec(self) -> dict[str, Any]:
        return {"kind": "hf", "path": self.path, "context_length": self.context_length}


class OpenClipTokenizer:
    """open_clip's tokenizer for an architecture; returns input_ids only in the dict (open_clip's
    text towers find the end of text themselves), plus an all-ones attention_mask for uniformity."""

    def __init__(self, arch: str) -> None:
        import open_clip  # noqa: PLC0415

        self.arch = arch
        self.tok = open_clip.get_tokenizer(arch)
        self.context_length = int(getattr(self.tok, "context_length", 77))
        self.vocab_size = int(getattr(self.tok, "vocab_size", 0))
        self.eos_token_id, self.pad_token_id = int(getattr(self.tok, "eot_token_id", 0) or 0), 0

    def __call__(self, texts: Sequence[str]) -> dict[str, Tensor]:
        _check_texts(texts)
        ids = self.tok(list(texts)).long()
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def spec(self) -> dict[str, Any]:
        return {"kind": "open_clip", "arch": self.arch}


def build_tokenizer(spec: dict[str, Any]) -> Tokenizer:
    """The tokenizer a ``spec()`` describes."""
    kind = spec.get("kind")
    if kind == "words":
        return WordTokenizer(spec["words"], spec.get("context_length", 32))
    if kind == "bytes":
        return ByteTokenizer(spec.get("context_length", 77))
    if kind == "hf":
        return HFTokenizer(spec["path"], spec.get("context_length", 77))
    if kind == "open_clip":
        return OpenClipTokenizer(spec["arch"])
    raise ValueError(f"unknown tokenizer kind {kind!r} (expected words, bytes, hf or open_clip)")
