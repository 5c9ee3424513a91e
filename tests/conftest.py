"""Test setup: Triton runs through its interpreter on CPU tensors when no GPU is visible.

TRITON_INTERPRET must be set before any module that defines @triton.jit kernels is imported,
so it is set here, at collection time, before the tests import mmfast's Triton modules.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a visible CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh but reproducible random inputs per test (seeded from the test's name)."""
    # crc32, not hash(): str hashes are salted per process, which made the inputs differ between runs.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
