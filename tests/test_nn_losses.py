"""mmfast.nn.ClipLoss / SigLipLoss against open_clip's own classes in one process (world_size = 1).

The 2-process comparison (gather, local loss, negatives from other ranks) is tests/test_distributed.py.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from mmfast.nn import ClipLoss, SigLipLoss
from tests.nn_utils import load_open_clip_loss
from tests.utils import contrastive_inputs

oc_loss = load_open_clip_loss()
pytestmark = pytest.mark.skipif(oc_loss is None, reason="open_clip not installed")


def _grads(loss_fn, inp, with_bias):
    x = inp["image_features"].detach().clone().requires_grad_()
    y = inp["text_features"].detach().clone().requires_grad_()
    s = inp["logit_scale"].detach().clone().requires_grad_()
    b = inp["logit_bias"].detach().clone().requires_grad_()
    loss = loss_fn(x, y, s.exp(), b) if with_bias else loss_fn(x, y, s.exp())
    loss.backward()
    return loss, x.grad, y.grad, s.grad, b.grad


@pytest.mark.parametrize("N,D", [(32, 64), (7, 3), (97, 80)])
def test_clip_loss_matches_open_clip(N, D):
    inp = contrastive_inputs(N=N, D=D, scale=2.5)
    ref = _grads(oc_loss.ClipLoss(), inp, with_bias=False)
    got = _grads(ClipLoss(), inp, with_bias=False)
    for g, r in zip(got[:4], ref[:4]):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("N,D", [(32, 64), (7, 3), (97, 80)])
def test_siglip_loss_matches_open_clip(N, D):
    inp = contrastive_inputs(N=N, D=D, scale=2.3, bias=-4.0)
    ref = _grads(oc_loss.SigLipLoss(), inp, with_bias=True)
    got = _grads(SigLipLoss(), inp, with_bias=True)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_clip_loss_with_bias_and_output_dict():
    """open_clip's ClipLoss accepts a logit_bias (it cancels in the softmax); it gets a zero gradient."""
    inp = contrastive_inputs(N=9, D=16, scale=2.5)
    ref = _grads(oc_loss.ClipLoss(), inp, with_bias=True)
    got = _grads(lambda x, y, s, b: ClipLoss()(x, y, s, b, output_dict=True)["contrastive_loss"], inp, with_bias=True)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_negatives_identity():
    """SigLipLoss._negatives (fused kernel + diagonal correction) equals open_clip's negative_only loss."""
    inp = contrastive_inputs(N=13, D=24, scale=3.0, bias=-6.0)
    x, y = inp["image_features"], inp["text_features"]
    s, b = inp["logit_scale"].exp(), inp["logit_bias"]
    want = oc_loss.SigLipLoss()._loss(x, y, s, b, negative_only=True)
    torch.testing.assert_close(SigLipLoss()._negatives(x, y, s, b), want, atol=1e-5, rtol=1e-5)


def test_constructor_errors():
    with pytest.raises(ValueError, match="horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="rank"):
        ClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="allgather")
    with pytest.raises(ValueError, match="dist_impl"):
        ClipLoss(dist_impl="bidir")
    with pytest.raises(ValueError, match="gather_with_grad=True"):
        ClipLoss(rank=0, world_size=2, dist_impl="ring")
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="chunk_size"):
            SigLipLoss(chunk_size=bad)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        ClipLoss(rank=0, world_size=2)(torch.randn(4, 8), torch.randn(4, 8), 1.0)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        SigLipLoss(rank=1, world_size=2, dist_impl="ring")(torch.randn(4, 8), torch.randn(4, 8), 1.0, 0.0)


@pytest.mark.parametrize("cls", ["ClipLoss", "SigLipLoss"])
def test_constructor_is_open_clips(cls):
    """open_clip 3.3's parameters (names, order, defaults) lead mmfast's; mmfast's own follow."""
    theirs = list(inspect.signature(getattr(oc_loss, cls).__init__).parameters.values())[1:]
    ours = list(inspect.signature({"ClipLoss": ClipLoss, "SigLipLoss": SigLipLoss}[cls].__init__).parameters.values())
    for a, b in zip(theirs, ours[1:]):
        assert (a.name, a.default, a.kind) == (b.name, b.default, b.kind), (a, b)


def test_siglip_accepts_open_clips_chunk_size_and_dist_impl_names():
    inp = contrastive_inputs(N=9, D=16, scale=2.3, bias=-4.0)
    want = _grads(SigLipLoss(), inp, with_bias=True)
    for impl in ("bidir", "shift", "reduce", "gather", "ring", None):
        for chunk in (None, 1, 4096):
            got = _grads(SigLipLoss(dist_impl=impl, chunk_size=chunk), inp, with_bias=True)
            for g, r in zip(got, want):
                torch.testing.assert_close(g, r)


@pytest.mark.parametrize("cls", ["ClipLoss", "SigLipLoss"])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("N,D", [(16, 32), (7, 5)])
def test_mixed_dtypes(cls, dtypes, autocast, N, D):
    """Image and text features of different dtypes (bf16 towers and an fp32 projection, say): under
    autocast as open_clip does (both cast to the autocast dtype), otherwise at the common dtype.
    The gradients come back in each input's dtype."""
    inp = contrastive_inputs(N=N, D=D, scale=2.5, bias=-3.0)
    inp["image_features"] = inp["image_features"].to(dtypes[0])
    inp["text_features"] = inp["text_features"].to(dtypes[1])
    with_bias = cls == "SigLipLoss"
    ours, theirs = {"ClipLoss": (ClipLoss, oc_loss.ClipLoss), "SigLipLoss": (SigLipLoss, oc_loss.SigLipLoss)}[cls]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = _grads(ours(), inp, with_bias)
    if autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = _grads(theirs(), inp, with_bias)
        tol = dict(atol=5e-2, rtol=5e-2)
    else:  # open_clip's matmul rejects mixed dtypes outside autocast: compare at the common dtype
        up = {k: v.float() for k, v in inp.items()}
        want = _grads(theirs(), up, with_bias)
        tol = dict(atol=1e-5, rtol=1e-5)
    assert got[1].dtype == dtypes[0] and got[2].dtype == dtypes[1]
    for name, g, r in zip(("loss", "image", "text", "scale", "bias"), got, want):
        if r is not None:
            t = dict(atol=5e-2, rtol=5e-2) if g.dtype == torch.bfloat16 else tol  # a bf16 gradient's rounding
            scale = max(1.0, float(r.detach().abs().max()))
            torch.testing.assert_close(g.float(), r.float(), atol=t["atol"] * scale, rtol=t["rtol"], msg=name)
