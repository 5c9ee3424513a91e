"""GradCache on one process: its gradients equal the full batch's, forward and every parameter.

Towers with dropout take a tensor (images), a dict (a tokenizer's output) or a tuple; the loss has
its own learnable parameters (logit scale and bias). The reference is the plain full-batch
``loss_fn(image_model(images), text_model(texts)).backward()`` with the same dropout masks, which
holds exactly when the reference draws its random numbers chunk by chunk in GradCache's order
(images then texts); without dropout, the reference is the plain unchunked call.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmfast
from mmfast.train import GradCache, split_inputs


class ImageTower(nn.Module):
    def __init__(self, d_in: int = 12, d: int = 8, p: float = 0.3) -> None:
        super().__init__()
        self.l1, self.drop, self.l2 = nn.Linear(d_in, 16), nn.Dropout(p), nn.Linear(16, d)

    def forward(self, x):
        return F.normalize(self.l2(self.drop(torch.tanh(self.l1(x)))), dim=-1)


class TextTower(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 8, p: float = 0.2) -> None:
        super().__init__()
        self.emb, self.drop, self.proj = nn.Embedding(vocab, 16), nn.Dropout(p), nn.Linear(16, d)

    def forward(self, input_ids, attention_mask):
        h = self.drop(self.emb(input_ids)) * attention_mask[..., None].to(self.proj.weight.dtype)
        return F.normalize(self.proj(h.sum(1) / attention_mask.sum(1, keepdim=True).clamp(min=1)), dim=-1)


class Head(nn.Module):
    """A loss with learnable parameters: SigLIP + CLIP so that both scale and bias get gradients."""

    def __init__(self, dtype) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(2.3, dtype=dtype))
        self.logit_bias = nn.Parameter(torch.tensor(-1.5, dtype=dtype))

    def forward(self, x, y):
        s = self.logit_scale.exp()
        clip = mmfast.info_nce(x, y, s, backend="reference")
        return clip + 0.5 * mmfast.siglip_loss(x, y, s, self.logit_bias, backend="reference")


def make_inputs(n: int, dtype, seq: int = 5):
    images = torch.randn(n, 12, dtype=dtype)
    texts = {"input_ids": torch.randint(0, 20, (n, seq)), "attention_mask": (torch.rand(n, seq) > 0.3).long()}
    texts["attention_mask"][:, 0] = 1
    return images, texts


def models(dtype, p_img=0.3, p_txt=0.2):
    return ImageTower(p=p_img).to(dtype), TextTower(p=p_txt).to(dtype), Head(dtype)


def reference_grads(img, txt, head, images, texts, chunk, seed):
    """Plain autograd over the whole batch, dropout drawn chunk by chunk in GradCache's order."""
    torch.manual_seed(seed)
    x = torch.cat([img(c) for c in split_inputs(images, chunk)])
    y = torch.cat([txt(**c) for c in split_inputs(texts, chunk)])
    loss = head(x, y)
    loss.backward()
    return loss.detach()


def params(*mods):
    return [(f"{i}.{n}", p) for i, m in enumerate(mods) for n, p in m.named_parameters()]


def assert_grads_close(got_mods, want_mods, rtol, atol=0.0):
    for (name, p), (_, q) in zip(params(*got_mods), params(*want_mods)):
        assert p.grad is not None, name
        scale = q.grad.abs().max().clamp(min=1e-30)
        err = float((p.grad - q.grad).abs().max() / scale)
        assert err <= rtol or float((p.grad - q.grad).abs().max()) <= atol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize(
    "dtype, rtol, n, chunk",
    [
        (torch.float64, 1e-10, 23, 5),  # uneven chunks: 5, 5, 5, 5, 3
        (torch.float64, 1e-10, 16, 16),  # one chunk
        (torch.float64, 1e-10, 7, 1),  # one row per chunk
        (torch.float32, 2e-5, 97, 32),
    ],
)
def test_gradients_equal_full_batch_with_dropout_and_dict_inputs(dtype, rtol, n, chunk):
    img, txt, head = models(dtype)
    img2, txt2, head2 = copy.deepcopy((img, txt, head))
    images, texts = make_inputs(n, dtype)
    want = reference_grads(img2, txt2, head2, images, texts, chunk, seed=11)
    torch.manual_seed(11)
    got = GradCache(img, txt, head, chunk).step(images, texts)
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    assert_grads_close((img, txt, head), (img2, txt2, head2), rtol)
    # the generator ends where the plain chunked forward left it
    after_gc = torch.rand(4)
    reference_grads(copy.deepcopy(img2), copy.deepcopy(txt2), copy.deepcopy(head2), images, texts, chunk, seed=11)
    assert torch.equal(after_gc, torch.rand(4))


def test_without_dropout_equals_the_unchunked_batch_and_accumulates():
    img, txt, head = models(torch.float64, 0.0, 0.0)
    img2, txt2, head2 = copy.deepcopy((img, txt, head))
    images, texts = make_inputs(30, torch.float64)
    gc = GradCache(img, txt, head, 7, text_chunk_size=4)
    for _ in range(2):  # .grad accumulates over steps exactly like two backward() calls
        gc.step(images, texts)
        head2(img2(images), txt2(**texts)).backward()
    assert_grads_close((img, txt, head), (img2, txt2, head2), 1e-10)


