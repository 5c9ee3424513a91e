"""mmfast in an open_clip model: a tiny random CLIP built from configs (no downloads).

Importing open_clip pulls in timm and torchvision (slow on a loaded machine), so everything runs
in one module-scoped model build.
"""

from __future__ import annotations

import copy

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from mmfast.integrations.open_clip import apply_mmfast_to_open_clip, loss_from_open_clip  # noqa: E402
from mmfast.nn import ClipLoss, CrossAttention, SigLipLoss  # noqa: E402
from tests.nn_utils import assert_grads_close, train_together  # noqa: E402


@pytest.fixture(scope="module")
def tiny_clip():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg  # noqa: PLC0415

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=32, head_width=8, patch_size=4, image_size=16)
    text = CLIPTextCfg(context_length=12, vocab_size=99, width=32, heads=4, layers=2)
    return CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).train()


def _batch():
    return torch.randn(4, 3, 16, 16), torch.randint(1, 99, (4, 12))


def test_swapped_open_clip_matches(tiny_clip):
    ref = copy.deepcopy(tiny_clip)
    model = copy.deepcopy(tiny_clip)
    report = apply_mmfast_to_open_clip(model)
    assert len(report.swapped) == 4 and not report.left
    assert all(isinstance(m, CrossAttention) for n, m in model.named_modules() if n.endswith(".attn"))
    images, texts = _batch()
    loss_ref = open_clip.ClipLoss()
    loss_new = loss_from_open_clip(loss_ref)
    assert isinstance(loss_new, ClipLoss)

    def run(m, loss_fn):
        img, txt, scale = m(images, texts)
        return img, txt, loss_fn(img, txt, scale)

    a, b = run(ref, loss_ref), run(model, loss_new)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, atol=3e-5, rtol=3e-5)
    a[2].backward()
    b[2].backward()
    assert_grads_close(ref, model, atol=3e-5, rtol=3e-4)


@pytest.mark.slow
def test_swapped_open_clip_trains_like_unpatched(tiny_clip):
    ref = copy.deepcopy(tiny_clip)
    model = copy.deepcopy(tiny_clip)
    apply_mmfast_to_open_clip(model)
    images, texts = _batch()
    oc, ours = open_clip.ClipLoss(), ClipLoss()
    by_model = {id(ref): oc, id(model): ours}
    train_together(ref, model, lambda m: by_model[id(m)](*m(images, texts)))


def test_loss_from_open_clip_settings():
    sig = loss_from_open_clip(open_clip.loss.SigLipLoss(rank=1, world_size=4, dist_impl="gather"))
    assert isinstance(sig, SigLipLoss) and (sig.rank, sig.world_size, sig.dist_impl) == (1, 4, "gather")
    clip = loss_from_open_clip(open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=1, world_size=2))
    assert (clip.local_loss, clip.gather_with_grad, clip.rank, clip.world_size) == (True, True, 1, 2)
    with pytest.raises(TypeError, match="ClipLoss or SigLipLoss"):
        loss_from_open_clip(torch.nn.MSELoss())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_scripted_model_is_refused_not_silently_kept(tiny_clip):
    """open_clip's jit=True returns torch.jit.script(model); swapping inside it cannot work."""
    scripted = torch.jit.script(copy.deepcopy(tiny_clip))
    with pytest.raises(TypeError, match="jit=True"):
        apply_mmfast_to_open_clip(scripted)
