"""GradCache: a contrastive step over a batch larger than the towers' activations allow.

Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (2021),
https://arxiv.org/abs/2101.06983. For towers f (images) and g (texts) and a loss L over the whole
batch's embeddings:

    pass 1   x_c = f(images_c), y_c = g(texts_c) per chunk c, without a graph (no activations kept);
             each chunk's RNG state is recorded before it runs
    loss     X = cat(x_c), Y = cat(y_c) as leaves; loss = L(X, Y); loss.backward()
             -> dL/dX, dL/dY (the "cached gradients") and the gradients of L's own parameters
             (a learnable logit_scale / logit_bias)
    pass 2   per chunk, with its recorded RNG state restored: x_c = f(images_c) with a graph,
             x_c.backward(dL/dX[c]); the same for the texts

By the chain rule dL/dtheta = sum_c (dL/dx_c) (dx_c/dtheta), so the accumulated ``.grad`` equals
that of ``L(f(images), g(texts)).backward()`` while only one chunk's activations exist at a time;
the cost is one extra forward. With the RNG replayed, dropout draws the same masks in both passes,
and pass 1 consumes the generators exactly as a plain chunked forward in the same order (images,
then texts), which the step leaves them in.

Under DDP, gradients are synchronised once per tower, on its last replayed chunk (``no_sync`` on
the others); an FSDP2 module (``fully_shard``) gets ``set_requires_gradient_sync(False)`` on all but
the last chunk, so it reduce-scatters once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["GradCache", "call_model", "split_inputs"]

Embedding = Tensor | tuple[Tensor, ...]


def _batch_size(inputs: Any, name: str) -> int:
    """The common dim-0 size of a tensor / Mapping / list or tuple of tensors (non-tensor values of
    a Mapping or sequence are passed to every chunk unchanged)."""
    if isinstance(inputs, Tensor):
        tensors = {name: inputs}
    elif isinstance(inputs, Mapping):
        tensors = {f"{name}[{k!r}]": v for k, v in inputs.items() if isinstance(v, Tensor)}
    elif isinstance(inputs, list | tuple):
        tensors = {f"{name}[{i}]": v for i, v in enumerate(inputs) if isinstance(v, Tensor)}
    else:
        raise TypeError(f"{name} must be a Tensor, a Mapping of tensors or a list/tuple of tensors, got {type(inputs)}")
    if not tensors:
        raise ValueError(f"{name} holds no tensor to split along dim 0")
    sizes = {}
    for key, t in tensors.items():
        if t.dim() == 0:
            raise ValueError(f"{key} is 0-dimensional; inputs are split along dim 0")
        sizes[key] = t.shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{name}: tensors disagree on the batch size (dim 0): {sizes}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"{name} is an empty batch (dim 0 has size 0)")
    return n


def split_inputs(inputs: Any, chunk_size: int) -> list[Any]:
    """Split a tensor, a Mapping of tensors or a list/tuple of tensors along dim 0 into chunks of
    ``chunk_size`` rows (the last one may be smaller); non-tensor entries are repeated."""
    n = _batch_size(inputs, "inputs")
    bounds = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    if isinstance(inputs, Tensor):
        return [inputs[a:b] for a, b in bounds]
    if isinstance(inputs, Mapping):
        return [{k: v[a:b] if isinstance(v, Tensor) else v for k, v in inputs.items()} for a, b in bounds]
    return [type(inputs)(v[a:b] if isinstance(v, Tensor) else v for v in inputs) for a, b in bounds]


def call_model(model: Callable[..., Any], chunk: Any) -> Any:
    """``model(**chunk)`` for a Mapping, ``model(*chunk)`` for a list/tuple, else ``model(chunk)``."""
    if isinstance(chunk, Mapping):
        return model(**chunk)
    if isinstance(chunk, list | tuple):
        return model(*chunk)
    return model(chunk)


def _as_tuple(out: Any, what: str) -> tuple[Tensor, ...]:
    if isinstance(out, Tensor):
        return (out,)
    if isinstance(out, list | tuple) and out and all(isinstance(t, Tensor) for t in out):
        return tuple(out)
    raise TypeError(f"{what} must return a Tensor or a tuple of tensors, got {type(out).__name__}")


class _RngStates:
    """The CPU generator's state before each of ``n`` chunks and, when CUDA is initialised, every
    CUDA device's, in one buffer allocated up front.

    One buffer rather than a small tensor per chunk: those small blocks, each allocated just before
    a chunk's large activations, would pin the heap above them (glibc malloc), so the resident size
    would ratchet up chunk after chunk (measured: ~5 MB per chunk of 512 with the tiny towers).
    """

    def __init__(self, n: int) -> None:
        cpu = torch.get_rng_state()
        self.cpu = cpu.new_empty((n, cpu.numel()))
        self.cuda: Tensor | None = None
        if torch.cuda.is_initialized():
            cuda = torch.stack(torch.cuda.get_rng_state_all())
            self.cuda = cuda.new_empty((n, *cuda.shape))

    def record(self, i: int) -> None:
        """Save the generators' current states as chunk i's."""
        self.cpu[i] = torch.get_rng_state()
        if self.cuda is not None:
            self.cuda[i] = torch.stack(torch.cuda.get_rng_state_all())

    @contextlib.contextmanager
    def replay(self, i: int) -> Iterator[None]:
        """Run the block from chunk i's states; the generators are put back as they were afterwards."""
        devices = list(range(self.cuda.shape[1])) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu[i].clone())  # a view of the buffer is not accepted as a state
            if self.cuda is not None:
                torch.cuda.set_rng_state_all([s.clone() for s in self.cuda[i]])
            yield


