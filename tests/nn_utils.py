"""Helpers for the nn / integration tests: compare two models' outputs, gradients and training."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def grads_of(model: nn.Module) -> dict[str, Tensor]:
    """name -> gradient of every parameter that has one (an unused parameter fails the comparison)."""
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_grads_close(ref: nn.Module, new: nn.Module, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Every parameter's gradient in ``new`` equals the one of the same name in ``ref``."""
    g_ref, g_new = grads_of(ref), grads_of(new)
    assert g_ref.keys() == g_new.keys()
    for name, g in g_ref.items():
        if g is None:
            assert g_new[name] is None or not g_new[name].abs().any(), name
            continue
        assert g_new[name] is not None, f"{name} got no gradient"
        torch.testing.assert_close(g_new[name], g, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def train_together(
    ref: nn.Module,
    new: nn.Module,
    loss_fn: Callable[[nn.Module], Tensor],
    steps: int = 3,
    lr: float = 0.1,
    atol: float = 1e-4,
) -> None:
    """A few SGD-with-momentum steps on both models with the same data; losses and weights must keep
    tracking. (Not Adam: it blows the rounding noise of gradients that are exactly zero in exact
    arithmetic, such as the key-projection bias of softmax attention, up to full-size steps.)"""
    opt_ref = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
    opt_new = torch.optim.SGD(new.parameters(), lr=lr, momentum=0.9)
    for step in range(steps):
        losses = []
        for model, opt in ((ref, opt_ref), (new, opt_new)):
            opt.zero_grad()
            loss = loss_fn(model)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], atol=atol, rtol=atol, msg=f"loss differs at step {step}")
    new_params = dict(new.named_parameters())
    assert new_params.keys() == dict(ref.named_parameters()).keys()
    for name, p_ref in ref.named_parameters():
        torch.testing.assert_close(new_params[name], p_ref, atol=atol, rtol=atol, msg=lambda m, n=name: f"{n}: {m}")


def load_open_clip_loss():
    """open_clip's ``loss.py`` loaded on its own (it imports only torch): importing the open_clip
    package pulls in timm and torchvision, tens of seconds on a loaded machine. None if absent."""
    import importlib.util  # noqa: PLC0415
    import os  # noqa: PLC0415

    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "loss.py")
    loss_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    return module
