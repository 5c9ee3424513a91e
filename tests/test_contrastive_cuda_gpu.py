"""The CUDA contrastive kernels on a real GPU (``gpu`` marker: skipped where none is visible), through
the registered ops torch.ops.mmfast.contrastive_forward / contrastive_backward, against the float64
reference at realistic sizes; and bitwise determinism. The same kernels run on the CPU under
emulation in test_contrastive_emulated.py.
"""

from __future__ import annotations

import pytest
import torch

from mmfast import reference
from tests.utils import BWD_TOL, FWD_TOL, contrastive_inputs

pytestmark = pytest.mark.gpu

DIRECTION = {"both": 0, "image": 1, "text": 2}
REDUCTION = {"mean": 0, "sum": 1, "none": 2}


def _ops():
    import mmfast._C  # noqa: F401  registers torch.ops.mmfast.*

    if not mmfast._C.with_cuda:
        pytest.fail("a GPU is visible but mmfast._C was built without the CUDA kernels")
    return torch.ops.mmfast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "loss,N,M,D,direction,reduction",
    [
        (0, 1000, 1000, 512, "both", "mean"),
        (0, 777, 1031, 100, "image", "none"),
        (0, 1031, 777, 64, "text", "sum"),
        (1, 1000, 1000, 768, "both", "mean"),
        (1, 333, 333, 3, "both", "none"),
    ],
)
def test_against_reference(loss, N, M, D, direction, reduction, dtype):
    ops = _ops()
    inp = contrastive_inputs(N=N, M=M, D=D, dtype=dtype, device="cuda")
    x, y, s, b = inp["image_features"], inp["text_features"], inp["logit_scale"], inp["logit_bias"]
    args = (loss, DIRECTION[direction], REDUCTION[reduction])
    out, row_stat, col_stat = ops.contrastive_forward(x, y, s, b, None, *args)
    leaves = [t.detach().double().requires_grad_() for t in (x, y, s, b)]
    if loss == 0:
        want = reference.info_nce(*leaves[:3], direction=direction, reduction=reduction)
    else:
        want = reference.siglip_loss(*leaves, reduction=reduction)
    torch.testing.assert_close(out.double(), want.detach(), **FWD_TOL[dtype])
    grad = torch.randn(want.shape, device="cuda")
    want.backward(grad.double())
    dx, dy, ds, db = ops.contrastive_backward(grad, x, y, s, b, None, row_stat, col_stat, *args)
    tol = BWD_TOL[dtype]
    torch.testing.assert_close(dx.double(), leaves[0].grad, **tol)
    torch.testing.assert_close(dy.double(), leaves[1].grad, **tol)
    scale_tol = dict(atol=tol["atol"] * max(1.0, abs(float(leaves[2].grad))), rtol=tol["rtol"])
    torch.testing.assert_close(ds.double(), leaves[2].grad, **scale_tol)
    if loss == 1:
        torch.testing.assert_close(
            db.double(), leaves[3].grad, atol=tol["atol"] * max(1.0, abs(float(leaves[3].grad))), rtol=tol["rtol"]
        )


def test_deterministic():
    ops = _ops()
    inp = contrastive_inputs(N=4096, D=768, dtype=torch.bfloat16, device="cuda")
    args = (inp["image_features"], inp["text_features"], inp["logit_scale"], inp["logit_bias"], None)
    first = ops.contrastive_forward(*args, 0, 0, 0)
    again = ops.contrastive_forward(*args, 0, 0, 0)
    for u, v in zip(first, again):
        assert torch.equal(u, v)
    g = torch.tensor(1.0, device="cuda")
    b1 = ops.contrastive_backward(g, *args, first[1], first[2], 0, 0, 0)
    b2 = ops.contrastive_backward(g, *args, first[1], first[2], 0, 0, 0)
    for u, v in zip(b1, b2):
        assert torch.equal(u, v)