def _sync_context(model: Any, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's all-reduce / FSDP2's reduce-scatter unless ``sync``."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 (fully_shard)
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(model, "no_sync"):  # DistributedDataParallel
        return model.no_sync()
    return contextlib.nullcontext()


class GradCache:
    """Chunked two-pass contrastive step whose gradients equal the full batch's.

    Args:
        image_model: module called on each image chunk: ``image_model(chunk)`` for a tensor,
            ``image_model(**chunk)`` for a Mapping, ``image_model(*chunk)`` for a list/tuple.
            Returns (c, D) embeddings, or a tuple of tensors with c rows each.
        text_model: the same for texts (may be the same module as ``image_model``).
        loss_fn: ``loss_fn(image_embeddings, text_embeddings) -> scalar`` over the whole batch
            (the embeddings of all chunks concatenated along dim 0); parameters it uses (a
            learnable logit scale) receive their gradient once per step.
        chunk_size: rows per chunk for both modalities; ``text_chunk_size`` overrides it for texts.

    ``step(images, texts)`` accumulates ``.grad`` exactly as
    ``loss_fn(image_model(images), text_model(texts)).backward()`` would, and returns the loss
    (detached). Call it inside ``torch.autocast`` to run the towers and the loss under autocast.
    """

    def __init__(
        self,
        image_model: Callable[..., Any],
        text_model: Callable[..., Any],
        loss_fn: Callable[..., Tensor],
        chunk_size: int,
        *,
        text_chunk_size: int | None = None,
    ) -> None:
        for name, size in (("chunk_size", chunk_size), ("text_chunk_size", text_chunk_size)):
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                raise ValueError(f"{name} must be a positive int, got {size!r}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(image_embeddings, text_embeddings) -> scalar")
        self.image_model, self.text_model, self.loss_fn = image_model, text_model, loss_fn
        self.chunk_size, self.text_chunk_size = chunk_size, text_chunk_size or chunk_size

    # pass 1 ---------------------------------------------------------------------------------------
    def _embed(self, model: Callable, chunks: Sequence[Any], name: str) -> tuple[_RngStates, tuple[Tensor, ...]]:
        """Run every chunk without a graph; their RNG states and the embeddings of all chunks.

        The embeddings are copied into buffers for the whole batch, allocated once chunk 0 shows
        their shape, and each chunk's own output is freed at once (for the reason ``_RngStates``
        gives: no small long-lived blocks between the chunks' activations).
        """
        states = _RngStates(len(chunks))
        first, buffers, start = None, (), 0
        total = sum(_batch_size(chunk, name) for chunk in chunks)
        with torch.no_grad():
            for i, chunk in enumerate(chunks):
                states.record(i)
                out = _as_tuple(call_model(model, chunk), f"the {name} model")
                rows = _batch_size(chunk, name)
                self._check_chunk(out, first, rows, name, i)
                if first is None:
                    first = tuple(torch.empty((0, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in out)
                    buffers = tuple(t.new_empty((total, *t.shape[1:])) for t in out)
                for buf, t in zip(buffers, out):
                    buf[start : start + rows] = t
                start += rows
                del out
        return states, buffers

    @staticmethod
    def _check_chunk(out: tuple[Tensor, ...], first: tuple[Tensor, ...] | None, rows: int, name: str, i: int) -> None:
        for k, t in enumerate(out):
            if t.dim() == 0 or t.shape[0] != rows:
                raise ValueError(
                    f"the {name} model's output {k} for chunk {i} has shape {tuple(t.shape)}; expected {rows} rows "
                    "(one per input row)"
                )
        if first is None:
            return
        if len(out) != len(first):
            raise ValueError(f"{name} chunk {i} returned {len(out)} tensors but chunk 0 returned {len(first)}")
        for k, (t, t0) in enumerate(zip(out, first)):
            if t.shape[1:] != t0.shape[1:] or t.dtype != t0.dtype or t.device != t0.device:
                raise ValueError(
                    f"{name} embeddings disagree between chunks: output {k} of chunk {i} is {tuple(t.shape)} "
                    f"{t.dtype} on {t.device}, chunk 0's is {tuple(t0.shape)} {t0.dtype} on {t0.device}"
                )

    # pass 2 ---------------------------------------------------------------------------------------
    def _replay(
        self,
        model: Callable,
        chunks: Sequence[Any],
        states: _RngStates,
        grads: tuple[Tensor | None, ...],
        sync_last: bool,
    ) -> None:
        """Recompute each chunk with a graph and backpropagate its slice of the cached gradient."""
        start = 0
        for i, chunk in enumerate(chunks):
            rows = _batch_size(chunk, "inputs")
            sync = sync_last and i == len(chunks) - 1
            with _sync_context(model, sync), states.replay(i):
                out = _as_tuple(call_model(model, chunk), "the model")
                pairs = [(o, g[start : start + rows]) for o, g in zip(out, grads) if g is not None and o.requires_grad]
                if pairs:
                    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            start += rows

    def step(self, images: Any, texts: Any) -> Tensor:
        """One contrastive step over ``images`` and ``texts``; returns the loss (detached).

        Args:
            images: (N, ...) tensor, Mapping or list/tuple of tensors, split along dim 0.
            texts: (M, ...) the same (e.g. a tokenizer's {"input_ids", "attention_mask"}).
        """
        image_chunks = split_inputs(images, self.chunk_size)
        text_chunks = split_inputs(texts, self.text_chunk_size)
        image_states, image_emb = self._embed(self.image_model, image_chunks, "image")
        text_states, text_emb = self._embed(self.text_model, text_chunks, "text")

        image_leaves = tuple(e.detach().requires_grad_(e.is_floating_point()) for e in image_emb)
        text_leaves = tuple(e.detach().requires_grad_(e.is_floating_point()) for e in text_emb)
        loss = self.loss_fn(
            image_leaves[0] if len(image_leaves) == 1 else image_leaves,
            text_leaves[0] if len(text_leaves) == 1 else text_leaves,
        )
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(
                f"loss_fn must return a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}"
            )
        loss.backward()
        image_grads = tuple(leaf.grad for leaf in image_leaves)
        text_grads = tuple(leaf.grad for leaf in text_leaves)
        del image_emb, text_emb, image_leaves, text_leaves

        shared = self.image_model is self.text_model
        self._replay(self.image_model, image_chunks, image_states, image_grads, sync_last=not shared)
        self._replay(self.text_model, text_chunks, text_states, text_grads, sync_last=True)
        return loss.detach()
