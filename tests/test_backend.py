"""Backend selection: defaults by device, use_backend, ALIGNKERN_BACKEND, and clear refusals."""

import pytest
import torch
from conftest import HAS_GPU

import alignkern
from alignkern import _backend


@pytest.mark.skipif(HAS_GPU, reason="the Triton interpreter is for machines without a GPU")
def test_switching_the_interpreter_off_in_a_test_does_not_break_later_triton_runs(monkeypatch):
    """triton decorates its tl.* functions (tl.max, tl.sum...) once, when it is first imported; that
    must happen under the interpreter (conftest), not while a test has set TRITON_INTERPRET=0."""
    with monkeypatch.context() as m:
        m.setenv("TRITON_INTERPRET", "0")
        _backend.unavailable_reason("triton", torch.device("cpu"))  # imports triton, if not yet
    reason = _backend.unavailable_reason("triton", torch.device("cpu"))
    if reason is not None:  # no triton, or TRITON_INTERPRET=0 given to pytest
        pytest.skip(reason)
    logits, targets = torch.randn(3, 10), torch.tensor([1, 2, 3])
    expected = torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None])[:, 0]
    with alignkern.use_backend("triton"):
        out = alignkern.token_logprobs(logits, targets)
    torch.testing.assert_close(out.double(), expected)


def test_default_backend_for_cpu_tensors_is_the_cpp_kernel():
    assert _backend.resolve_backend(torch.device("cpu")) == "cpu"


@pytest.mark.gpu
def test_default_backend_for_cuda_tensors_is_triton():
    assert _backend.resolve_backend(torch.device("cuda")) == "triton"


def test_use_backend_overrides_and_restores():
    with alignkern.use_backend("reference"):
        assert _backend.resolve_backend(torch.device("cpu")) == "reference"
        with alignkern.use_backend("cpu"):
            assert _backend.resolve_backend(torch.device("cpu")) == "cpu"
        assert _backend.resolve_backend(torch.device("cpu")) == "reference"
    assert _backend.resolve_backend(torch.device("cpu")) == "cpu"


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("ALIGNKERN_BACKEND", "reference")
    assert _backend.resolve_backend(torch.device("cpu")) == "reference"
    with alignkern.use_backend("cpu"):  # the context manager wins over the environment
        assert _backend.resolve_backend(torch.device("cpu")) == "cpu"


def test_unknown_backend_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="use_backend: name must be one of.*got 'tpu'"):
        with alignkern.use_backend("tpu"):
            pass
    monkeypatch.setenv("ALIGNKERN_BACKEND", "tpu")  # the same error type for the same mistake
    with pytest.raises(ValueError, match="ALIGNKERN_BACKEND: unknown backend 'tpu'; "
                                         "expected one of triton, cuda, cpu, reference"):
        alignkern.token_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


@pytest.mark.skipif(HAS_GPU, reason="checks the refusal on a machine without a GPU")
def test_cuda_backend_refusal_says_why():
    reason = _backend.unavailable_reason("cuda", torch.device("cpu"))
    assert "CUDA" in reason
    with alignkern.use_backend("cuda"), pytest.raises(RuntimeError, match="'cuda' is not available"):
        alignkern.token_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = _backend.unavailable_reason("triton", torch.device("cpu"))
    assert "TRITON_INTERPRET=1" in reason


def test_missing_extension_leaves_triton_and_reference_working(monkeypatch):
    """A failed _C import must not break the other backends."""
    monkeypatch.setattr(_backend, "_ext_cache", {"module": None, "error": "simulated failure"})
    assert "simulated failure" in _backend.unavailable_reason("cpu", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="simulated failure"):
        with alignkern.use_backend("cpu"):
            alignkern.token_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
    logits, targets = torch.randn(3, 10), torch.tensor([1, 2, 3])
    expected = torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None])[:, 0]
    for name in ("reference", "triton"):
        if _backend.unavailable_reason(name, torch.device("cpu")) is None:
            with alignkern.use_backend(name):
                out = alignkern.token_logprobs(logits, targets)
            torch.testing.assert_close(out.double(), expected)
    monkeypatch.setattr(_backend, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="using the reference backend"):
        assert _backend.default_backend(torch.device("cpu")) == "reference"


def test_backend_status_lists_every_backend():
    status = alignkern.backend_status()
    assert set(status) == set(alignkern.BACKENDS)
    assert status["reference"] is None