def test_dropout_masks_replayed():
    """Without the RNG replay the recomputed activations would differ from pass 1's and the
    gradients would be wrong; with p=0.5 the difference is large, so this test can fail."""
    img, txt, head = models(torch.float64, 0.5, 0.5)
    img2, txt2, head2 = copy.deepcopy((img, txt, head))
    images, texts = make_inputs(20, torch.float64)
    want = reference_grads(img2, txt2, head2, images, texts, 6, seed=3)
    torch.manual_seed(3)
    got = GradCache(img, txt, head, 6).step(images, texts)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert_grads_close((img, txt, head), (img2, txt2, head2), 1e-10)


class TupleTower(nn.Module):
    """Takes (x, scale) positionally and returns (pooled, per-token) embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8).double()

    def forward(self, x, w):
        h = self.lin(x) * w[:, None, None]
        return F.normalize(h.mean(1), dim=-1), h


def test_tuple_inputs_and_tuple_outputs():
    tower, tower2 = TupleTower(), None
    tower2 = copy.deepcopy(tower)
    x, w = torch.randn(10, 3, 6, dtype=torch.float64), torch.rand(10, dtype=torch.float64)

    def loss_fn(a, b):
        (pooled_a, tokens_a), (pooled_b, tokens_b) = a, b
        return mmfast.info_nce(pooled_a, pooled_b, 5.0, backend="reference") + (tokens_a * tokens_b).sum() * 1e-2

    GradCache(tower, tower, loss_fn, 3).step((x, w), [x.flip(0), w])
    loss_fn(tower2(x, w), tower2(x.flip(0), w)).backward()
    assert_grads_close((tower,), (tower2,), 1e-10)


def test_autocast_bf16_close_to_plain_autocast():
    img, txt, head = models(torch.float32, 0.0, 0.0)
    img2, txt2, head2 = copy.deepcopy((img, txt, head))
    images, texts = make_inputs(64, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = GradCache(img, txt, head, 16).step(images, texts)
        want = head2(img2(images), txt2(**texts))
    want.backward()
    torch.testing.assert_close(got.float(), want.detach().float(), rtol=2e-2, atol=2e-2)
    assert_grads_close((img, txt, head), (img2, txt2, head2), 5e-2, atol=1e-3)


def test_shape_mismatch_between_chunks_is_a_clear_error():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0
            self.lin = nn.Linear(12, 8)

        def forward(self, x):
            self.calls += 1
            out = self.lin(x)
            return out if self.calls == 1 else out[:, :4]

    _, txt, head = models(torch.float32)
    images, texts = make_inputs(10, torch.float32)
    with pytest.raises(ValueError, match="embeddings disagree between chunks"):
        GradCache(Bad(), txt, head, 4).step(images, texts)


@pytest.mark.parametrize(
    "images, message",
    [
        ({"a": torch.zeros(4, 2), "b": torch.zeros(5, 2)}, "disagree on the batch size"),
        (torch.zeros(0, 12), "empty batch"),
        ("pixels", "must be a Tensor, a Mapping"),
        ({"flag": True}, "holds no tensor"),
    ],
)
def test_bad_inputs(images, message):
    img, txt, head = models(torch.float32)
    _, texts = make_inputs(4, torch.float32)
    with pytest.raises((ValueError, TypeError), match=message):
        GradCache(img, txt, head, 2).step(images, texts)


def test_bad_arguments_and_outputs():
    img, txt, head = models(torch.float32)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            GradCache(img, txt, head, bad)
    images, texts = make_inputs(4, torch.float32)
    with pytest.raises(ValueError, match="rows"):  # a tower that does not keep one row per input
        GradCache(lambda x: img(x).sum(0, keepdim=True), txt, head, 2).step(images, texts)
    with pytest.raises(ValueError, match="scalar"):
        GradCache(img, txt, lambda a, b: (a * b).sum(1), 2).step(images, texts)
    with pytest.raises(TypeError, match="Tensor or a tuple"):
        GradCache(lambda x: {"x": img(x)}, txt, head, 2).step(images, texts)


def test_split_inputs_keeps_non_tensor_entries():
    chunks = split_inputs({"ids": torch.arange(5), "flag": "keep"}, 2)
    assert [c["ids"].tolist() for c in chunks] == [[0, 1], [2, 3], [4]]
    assert all(c["flag"] == "keep" for c in chunks)


@pytest.mark.gpu
def test_cuda_dropout_replayed():
    """On a GPU the CUDA generator's state is recorded and replayed per chunk as well."""
    img, txt, head = (m.cuda() for m in models(torch.float64, 0.5, 0.5))
    img2, txt2, head2 = copy.deepcopy((img, txt, head))
    images, texts = make_inputs(20, torch.float64)
    images, texts = images.cuda(), {k: v.cuda() for k, v in texts.items()}
    want = reference_grads(img2, txt2, head2, images, texts, 6, seed=3)
    torch.manual_seed(3)
    got = GradCache(img, txt, head, 6).step(images, texts)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert_grads_close((img, txt, head), (img2, txt2, head2), 1e-10)
