"""Test setup: without a GPU, the Triton kernels run through the Triton interpreter, which must be
switched on before any Triton kernel is imported, triton's own included: its standard-library
functions (tl.max, tl.sum, ...) are decorated once, when triton is first imported, so triton is
imported here, before any test can change TRITON_INTERPRET."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton  # noqa: F401  (fixes tl.* as interpreted, whatever a test sets later)
    except ImportError:
        pass

import alignkern  # noqa: E402  (after TRITON_INTERPRET)
from alignkern import _backend  # noqa: E402

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")


def available_backends(device: torch.device = DEVICE) -> list[str]:
    """Every backend that can run on ``device`` on this machine."""
    return [name for name in alignkern.BACKENDS if _backend.unavailable_reason(name, device) is None]


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is several times faster than two (no synchronisation). Use
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
