"""token_logprobs on every backend against float64 torch.log_softmax (tests/oracles.py)."""

from __future__ import annotations

import math

import oracles
import pytest
import torch
from conftest import DEVICE, HAS_GPU, available_backends
from hypothesis import given, settings
from hypothesis import strategies as st

import alignkern
from alignkern.bench import measure

BACKENDS = available_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100


def make_inputs(lead, vocab, k, dtype, *, device=DEVICE, ignore_share=0.2, scale=3.0):
    """Random logits (never zeros) and targets with some ignore_index entries; k=None gives
    targets of shape lead, else lead + (k,)."""
    logits = (torch.randn(*lead, vocab, dtype=torch.float64) * scale).to(dtype).to(device)
    shape = tuple(lead) if k is None else (*lead, k)
    targets = torch.randint(0, vocab, shape)
    targets[torch.rand(shape) < ignore_share] = IGNORE
    return logits, targets.to(device)


def reference_fp64(logits, targets, **kw):
    return oracles.token_logprobs(logits, targets, **kw)


def run(backend, logits, targets, **kw):
    with alignkern.use_backend(backend):
        return alignkern.token_logprobs(logits, targets, **kw)


def forward_tolerance(dtype):
    # Every backend computes in float32 (float64 for float64) after loading, so the error does not
    # depend on the input dtype: it is float32 rounding of a sum over V terms.
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


def grad_tolerance(dtype):
    return {
        torch.float64: dict(rtol=1e-9, atol=1e-12),
        torch.float32: dict(rtol=1e-4, atol=1e-6),
        torch.float16: dict(rtol=2e-3, atol=1e-5),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    }[dtype]


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 50257])
@pytest.mark.parametrize("k", [None, 1, 3])
def test_forward_matches_reference(backend, dtype, vocab, k):
    logits, targets = make_inputs((37,), vocab, k, dtype)
    out, lse = run(backend, logits, targets, return_lse=True)
    ref_out, ref_lse = reference_fp64(logits, targets)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == targets.shape and lse.shape == logits.shape[:-1]
    torch.testing.assert_close(out.double(), ref_out, **forward_tolerance(dtype))
    torch.testing.assert_close(lse.double(), ref_lse, **forward_tolerance(dtype))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_qwen_vocabulary(backend, dtype):
    logits, targets = make_inputs((5,), 151936, 3, dtype)
    out, lse = run(backend, logits, targets, return_lse=True)
    ref_out, ref_lse = reference_fp64(logits, targets)
    torch.testing.assert_close(out.double(), ref_out, **forward_tolerance(dtype))
    torch.testing.assert_close(lse.double(), ref_lse, **forward_tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_float64(backend):
    if backend == "cuda":
        pytest.skip("the cuda backend takes no float64 (tested in test_errors)")
    logits, targets = make_inputs((4, 3), 513, 2, torch.float64)
    out, lse = run(backend, logits, targets, temperature=0.5, return_lse=True)
    ref_out, ref_lse = reference_fp64(logits, targets, temperature=0.5)
    assert out.dtype == torch.float64
    tol = dict(rtol=1e-6, atol=1e-6) if backend == "triton" else forward_tolerance(torch.float64)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (1,), (2, 0), (1, 1)])
