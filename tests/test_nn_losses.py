"""mmfast.nn.ClipLoss / SigLipLoss against open_clip's own classes in one process (world_size = 1).

The 2-process comparison (gather, local loss, negatives from other ranks) is tests/test_distributed.py.
"""

from __future__ import annotations

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
        SigLipLoss(dist_impl="ring")
    with pytest.raises(RuntimeError, match="torch.distributed"):
        ClipLoss(rank=0, world_size=2)(torch.randn(4, 8), torch.randn(4, 8), 1.0)