def test_empty_and_single_rows(backend, lead):
    logits, targets = make_inputs(lead, 11, 2, torch.float32)
    out, lse = run(backend, logits, targets, return_lse=True)
    ref_out, ref_lse = reference_fp64(logits, targets)
    assert out.shape == targets.shape and lse.shape == lead
    torch.testing.assert_close(out.double(), ref_out, **forward_tolerance(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_targets_per_row(backend):
    """targets (..., 0): empty output, and a backward that is exactly zero."""
    logits = torch.randn(4, 9, device=DEVICE, requires_grad=True)
    out = run(backend, logits, torch.zeros(4, 0, dtype=torch.long, device=DEVICE))
    assert out.shape == (4, 0)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_vector(backend):
    """logits (V,) with a 0-d target and with (K,) targets."""
    logits = torch.randn(50, device=DEVICE)
    for targets in (torch.tensor(7, device=DEVICE), torch.tensor([1, 7, IGNORE], device=DEVICE)):
        out = run(backend, logits, targets)
        torch.testing.assert_close(out.double(), reference_fp64(logits, targets)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_views(backend, dtype):
    big, _ = make_inputs((3, 9), 130, None, dtype)
    views = [
        big[:, 1:, :101],  # shifted positions and a vocabulary slice: rows at irregular offsets
        big.transpose(0, 1),  # permuted leading dimensions
        big[:, :, ::2],  # last dimension strided: copied once
    ]
    for logits in views:
        targets = torch.randint(0, logits.shape[-1], (*logits.shape[:-1], 4), device=DEVICE)
        targets = targets.transpose(-1, -2).contiguous().transpose(-1, -2)  # non-contiguous ids
        out = run(backend, logits, targets)
        torch.testing.assert_close(
            out.double(), reference_fp64(logits, targets)[0], **forward_tolerance(dtype)
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("ignore_index", [-100, 0, 5])
def test_temperature_and_ignore_index(backend, temperature, ignore_index):
    logits, targets = make_inputs((9,), 40, 3, torch.float32, ignore_share=0.0)
    targets[0] = ignore_index  # a valid id used as ignore_index still means "ignore"
    out = run(backend, logits, targets, temperature=temperature, ignore_index=ignore_index)
    ref = reference_fp64(logits, targets, temperature=temperature, ignore_index=ignore_index)[0]
    torch.testing.assert_close(out.double(), ref, **forward_tolerance(torch.float32))
    assert (out[0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_targets(backend):
    logits, targets = make_inputs((6,), 33, 2, torch.float32)
    out = run(backend, logits, targets.int())
    torch.testing.assert_close(out.double(), reference_fp64(logits, targets)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_like_reference(backend):
    logits = torch.randn(5, 300, device=DEVICE)
    logits[0, 17] = float("nan")
    logits[1, 3] = float("inf")
    logits[2, :] = float("-inf")
    logits[3, 100] = float("-inf")
    targets = torch.tensor([[17, 2], [3, 4], [0, 1], [100, 5], [6, 7]], device=DEVICE)
    out, lse = run(backend, logits, targets, return_lse=True)
    ref_out, ref_lse = reference_fp64(logits, targets)
    # A row holding +inf: torch.log_softmax gives NaN everywhere (inf - inf); alignkern follows
    # torch.logsumexp (lse = +inf), so a finite target gets the limit, log p = -inf, and the +inf
    # target itself NaN.
    ref_out[1] = torch.tensor([math.nan, -math.inf])
    torch.testing.assert_close(out.double(), ref_out, equal_nan=True)
    torch.testing.assert_close(lse.double(), ref_lse, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_ids_give_nan_when_validation_is_off(backend, monkeypatch):
    monkeypatch.setenv("ALIGNKERN_VALIDATE", "0")
    logits, _ = make_inputs((4,), 20, None, torch.float32)
    targets = torch.tensor([[3, 20], [-1, 2], [5, 10**12], [IGNORE, 19]], device=DEVICE)
    out = run(backend, logits, targets)
    expected_nan = torch.tensor([[0, 1], [1, 0], [0, 1], [0, 0]], dtype=torch.bool)
    assert torch.equal(out.isnan().cpu(), expected_nan)
    ref = reference_fp64(logits, targets)[0]
    torch.testing.assert_close(out.double(), ref, equal_nan=True)


# ----------------------------------------------------------------------------- backward


def reference_grads(logits, targets, grad_out, grad_lse=None, **kw):
    x = logits.detach().double().requires_grad_(True)
    out, lse = oracles.token_logprobs(x, targets, **kw)
    loss = (out * grad_out.double()).sum()
    if grad_lse is not None:
        loss = loss + (lse * grad_lse.double()).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("vocab", [7, 1000])
def test_backward_random_upstream_gradient(backend, dtype, k, vocab):
    logits, targets = make_inputs((2, 19), vocab, k, dtype)
    if k is not None:
        targets[0, 0, 1] = targets[0, 0, 0] = 3  # a repeated id in one row: gradients add
    x = logits.clone().requires_grad_(True)
    out = run(backend, x, targets, temperature=0.8)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    assert grad.dtype == dtype and grad.shape == logits.shape
    expected = reference_grads(logits, targets, grad_out, temperature=0.8)
    torch.testing.assert_close(grad.double(), expected, **grad_tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_stride_zero_upstream_gradient(backend):
    """out.sum().backward() hands the backward an expanded (stride-0) gradient."""
    logits, targets = make_inputs((3, 5), 64, 2, torch.float32)
    x = logits.clone().requires_grad_(True)
    run(backend, x, targets).sum().backward()
    expected = reference_grads(logits, targets, torch.ones(targets.shape, device=DEVICE))
    torch.testing.assert_close(x.grad.double(), expected, **grad_tolerance(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_through_lse(backend, dtype):
    logits, targets = make_inputs((11,), 300, 2, dtype)
    x = logits.clone().requires_grad_(True)
    out, lse = run(backend, x, targets, return_lse=True, temperature=1.7)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    (grad,) = torch.autograd.grad((out, lse), x, (grad_out, grad_lse))
    expected = reference_grads(logits, targets, grad_out, grad_lse, temperature=1.7)
    torch.testing.assert_close(grad.double(), expected, **grad_tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_non_contiguous(backend):
    big, _ = make_inputs((2, 7), 90, None, torch.bfloat16)
    logits = big[:, 1:, :77]
    targets = torch.randint(0, 77, (2, 6, 2), device=DEVICE)
    x = logits.detach().requires_grad_(True)
    out = run(backend, x, targets)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    expected = reference_grads(logits, targets, grad_out)
    torch.testing.assert_close(grad.double(), expected, **grad_tolerance(torch.bfloat16))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])
def test_gradcheck_float64(backend):
    logits, targets = make_inputs((3,), 9, 2, torch.float64, scale=1.0)
    x = logits.clone().requires_grad_(True)
    temperature = 1.0 if backend == "triton" else 0.7  # triton scales by 1/T in float32
    with alignkern.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda t: alignkern.token_logprobs(
                t, targets, temperature=temperature, return_lse=True
            ),
            (x,),
        )


# ----------------------------------------------------------------------------- torch integration


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    logits, targets = make_inputs((4, 3), 50, 2, torch.float32)
    x = logits.clone().requires_grad_(True)
    torch.library.opcheck(
        torch.ops.alignkern.token_logprobs.default, (x, targets, 1.3, IGNORE, backend)
    )
    out, row_max, log_sum = torch.ops.alignkern.token_logprobs(logits, targets, 1.3, IGNORE,
                                                               backend)
    torch.library.opcheck(
        torch.ops.alignkern.token_logprobs_backward.default,
        (torch.randn_like(out), torch.randn_like(log_sum), logits, targets, row_max, log_sum, 1.3,
         IGNORE, backend),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_with_backward(backend):
    torch._dynamo.reset()
    logits, targets = make_inputs((6,), 100, 2, torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(x, t):
        return -(alignkern.token_logprobs(x, t, temperature=0.9) * 2.0).sum()

    x = logits.clone().requires_grad_(True)
    with alignkern.use_backend(backend):
        loss = loss_fn(x, targets)
        loss.backward()
    expected = reference_grads(logits, targets, torch.full(targets.shape, -2.0), temperature=0.9)
    ref_loss = -(reference_fp64(logits, targets, temperature=0.9)[0] * 2.0).sum()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), expected, **grad_tolerance(torch.float32))


def test_torch_compile_inductor():
    """The default inductor backend compiles around the op too (graph stays whole)."""
    torch._dynamo.reset()
    logits, targets = make_inputs((5,), 64, None, torch.float32)

    @torch.compile(fullgraph=True)
    def score(x, t):
        return alignkern.token_logprobs(x * 2.0, t).exp()

    torch.testing.assert_close(
        score(logits, targets).double(), reference_fp64(logits * 2.0, targets)[0].exp()
    )


# ----------------------------------------------------------------------------- errors


def test_error_float_targets():
    with pytest.raises(TypeError, match="targets must be int32 or int64.*float32"):
        alignkern.token_logprobs(torch.randn(2, 5), torch.zeros(2))


def test_error_integer_logits():
    with pytest.raises(TypeError, match="logits must be float32.*int64"):
        alignkern.token_logprobs(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2).long())


def test_error_shape_mismatch():
    with pytest.raises(ValueError, match=r"targets must have shape \(2,\) or \(2, 'K'\).*\(3,\)"):
        alignkern.token_logprobs(torch.randn(2, 5), torch.zeros(3).long())
    with pytest.raises(ValueError, match="targets must have shape"):
        alignkern.token_logprobs(torch.randn(2, 5), torch.zeros(2, 3, 4).long())


def test_error_empty_vocabulary():
    with pytest.raises(ValueError, match="non-empty vocabulary.*\\(2, 0\\)"):
        alignkern.token_logprobs(torch.randn(2, 0), torch.zeros(2).long())


def test_error_zero_dim_logits():
    with pytest.raises(ValueError, match="logits must have shape"):
        alignkern.token_logprobs(torch.tensor(1.0), torch.tensor(0))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan"), 1e31, 3.4e39, 1e-31])
def test_error_bad_temperature(temperature):
    """Outside [1e-30, 1e30] 1 / temperature leaves float32's normal range: refused, not NaN."""
    with pytest.raises(ValueError, match="temperature must be positive and finite"):
        alignkern.token_logprobs(torch.randn(2, 5), torch.zeros(2).long(), temperature=temperature)


@pytest.mark.parametrize("temperature,error", [(None, TypeError), ("2", TypeError), (True, TypeError),
                                               (torch.tensor(1.0), TypeError)])
def test_error_temperature_of_the_wrong_kind(temperature, error):
    with pytest.raises(error, match="token_logprobs: temperature must be a real number, got"):
        alignkern.token_logprobs(torch.randn(2, 5), torch.zeros(2).long(), temperature=temperature)


@pytest.mark.parametrize("ignore_index,error,message", [
    (2**64, ValueError, "ignore_index must fit in int64, got 18446744073709551616"),
    (-100.5, TypeError, "ignore_index must be an integer, got float -100.5"),
    (True, TypeError, "ignore_index must be an integer, got bool True"),
    ("-100", TypeError, "ignore_index must be an integer, got str '-100'"),
])
def test_error_ignore_index(ignore_index, error, message):
    with pytest.raises(error, match=f"token_logprobs: {message}"):
        alignkern.token_logprobs(torch.randn(2, 5), torch.zeros(2).long(), ignore_index=ignore_index)


@pytest.mark.parametrize("bad_id", [5, -1, 10**9])
def test_error_target_out_of_range(bad_id):
    targets = torch.tensor([0, bad_id])
    with pytest.raises(IndexError, match=rf"token ids in \[0, 5\) or ignore_index \(-100\), got {bad_id}"):
        alignkern.token_logprobs(torch.randn(2, 5), targets)


def test_error_out_of_range_through_registered_op():
    with pytest.raises(IndexError, match="got 9"):
        torch.ops.alignkern.token_logprobs(torch.randn(2, 5), torch.tensor([0, 9]), 1.0, -100, "auto")


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_error_mixed_devices():
    with pytest.raises(ValueError, match="same device.*cuda.*cpu"):
        alignkern.token_logprobs(torch.randn(2, 5, device="cuda"), torch.zeros(2).long())


def test_error_mixed_devices_with_meta_tensor():
    with pytest.raises(ValueError, match="same device.*cpu.*meta"):
        alignkern.token_logprobs(torch.randn(2, 5), torch.zeros(2, device="meta").long())


def test_error_not_a_tensor():
    with pytest.raises(TypeError, match="logits must be a torch.Tensor, got list"):
        alignkern.token_logprobs([[1.0, 2.0]], torch.zeros(1).long())


def test_error_cuda_backend_unavailable_on_cpu_tensors():
    with alignkern.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        alignkern.token_logprobs(torch.randn(2, 5), torch.zeros(2).long())


# ----------------------------------------------------------------------------- extremes and cost


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", [1e9, 1e20, 1e30])
@pytest.mark.parametrize("temperature", [0.37, 3.0])
def test_huge_scaled_logits_stay_finite_and_never_positive(backend, magnitude, temperature):
    """|logits / T| up to 1e30 with T != 1: the float64 reference is finite and never positive,
    so every backend must be. (A multiply-add that fuses logits * (1/T) in some places only made
    the cpu backend return +inf and log-probabilities tens of nats above 0.)"""
    logits = (torch.randn(6, 333, dtype=torch.float64) * magnitude * temperature).float()
    targets = torch.stack([logits.argmax(-1), torch.randint(0, 333, (6,))], -1)
    x = logits.clone().to(DEVICE).requires_grad_(True)
    out, lse = run(backend, x, targets.to(DEVICE), temperature=temperature, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert (out <= 0).all(), out
    ref_out, ref_lse = reference_fp64(logits, targets, temperature=temperature)
    # float32 holds z = logits / T to eps * |z|, so that is the error to expect.
    z_ulp = torch.finfo(torch.float32).eps * float(logits.abs().max()) / temperature
    torch.testing.assert_close(out.double().cpu(), ref_out, rtol=1e-6, atol=4 * z_ulp)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, rtol=1e-6, atol=4 * z_ulp)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    assert torch.isfinite(grad).all()
    expected = reference_grads(logits, targets, grad_out.cpu(), temperature=temperature)
    torch.testing.assert_close(grad.double().cpu(), expected, rtol=1e-4, atol=1e-6 / temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_temperature_stays_finite(backend):
    logits, targets = make_inputs((5,), 200, 3, torch.float32, ignore_share=0.0, scale=1.0)
    out = run(backend, logits, targets, temperature=1e-30)
    ref = reference_fp64(logits, targets, temperature=1e-30)[0]
    assert torch.isfinite(out).all() and (out <= 0).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="cpu backend unavailable")
def test_cpu_cost_is_linear_in_the_number_of_targets():
    """Forward + backward with 16x more targets per row takes far less than 16^2 = 256x longer
    (the backward once compared every target with every other: K = 16,000 took 6.3 s)."""
    logits = torch.randn(8, 64, requires_grad=True)

    def seconds(k):
        targets = torch.randint(0, 64, (8, k))
        grad_out = torch.randn(8, k)

        def step():
            out = run("cpu", logits, targets)
            torch.autograd.grad(out, logits, grad_out)

        step()
        return min(measure.time_ms(step, torch.device("cpu"), budget_s=0.5, min_reps=5)) / 1e3

    small, large = seconds(1000), seconds(16000)
    assert large < 64 * small, f"K = 16000 took {large:.3f} s, K = 1000 took {small:.4f} s"


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_leaves_token_logprobs_alone(backend):
    """token_logprobs reads its logits in float32 whatever the autocast state, like
    log_softmax: the same values and gradients inside and outside an autocast region."""
    logits, targets = make_inputs((7,), 300, 2, torch.float32)
    x = logits.clone().requires_grad_(True)
    out = run(backend, x, targets)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        inside = run(backend, x, targets)
        (grad_inside,) = torch.autograd.grad(inside, x, grad_out)
    assert torch.equal(inside, out) and torch.equal(grad_inside, grad)


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "triton")])
def test_kernels_never_allocate_float32_logits(backend):
    """Forward allocates O(N*K); forward+backward only the gradient itself (bf16 here)."""
    n, vocab = (512, 65536) if backend == "cpu" else (8, 16384)
    logits = torch.randn(n, vocab, dtype=torch.bfloat16, device=DEVICE)
    targets = torch.randint(0, vocab, (n, 2), device=DEVICE)
    fp32_bytes = n * vocab * 4
    # The interpreter copies its arguments to host arrays; count torch's allocations only there.
    method = "profiler" if backend == "triton" and not HAS_GPU else "auto"
    forward = measure.peak_memory_bytes(lambda: run(backend, logits, targets), DEVICE,
                                        cpu_method=method)
    assert forward < fp32_bytes / 64, f"forward allocated {forward / 2**20:.1f} MiB"

    x = logits.requires_grad_(True)

    def forward_backward():
        out = run(backend, x, targets)
        torch.autograd.grad(out, x, torch.randn_like(out))

    both = measure.peak_memory_bytes(forward_backward, DEVICE, cpu_method=method)
    grad_bytes = n * vocab * 2
    assert both < grad_bytes + fp32_bytes / 64, f"fwd+bwd allocated {both / 2**20:.1f} MiB"


def test_peak_memory_measure_sees_a_float32_log_softmax():
    """The measurement above can fail: eager log_softmax of bf16 logits shows its float32 copy."""
    logits = torch.randn(512, 8192, dtype=torch.bfloat16, device=DEVICE)
    peak = measure.peak_memory_bytes(lambda: torch.log_softmax(logits.float(), -1), DEVICE)
    assert peak >= 512 * 8192 * 4


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [32000, 128256, 151936, 262144])
def test_gpu_large_vocabulary(backend, dtype, vocab):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} backend unavailable")
    logits, targets = make_inputs((64,), vocab, 4, dtype)
    x = logits.clone().requires_grad_(True)
    out, lse = run(backend, x, targets, return_lse=True)
    torch.testing.assert_close(out.double(), reference_fp64(logits, targets)[0], rtol=5e-5, atol=5e-5)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    expected = reference_grads(logits, targets, grad_out)
    torch.testing.assert_close(grad.double(), expected, **grad_tolerance(dtype))
    assert math.isfinite(lse.sum().item())


# ----------------------------------------------------------------------------- property-based


@settings(max_examples=60, deadline=None, derandomize=True)  # same examples in every CI run
@given(
    rows=st.integers(0, 6),
    vocab=st.integers(1, 3000),
    k=st.integers(1, 4),
    temperature=st.floats(0.05, 20.0),
    scale=st.floats(0.01, 50.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_kernel_matches_reference_on_random_shapes(rows, vocab, k, temperature, scale, seed):
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend unavailable")
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * scale).to(DEVICE)
    targets = torch.randint(0, vocab, (rows, k), generator=gen).to(DEVICE)
    x = logits.clone().requires_grad_(True)
    out = run("cpu", x, targets, temperature=temperature)
    # float32 holds z = logits / T only to eps * |z| (|z| reaches 1e6 here), and the kernel's FMAs
    # round z in different places than the float64 reference does, so the error scales with |z|.
    largest = float(logits.abs().amax()) if logits.numel() else 0.0
    z_ulp = torch.finfo(torch.float32).eps * largest / temperature
    torch.testing.assert_close(
        out.double(), reference_fp64(logits, targets, temperature=temperature)[0],
        rtol=2e-5, atol=2e-5 + 4 * z_ulp,
    )
    grad_out = torch.randn(out.shape, generator=gen).to(DEVICE)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    expected = reference_grads(logits, targets, grad_out, temperature=temperature)
    g_max = float(grad_out.abs().amax()) if grad_out.numel() else 0.0
    torch.testing.assert_close(
        grad.double(), expected, rtol=1e-4, atol=1e-6 + 4 * z_ulp * g_max / temperature
    )
