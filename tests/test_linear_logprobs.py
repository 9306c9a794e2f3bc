"""linear_logprobs, option_logprobs, self_eval_scores and sequence_logprobs on every backend against
float64 torch.log_softmax of the materialised logits (tests/oracles.py; the scoring compositions
against alignkern.reference evaluated in float64)."""

from __future__ import annotations

import oracles
import pytest
import torch
from conftest import DEVICE, HAS_GPU, available_backends

import alignkern
from alignkern import reference
from alignkern.bench import measure

BACKENDS = available_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100
HIDDEN = 70  # not a multiple of any tile


def make_inputs(lead, vocab, k, dtype, *, hidden=HIDDEN, ignore_share=0.2, bias=False,
                device=DEVICE):
    """Random hidden states, LM head (logits of order 3) and targets with some ignore_index."""
    h = torch.randn(*lead, hidden, dtype=torch.float64).to(dtype).to(device)
    w = (torch.randn(vocab, hidden, dtype=torch.float64) * 3 / hidden**0.5).to(dtype).to(device)
    b = torch.randn(vocab, dtype=torch.float64).to(dtype).to(device) if bias else None
    shape = tuple(lead) if k is None else (*lead, k)
    targets = torch.randint(0, vocab, shape)
    targets[torch.rand(shape) < ignore_share] = IGNORE
    return h, w, b, targets.to(device)


def run(backend, *args, **kw):
    with alignkern.use_backend(backend):
        return alignkern.linear_logprobs(*args, **kw)


def reference_fp64(h, w, targets, b=None, **kw):
    return oracles.linear_logprobs(h, w, targets, b, **kw)


def reference_grads(h, w, b, targets, grad_out, grad_lse=None, **kw):
    """float64 autograd through the materialised log_softmax: (dh, dw, db or None)."""
    leaves = [x.detach().double().requires_grad_(True) for x in (h, w)]
    if b is not None:
        leaves.append(b.detach().double().requires_grad_(True))
    out, lse = oracles.linear_logprobs(leaves[0], leaves[1], targets,
                                       leaves[2] if b is not None else None, **kw)
    loss = (out * grad_out.double()).sum()
    if grad_lse is not None:
        loss = loss + (lse * grad_lse.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    return (*grads, None) if b is None else grads


FORWARD_TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 5e-5, torch.bfloat16: 5e-5}
# Relative to the largest gradient entry: gradients are written in the inputs' dtype.
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def assert_close_scaled(actual, expected, rel):
    """|actual - expected| <= rel * max|expected| everywhere (NaN where expected is NaN)."""
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    assert actual.shape == expected.shape
    assert torch.equal(actual.isnan(), expected.isnan())
    scale = expected.nan_to_num().abs().max().clamp(min=1e-30)
    err = (actual - expected).nan_to_num().abs().max()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:.1g} * {scale:.3g}"


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab,k", [(7, None), (7, 3), (1029, 1), (1029, 4), (50257, 4)])
def test_forward_matches_reference(backend, dtype, vocab, k):
    h, w, _, targets = make_inputs((37,), vocab, k, dtype)
    out, lse = run(backend, h, w, targets, return_lse=True)
    ref_out, ref_lse = reference_fp64(h, w, targets)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == targets.shape and lse.shape == h.shape[:-1]
    tol = FORWARD_TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("temperature", [0.6, 1.0])
@pytest.mark.parametrize("ignore_index", [IGNORE, 3])
def test_bias_softcap_temperature_ignore_index(backend, softcap, temperature, ignore_index):
    h, w, b, targets = make_inputs((3, 5), 300, 3, torch.float32, bias=True)
    targets[targets == IGNORE] = ignore_index
    targets[0, 0] = 3  # a valid id used as ignore_index is ignored
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index)
    out, lse = run(backend, h, w, targets, bias=b, return_lse=True, **kw)
    ref_out, ref_lse = reference_fp64(h, w, targets, b, **kw)
    torch.testing.assert_close(out.double(), ref_out, rtol=5e-5, atol=5e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=5e-5, atol=5e-5)
    if ignore_index == 3:
        assert (out[targets == 3] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_float64(backend):
    if backend == "cuda":
        pytest.skip("the cuda backend refuses float64")
    h, w, b, targets = make_inputs((9,), 513, 2, torch.float64, bias=True)
    out = run(backend, h, w, targets, bias=b, softcap=4.0, temperature=0.9)
    assert out.dtype == torch.float64
    expected = reference_fp64(h, w, targets, b, softcap=4.0, temperature=0.9)[0]
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (1,), (2, 0), (1, 1)])
def test_empty_and_single_rows(backend, lead):
    h, w, _, targets = make_inputs(lead, 50, 2, torch.float32)
    out, lse = run(backend, h, w, targets, return_lse=True)
    assert out.shape == targets.shape and lse.shape == lead
    ref_out, ref_lse = reference_fp64(h, w, targets)
    torch.testing.assert_close(out.double(), ref_out, rtol=5e-5, atol=5e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_and_many_targets_per_row(backend):
    """K = 0 returns (N, 0) and the LSE; K = 70 with repeated ids."""
    h, w, _, targets = make_inputs((5,), 200, 70, torch.float32)
    out = run(backend, h, w, targets)
    torch.testing.assert_close(out.double(), reference_fp64(h, w, targets)[0], rtol=5e-5, atol=5e-5)
    empty, lse = run(backend, h, w, targets[:, :0], return_lse=True)
    assert empty.shape == (5, 0)
    torch.testing.assert_close(lse.double(), reference_fp64(h, w, targets)[1], rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_hidden_and_weight(backend, dtype):
    """A slice of [B, T, H] (as after dropping the last position), a hidden with a strided last
    dimension, and a transposed-storage LM head."""
    full, w, _, _ = make_inputs((3, 8), 333, None, dtype)
    h = full[:, :-1]
    targets = torch.randint(0, 333, (3, 7, 2), device=DEVICE)
    w_t = w.T.contiguous().T  # same values, column-major storage
    out = run(backend, h, w_t, targets)
    torch.testing.assert_close(out.double(), reference_fp64(h, w, targets)[0], rtol=5e-5, atol=5e-5)
    wide = torch.randn(4, 2 * HIDDEN, dtype=dtype, device=DEVICE)
    strided = wide[:, ::2]
    targets = torch.randint(0, 333, (4,), device=DEVICE)
    out = run(backend, strided, w, targets)
    torch.testing.assert_close(out.double(), reference_fp64(strided, w, targets)[0],
                               rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_targets(backend):
    h, w, _, targets = make_inputs((6,), 100, 2, torch.float32)
    out = run(backend, h, w, targets.int())
    torch.testing.assert_close(out, run(backend, h, w, targets))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_hidden_stays_in_its_row(backend):
    h, w, _, targets = make_inputs((4,), 100, 2, torch.float32, ignore_share=0.0)
    h[1, 5] = float("nan")
    out, lse = run(backend, h, w, targets, return_lse=True)
    assert out[1].isnan().all() and lse[1].isnan()
    keep = torch.tensor([0, 2, 3])
    torch.testing.assert_close(out[keep].double(), reference_fp64(h, w, targets)[0][keep],
                               rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_ids_give_nan_when_validation_is_off(backend, monkeypatch):
    monkeypatch.setenv("ALIGNKERN_VALIDATE", "0")
    h, w, _, _ = make_inputs((3,), 20, None, torch.float32)
    targets = torch.tensor([[3, 20], [-1, 2], [IGNORE, 19]], device=DEVICE)
    x = h.clone().requires_grad_(True)
    out = run(backend, x, w, targets)
    expected_nan = torch.tensor([[0, 1], [1, 0], [0, 0]], dtype=torch.bool)
    assert torch.equal(out.isnan().cpu(), expected_nan)
    (grad,) = torch.autograd.grad(out, x, torch.randn_like(out))
    assert grad[:2].isnan().all() and not grad[2].isnan().any()


# ----------------------------------------------------------------------------- backward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab,k", [(7, 3), (1029, None), (1029, 4)])
def test_backward_random_upstream_gradient(backend, dtype, vocab, k):
    h, w, b, targets = make_inputs((2, 19), vocab, k, dtype, bias=True)
    if k is not None:
        targets[0, 0, 1] = targets[0, 0, 0] = 3  # a repeated id in one row: gradients add
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    out = run(backend, leaves[0], leaves[1], targets, bias=leaves[2], temperature=0.8, softcap=6.0)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    expected = reference_grads(h, w, b, targets, grad_out, temperature=0.8, softcap=6.0)
    for name, got, want, leaf in zip(("hidden", "weight", "bias"), grads, expected, leaves):
        assert got.dtype == dtype and got.shape == leaf.shape, name
        assert_close_scaled(got, want, GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_within_twice_plain_pytorch(backend, dtype):
    """docs/design.md's bar: no more than 2x the error of the same computation in plain PyTorch."""
    h, w, _, targets = make_inputs((64,), 2000, 2, dtype)
    grad_out = torch.randn(targets.shape, device=DEVICE)
    expected = reference_grads(h, w, None, targets, grad_out)

    def plain(hh, ww):
        logprobs = torch.log_softmax((hh @ ww.T).float(), -1)
        valid = targets != IGNORE
        return torch.gather(logprobs, -1, targets.clamp(min=0)) * valid

    def errors(fn):
        leaves = [x.clone().requires_grad_(True) for x in (h, w)]
        grads = torch.autograd.grad(fn(*leaves), leaves, grad_out)
        return [(g.double() - e).abs().max().item() for g, e in zip(grads, expected)]

    ours = errors(lambda hh, ww: run(backend, hh, ww, targets))
    theirs = errors(plain)
    for name, mine, base in zip(("hidden", "weight"), ours, theirs):
        assert mine <= 2 * base, f"d{name}: {mine:.3g} vs plain PyTorch {base:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_none_gradients_use_every_upstream_element(backend):
    """The bug class of fused losses that precompute gradients for a scalar upstream gradient:
    per-element gradients must be used as given. Rows whose upstream gradient is zero get exactly
    zero dhidden, gradients are linear in the upstream gradient, and they match float64."""
    h, w, b, targets = make_inputs((12,), 257, 2, torch.float32, ignore_share=0.0, bias=True)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]

    def grads(grad_out):
        out = run(backend, leaves[0], leaves[1], targets, bias=leaves[2])
        return torch.autograd.grad(out, leaves, grad_out)

    g1 = torch.randn(targets.shape, device=DEVICE)
    g1[3] = 0.0
    g2 = torch.randn(targets.shape, device=DEVICE) * torch.arange(12, device=DEVICE)[:, None]
    first, second, both = grads(g1), grads(g2), grads(g1 + g2)
    assert (first[0][3] == 0).all()
    for a, c, ab in zip(first, second, both):
        assert_close_scaled(ab, a + c, 1e-5)
    for got, want in zip(first, reference_grads(h, w, b, targets, g1)):
        assert_close_scaled(got, want, GRAD_TOL[torch.float32])
    mean_loss_grads = grads(torch.full(targets.shape, 1.0 / targets.numel(), device=DEVICE))
    uniform = reference_grads(h, w, b, targets, torch.full(targets.shape, 1.0 / targets.numel()))
    for got, want in zip(mean_loss_grads, uniform):
        assert_close_scaled(got, want, GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_stride_zero_upstream_gradient_and_lse(backend):
    h, w, _, targets = make_inputs((3, 5), 64, 2, torch.float32)
    x = h.clone().requires_grad_(True)
    out, lse = run(backend, x, w, targets, return_lse=True, temperature=1.7)
    grad_lse = torch.randn_like(lse)
    (out.sum() + (lse * grad_lse).sum()).backward()
    expected = reference_grads(h, w, None, targets, torch.ones(targets.shape), grad_lse,
                               temperature=1.7)[0]
    assert_close_scaled(x.grad, expected, GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_backward_with_frozen_inputs(backend, frozen):
    """A frozen LM head (or frozen hidden states) skips that gradient; the other is unchanged."""
    h, w, _, targets = make_inputs((9,), 130, 2, torch.float32)
    x = h.clone().requires_grad_(frozen != "hidden")
    y = w.clone().requires_grad_(frozen != "weight")
    out = run(backend, x, y, targets)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected = reference_grads(h, w, None, targets, grad_out)
    live, index = (x, 0) if frozen == "weight" else (y, 1)
    assert_close_scaled(live.grad, expected[index], GRAD_TOL[torch.float32])
    assert (y if frozen == "weight" else x).grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    h, w, b, targets = make_inputs((40,), 517, 3, torch.float32, bias=True)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    grad_out = torch.randn(targets.shape, device=DEVICE)

    def grads():
        return torch.autograd.grad(run(backend, leaves[0], leaves[1], targets, bias=leaves[2]),
                                   leaves, grad_out)

    for first, second in zip(grads(), grads()):
        assert torch.equal(first, second)


def _cpu_backward_path(monkeypatch, path: str) -> None:
    """``"recompute"``: the cpu backend keeps no logits (every tile recomputed in the backward);
    ``"kept"``: it keeps them and reads them back in narrow vocabulary blocks."""
    from alignkern.ops import linear_logprobs_cpu

    if path == "recompute":
        monkeypatch.setenv("ALIGNKERN_CPU_KEEP_LOGITS_MIB", "0")
    else:
        monkeypatch.setattr(linear_logprobs_cpu, "SCRATCH_BYTES", 37 * 100 * 4)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "triton")])
@pytest.mark.parametrize("cpu_path", ["recompute", "kept"])
def test_many_tiles_chunks_and_vocabulary_splits(backend, cpu_path, monkeypatch):
    """Shrink the tiles so that the cpu path walks many (rows x vocabulary) tiles and merges their
    LSEs (or, keeping the logits, its backward many vocabulary blocks of them), the Triton
    backward many row chunks, and the Triton forward several vocabulary splits."""
    if backend != "cpu" and cpu_path == "kept":
        pytest.skip("the cpu backend's choice")
    from alignkern.ops import linear_logprobs_cpu
    from alignkern.triton_kernels import linear_logprobs as kernels

    monkeypatch.setattr(linear_logprobs_cpu, "TILE_BYTES", 8 * 50 * 4)
    monkeypatch.setattr(linear_logprobs_cpu, "MAX_TILE_ROWS", 8)
    _cpu_backward_path(monkeypatch, cpu_path)
    monkeypatch.setattr(kernels, "_vocab_splits", lambda *args: 3)
    h, w, b, targets = make_inputs((37,), 1029, 3, torch.float32, bias=True)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    kw = dict(temperature=0.7, softcap=4.0)
    out, lse = run(backend, leaves[0], leaves[1], targets, bias=leaves[2], return_lse=True, **kw)
    ref_out, ref_lse = reference_fp64(h, w, targets, b, **kw)
    torch.testing.assert_close(out.double(), ref_out, rtol=5e-5, atol=5e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=5e-5, atol=5e-5)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse))
    for got, want in zip(grads, reference_grads(h, w, b, targets, grad_out, grad_lse, **kw)):
        assert_close_scaled(got, want, GRAD_TOL[torch.float32])


@pytest.mark.parametrize("cpu_path", ["recompute", "kept"])
def test_cpu_backward_twice_with_retain_graph(cpu_path, monkeypatch):
    """The kept logits are only read by the backward: a second backward through the same graph
    gives the same gradients (and keeping them or not, the same numbers)."""
    _cpu_backward_path(monkeypatch, cpu_path)
    h, w, b, targets = make_inputs((37,), 1029, 3, torch.float32, bias=True)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    with alignkern.use_backend("cpu"):
        result = alignkern.linear_logprobs(*leaves[:2], targets, bias=leaves[2], softcap=4.0,
                                           stats=("entropy",))
    upstream = (torch.randn_like(result.logprobs), torch.randn_like(result.entropy))
    first = torch.autograd.grad((result.logprobs, result.entropy), leaves, upstream,
                                retain_graph=True)
    second = torch.autograd.grad((result.logprobs, result.entropy), leaves, upstream)
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])
def test_gradcheck_float64(backend):
    h, w, b, targets = make_inputs((3,), 11, 2, torch.float64, hidden=5, bias=True)
    leaves = tuple(x.clone().requires_grad_(True) for x in (h, w, b))
    temperature = 1.0 if backend == "triton" else 0.7  # triton scales by 1/T in float32
    with alignkern.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda hh, ww, bb: alignkern.linear_logprobs(
                hh, ww, targets, bias=bb, softcap=3.0, temperature=temperature, return_lse=True
            ),
            leaves,
        )


# ----------------------------------------------------------------------------- logit_scale

LOGIT_SCALES = [0.0625, 0.25, 2.5]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("logit_scale", LOGIT_SCALES)
def test_logit_scale_forward_and_backward(backend, dtype, softcap, logit_scale):
    """z = softcap * tanh(logit_scale * (h W^T + b) / softcap) / T (no tanh without softcap):
    log-probs, LSE and the gradients for hidden, weight and bias under a random upstream gradient
    against float64 autograd of the reference."""
    h, w, b, targets = make_inputs((2, 9), 300, 3, dtype, bias=True)
    targets[0, 0, 1] = targets[0, 0, 0] = 5  # a repeated id: its gradients add
    kw = dict(temperature=0.7, softcap=softcap, logit_scale=logit_scale)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    out, lse = run(backend, leaves[0], leaves[1], targets, bias=leaves[2], return_lse=True, **kw)
    ref_out, ref_lse = reference_fp64(h, w, targets, b, **kw)
    torch.testing.assert_close(out.double(), ref_out, rtol=5e-5, atol=5e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=5e-5, atol=5e-5)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse))
    expected = reference_grads(h, w, b, targets, grad_out, grad_lse, **kw)
    for name, got, want, leaf in zip(("hidden", "weight", "bias"), grads, expected, leaves):
        assert got.dtype == dtype and got.shape == leaf.shape, name
        assert_close_scaled(got, want, GRAD_TOL[dtype])


def test_logit_scale_is_the_scale_of_the_reference_logits():
    """The reference itself: Cohere's multiply, and Granite's divide as logit_scale = 1 / s."""
    h, w, b, _ = make_inputs((4,), 30, None, torch.float64, bias=True)
    plain = reference.linear_logits(h, w, b)
    torch.testing.assert_close(reference.linear_logits(h, w, b, logit_scale=0.25), plain * 0.25)
    torch.testing.assert_close(reference.linear_logits(h, w, b, 5.0, logit_scale=2.5),
                               5.0 * torch.tanh(plain * 2.5 / 5.0))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_logit_scale_gradcheck_float64(backend, softcap):
    h, w, b, targets = make_inputs((3,), 11, 2, torch.float64, hidden=5, bias=True)
    leaves = tuple(x.clone().requires_grad_(True) for x in (h, w, b))
    # triton takes 1/T and the scale in float32: values it holds exactly
    temperature, logit_scale = (1.0, 0.25) if backend == "triton" else (0.7, 2.5)
    with alignkern.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda hh, ww, bb: alignkern.linear_logprobs(
                hh, ww, targets, bias=bb, softcap=softcap, temperature=temperature,
                logit_scale=logit_scale, return_lse=True,
            ),
            leaves,
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_logit_scale_torch_compile_fullgraph_with_backward(backend, softcap):
    torch._dynamo.reset()
    h, w, b, targets = make_inputs((2, 6), 100, 2, torch.float32, bias=True)
    kw = dict(temperature=0.9, softcap=softcap, logit_scale=0.25)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(hh, ww, bb, t):
        return -(alignkern.linear_logprobs(hh, ww, t, bias=bb, **kw) * 2.0).sum()

    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    with alignkern.use_backend(backend):
        loss = loss_fn(*leaves, targets)
        loss.backward()
    ref_loss = -(reference_fp64(h, w, targets, b, **kw)[0] * 2.0).sum()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    expected = reference_grads(h, w, b, targets, torch.full(targets.shape, -2.0), **kw)
    for leaf, want in zip(leaves, expected):
        assert_close_scaled(leaf.grad, want, GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logit_scale", LOGIT_SCALES)
def test_logit_scale_in_the_scoring_helpers(backend, logit_scale):
    """option_logprobs, self_eval_scores and sequence_logprobs pass logit_scale on."""
    h, w, b, targets = make_inputs((3, 5), 211, None, torch.float32, bias=True, ignore_share=0.0)
    hd, wd, bd = h.double(), w.double(), b.double()
    options = torch.tensor([17, 3, 200], device=DEVICE)
    values = torch.tensor([1.0, 0.0, -2.0], device=DEVICE)
    mask = torch.rand(3, 5, device=DEVICE) > 0.3
    kw = dict(bias=b, temperature=0.8, softcap=4.0, logit_scale=logit_scale)
    ref_kw = dict(kw, bias=bd)
    with alignkern.use_backend(backend):
        options_out = alignkern.option_logprobs(h, w, options, **kw)
        score, mass = alignkern.self_eval_scores(h, w, options, values, **kw)
        sequences = alignkern.sequence_logprobs(h, w, targets, mask, reduction="mean",
                                                logit_scale=logit_scale)
    torch.testing.assert_close(options_out.double(),
                               reference.option_logprobs(hd, wd, options, **ref_kw),
                               rtol=5e-5, atol=5e-5)
    ref_score, ref_mass = reference.self_eval_scores(hd, wd, options, values.double(), **ref_kw)
    torch.testing.assert_close(score.double(), ref_score, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass.double(), ref_mass, rtol=1e-5, atol=1e-7)
    expected = reference.sequence_logprobs(hd, wd, targets, mask, reduction="mean",
                                           logit_scale=logit_scale)
    torch.testing.assert_close(sequences.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", ["linear_logprobs", "sequence_logprobs", "option_logprobs",
                                "self_eval_scores"])
@pytest.mark.parametrize("value,error,message", [
    (0.0, ValueError, "logit_scale must be positive and finite, got 0.0"),
    (-1.0, ValueError, "logit_scale must be positive and finite, got -1.0"),
    (float("nan"), ValueError, "logit_scale must be positive and finite, got nan"),
    (float("inf"), ValueError, "logit_scale must be positive and finite, got inf"),
    (True, TypeError, "logit_scale must be a real number, got bool True"),
    ("2", TypeError, "logit_scale must be a real number, got str '2'"),
    (torch.tensor(2.0), TypeError, "logit_scale must be a real number, got a torch.float32 tensor"),
    (None, TypeError, "logit_scale must be a real number, got None"),
])
def test_error_bad_logit_scale(fn, value, error, message):
    h, w = torch.randn(2, 3, 8), _head()
    args = {"linear_logprobs": (h, w, torch.zeros(2, 3).long()),
            "sequence_logprobs": (h, w, torch.zeros(2, 3).long()),
            "option_logprobs": (h, w, torch.tensor([1, 2])),
            "self_eval_scores": (h, w, torch.tensor([1, 2]))}[fn]
    with pytest.raises(error, match=f"^{fn}: {message}"):
        getattr(alignkern, fn)(*args, logit_scale=value)


def test_error_bad_logit_scale_under_torch_compile():
    torch._dynamo.reset()
    h, w = torch.randn(2, 8), _head()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def scores(hh, ww):
        return alignkern.linear_logprobs(hh, ww, torch.zeros(2).long(), logit_scale=-2.0)

    with pytest.raises(Exception, match="logit_scale must be positive and finite"):
        scores(h, w)


# ----------------------------------------------------------------------------- torch integration


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """Both ops, with a logit_scale != 1 with a softcap and without one (where it is folded into
    the temperature), and the plain case."""
    h, w, b, targets = make_inputs((4, 3), 50, 2, torch.float32, bias=True)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    torch.library.opcheck(torch.ops.alignkern.linear_logprobs.default,
                          (*leaves[:2], targets, leaves[2], 1.3, 2.0, 0.4, IGNORE, False, backend))
    torch.library.opcheck(torch.ops.alignkern.linear_logprobs.default,
                          (*leaves[:2], targets, None, 1.3, None, 2.5, IGNORE, False, backend))
    torch.library.opcheck(torch.ops.alignkern.linear_logprobs.default,
                          (h, w, targets, None, 1.0, None, 1.0, IGNORE, False, backend))
    torch.library.opcheck(torch.ops.alignkern.linear_logprobs.default,  # a lower-precision head
                          (leaves[0], w.bfloat16().requires_grad_(True), targets,
                           b.bfloat16(), 1.3, 2.0, 0.4, IGNORE, False, backend))
    for softcap, scale, needs in [(2.0, 0.4, (True, True, True)), (2.0, 0.4, (True, False, False)),
                                  (None, 2.5, (False, True, True))]:
        out, row_max, log_sum, _ = torch.ops.alignkern.linear_logprobs(
            h, w, targets, b, 1.3, softcap, scale, IGNORE, False, backend)
        torch.library.opcheck(
            torch.ops.alignkern.linear_logprobs_backward.default,
            (torch.randn_like(out), torch.randn_like(log_sum), h, w, targets, b, row_max, log_sum,
             1.3, softcap, scale, IGNORE, *needs, backend),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_with_backward(backend):
    torch._dynamo.reset()
    h, w, b, targets = make_inputs((2, 6), 100, 2, torch.float32, bias=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(hh, ww, bb, t):
        return -(alignkern.linear_logprobs(hh, ww, t, bias=bb, temperature=0.9) * 2.0).sum()

    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    with alignkern.use_backend(backend):
        loss = loss_fn(*leaves, targets)
        loss.backward()
    ref_loss = -(reference_fp64(h, w, targets, b, temperature=0.9)[0] * 2.0).sum()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    expected = reference_grads(h, w, b, targets, torch.full(targets.shape, -2.0), temperature=0.9)
    for leaf, want in zip(leaves, expected):
        assert_close_scaled(leaf.grad, want, GRAD_TOL[torch.float32])


def test_torch_compile_inductor_sequence_logprobs():
    """The default inductor backend compiles the scoring helpers around the op (graph stays whole)."""
    torch._dynamo.reset()
    h, w, _, targets = make_inputs((3, 5), 64, None, torch.float32, ignore_share=0.0)
    mask = torch.rand(3, 5, device=DEVICE) > 0.3

    @torch.compile(fullgraph=True)
    def score(hh, ww, t, m):
        return alignkern.sequence_logprobs(hh * 0.5, ww, t, m, reduction="mean")

    expected = reference.sequence_logprobs((h * 0.5).double(), w.double(), targets, mask,
                                           reduction="mean")
    torch.testing.assert_close(score(h, w, targets, mask).double(), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- scoring helpers


@pytest.mark.parametrize("backend", BACKENDS)
def test_option_logprobs(backend):
    h, w, b, _ = make_inputs((2, 5), 1029, None, torch.bfloat16, bias=True)
    options = torch.tensor([17, 3, 1000], device=DEVICE)
    with alignkern.use_backend(backend):
        out = alignkern.option_logprobs(h, w, options, bias=b, temperature=0.7)
    assert out.shape == (2, 5, 3)
    expected = reference.option_logprobs(h.double(), w.double(), options, bias=b.double(),
                                          temperature=0.7)
    torch.testing.assert_close(out.double(), expected, rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_eval_scores_two_options_default_values(backend):
    h, w, _, _ = make_inputs((6,), 300, None, torch.float32)
    options = torch.tensor([11, 42], device=DEVICE)
    x = h.clone().requires_grad_(True)
    with alignkern.use_backend(backend):
        score, mass = alignkern.self_eval_scores(x, w, options)
    logprobs = reference.option_logprobs(h.double(), w.double(), options)
    p = logprobs.exp()
    torch.testing.assert_close(score.double(), (p[:, 0] - p[:, 1]) / p.sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mass.double(), p.sum(-1), rtol=1e-5, atol=1e-7)
    assert ((score >= -1) & (score <= 1)).all() and ((mass > 0) & (mass < 1)).all()
    grad_score = torch.randn_like(score)
    (grad,) = torch.autograd.grad(score, x, grad_score)
    xd = h.double().requires_grad_(True)
    ref_score, _ = reference.self_eval_scores(xd, w.double(), options)
    (expected,) = torch.autograd.grad(ref_score, xd, grad_score.double())
    assert_close_scaled(grad, expected, GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_eval_scores_geval_expected_rating(backend):
    """G-Eval: options are the ids of "1".."10", values 1..10; score is the expected rating."""
    h, w, _, _ = make_inputs((4,), 500, None, torch.float32)
    options = torch.arange(100, 110, device=DEVICE)
    values = torch.arange(1, 11, dtype=torch.float32, device=DEVICE)
    with alignkern.use_backend(backend):
        score, mass = alignkern.self_eval_scores(h, w, options, values)
    ref_score, ref_mass = reference.self_eval_scores(h.double(), w.double(), options, values.double())
    torch.testing.assert_close(score.double(), ref_score, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass.double(), ref_mass, rtol=1e-5, atol=1e-7)
    assert ((score >= 1) & (score <= 10)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_logprobs(backend, reduction):
    h, w, b, targets = make_inputs((4, 9), 211, None, torch.float32, bias=True)
    mask = torch.rand(4, 9, device=DEVICE) > 0.25
    mask[2] = False  # a sequence with no counted token
    targets[~mask] = 10**6  # ids under the mask are never checked nor read
    x = h.clone().requires_grad_(True)
    with alignkern.use_backend(backend):
        out = alignkern.sequence_logprobs(x, w, targets, mask, reduction=reduction, bias=b)
    assert out.shape == (4,) and out[2] == 0
    xd = h.double().requires_grad_(True)
    expected = reference.sequence_logprobs(xd, w.double(), targets, mask, reduction=reduction,
                                           bias=b.double())
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    (want,) = torch.autograd.grad(expected, xd, grad_out.double())
    assert_close_scaled(grad, want, GRAD_TOL[torch.float32])


# ----------------------------------------------------------------------------- errors


def _head(vocab=20, hidden=8, dtype=torch.float32):
    return torch.randn(vocab, hidden, dtype=dtype)


def test_error_hidden_size_mismatch():
    message = r"hidden size mismatch: hidden has H = 6.*weight \(V, H\) has H = 8"
    with pytest.raises(ValueError, match=message):
        alignkern.linear_logprobs(torch.randn(3, 6), _head(), torch.zeros(3).long())


@pytest.mark.parametrize("shape", [(20,), (2, 20, 8)])
def test_error_weight_not_2d(shape):
    with pytest.raises(ValueError, match=r"weight must be the 2-D LM head \(V, H\)"):
        alignkern.linear_logprobs(torch.randn(3, 8), torch.randn(shape), torch.zeros(3).long())


def test_error_mismatched_dtypes():
    # A head of lower precision is taken (test_a_head_of_lower_precision_than_the_hidden_states);
    # of higher precision it is not.
    with pytest.raises(TypeError, match="weight must have the dtype of hidden or a lower precision"
                                        ".*bfloat16.*got torch.float32"):
        alignkern.linear_logprobs(torch.randn(3, 8).bfloat16(), _head(), torch.zeros(3).long())
    with pytest.raises(TypeError, match="bias must have the dtype of hidden"):
        alignkern.linear_logprobs(torch.randn(3, 8), _head(), torch.zeros(3).long(),
                                  bias=torch.zeros(20, dtype=torch.float64))


def test_error_integer_hidden_and_float_targets():
    with pytest.raises(TypeError, match="hidden must be float32.*int64"):
        alignkern.linear_logprobs(torch.zeros(3, 8).long(), _head(), torch.zeros(3).long())
    with pytest.raises(TypeError, match="targets must be int32 or int64.*float32"):
        alignkern.linear_logprobs(torch.randn(3, 8), _head(), torch.zeros(3))


def test_error_mixed_devices_with_meta_tensor():
    with pytest.raises(ValueError, match="same device.*hidden on cpu.*weight on meta"):
        alignkern.linear_logprobs(torch.randn(3, 8), _head().to("meta"), torch.zeros(3).long())


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_error_mixed_devices():
    with pytest.raises(ValueError, match="same device"):
        alignkern.linear_logprobs(torch.randn(3, 8, device="cuda"), _head(), torch.zeros(3).long())


@pytest.mark.parametrize("bad_id", [20, -1])
def test_error_target_out_of_range(bad_id):
    with pytest.raises(IndexError, match=rf"token ids in \[0, 20\) or ignore_index \(-100\), got {bad_id}"):
        alignkern.linear_logprobs(torch.randn(2, 8), _head(), torch.tensor([0, bad_id]))
    with pytest.raises(IndexError, match=f"got {bad_id}"):
        alignkern.option_logprobs(torch.randn(2, 8), _head(), torch.tensor([0, bad_id]))


def test_error_shapes_of_targets_and_bias():
    with pytest.raises(ValueError, match=r"targets must have shape \(3,\) or \(3, 'K'\).*\(4,\)"):
        alignkern.linear_logprobs(torch.randn(3, 8), _head(), torch.zeros(4).long())
    with pytest.raises(ValueError,
                       match=r"bias must have shape \(20,\) \(\(V,\), V from weight\), got \(19,\)"):
        alignkern.linear_logprobs(torch.randn(3, 8), _head(), torch.zeros(3).long(),
                                  bias=torch.zeros(19))


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_error_bad_temperature_and_softcap(value):
    args = (torch.randn(3, 8), _head(), torch.zeros(3).long())
    with pytest.raises(ValueError, match="temperature must be positive and finite"):
        alignkern.linear_logprobs(*args, temperature=value)
    with pytest.raises(ValueError, match="softcap must be None or positive and finite"):
        alignkern.linear_logprobs(*args, softcap=value)


def test_error_scoring_helpers():
    h, w = torch.randn(3, 8), _head()
    with pytest.raises(ValueError, match="options must be a non-empty 1-D tensor of K token ids, "
                                         r"got shape \(2, 1\)"):
        alignkern.option_logprobs(h, w, torch.zeros(2, 1).long())
    with pytest.raises(ValueError, match=r"options must be a non-empty.*got shape \(0,\)"):
        alignkern.option_logprobs(h, w, torch.zeros(0).long())
    with pytest.raises(ValueError, match="values must be given for K = 3"):
        alignkern.self_eval_scores(h, w, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"values must have shape \(2,\) \(one value per option\), "
                                         r"got \(3,\)"):
        alignkern.self_eval_scores(h, w, torch.tensor([1, 2]), torch.ones(3))
    with pytest.raises(ValueError, match="reduction must be one of 'sum', 'mean', got 'none'"):
        alignkern.sequence_logprobs(h[None], w, torch.zeros(1, 3).long(), reduction="none")
    with pytest.raises(ValueError, match=r"hidden must have shape \(B, T, H\), got \(3, 8\)"):
        alignkern.sequence_logprobs(h, w, torch.zeros(3).long())
    with pytest.raises(ValueError, match=r"targets must have shape \(1, 3\) \(\(B, T\) of hidden\), "
                                         r"got \(1, 4\)"):
        alignkern.sequence_logprobs(h[None], w, torch.zeros(1, 4).long())
    with pytest.raises(ValueError, match=r"mask must have shape \(1, 3\) \(the shape of targets\), "
                                         r"got \(3,\)"):
        alignkern.sequence_logprobs(h[None], w, torch.zeros(1, 3).long(), torch.ones(3).bool())


def test_error_cuda_backend_unavailable_on_cpu_tensors():
    with alignkern.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        alignkern.linear_logprobs(torch.randn(3, 8), _head(), torch.zeros(3).long())


def test_error_options_are_never_ignored():
    """An option id of -100 is not ignore_index here: it is out of range, and named so."""
    h, w = torch.randn(3, 8), _head()
    for fn in (alignkern.option_logprobs, alignkern.self_eval_scores):
        with pytest.raises(IndexError, match=rf"^{fn.__name__}: options must be token ids in "
                                             r"\[0, 20\), got -100"):
            fn(h, w, torch.tensor([-100, 5]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_out_of_range_option_is_nan_not_zero(backend, monkeypatch):
    """With ALIGNKERN_VALIDATE=0 an option id of -100 gives NaN (not a log-probability of 0, which
    made the options' mass exceed 1)."""
    monkeypatch.setenv("ALIGNKERN_VALIDATE", "0")
    h, w, _, _ = make_inputs((4,), 30, None, torch.float32)
    with alignkern.use_backend(backend):
        out = alignkern.option_logprobs(h, w, torch.tensor([-100, 5], device=DEVICE))
        score, mass = alignkern.self_eval_scores(h, w, torch.tensor([-100, 5], device=DEVICE))
    assert out[:, 0].isnan().all() and not out[:, 1].isnan().any()
    assert mass.isnan().all() and score.isnan().all()


def test_error_out_of_range_id_in_sequence_logprobs_names_it():
    h, w = torch.randn(1, 3, 8), _head()
    with pytest.raises(IndexError, match=r"^sequence_logprobs: targets must be token ids in \[0, 20\)"):
        alignkern.sequence_logprobs(h, w, torch.tensor([[1, 2, 25]]))


@pytest.mark.parametrize("fn", ["linear_logprobs", "sequence_logprobs", "option_logprobs"])
@pytest.mark.parametrize("kwargs,error,message", [
    (dict(temperature=None), TypeError, "temperature must be a real number, got None"),
    (dict(temperature="2"), TypeError, "temperature must be a real number, got str '2'"),
    (dict(temperature=True), TypeError, "temperature must be a real number, got bool True"),
    (dict(temperature=1e31), ValueError, "temperature must be positive and finite, within"),
    (dict(softcap="30"), TypeError, "softcap must be None or a real number, got str '30'"),
    (dict(ignore_index=2**64), ValueError, "ignore_index must fit in int64"),
    (dict(ignore_index=-100.5), TypeError, "ignore_index must be an integer, got float -100.5"),
])
def test_error_scalars_of_the_wrong_kind(fn, kwargs, error, message):
    h, w = torch.randn(2, 3, 8), _head()
    args = {"linear_logprobs": (h, w, torch.zeros(2, 3).long()),
            "sequence_logprobs": (h, w, torch.zeros(2, 3).long()),
            "option_logprobs": (h, w, torch.tensor([1, 2]))}[fn]
    if fn == "option_logprobs" and "ignore_index" in kwargs:
        pytest.skip("option_logprobs takes no ignore_index")
    with pytest.raises(error, match=f"^{fn}: {message}"):
        getattr(alignkern, fn)(*args, **kwargs)


# ----------------------------------------------------------------------------- extremes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", [1e9, 1e20])
def test_huge_scaled_logits_stay_finite_and_never_positive(backend, magnitude):
    """Logits of 1e9 and beyond with T = 0.37: finite, never positive, and as close to the float64
    reference as float32 logits allow."""
    temperature = 0.37
    h, w, _, _ = make_inputs((6,), 300, None, torch.float32)
    h = h * (magnitude * temperature)
    logits = reference.linear_logits(h.double(), w.double())
    targets = torch.stack([logits.argmax(-1), torch.randint(0, 300, (6,), device=DEVICE)], -1)
    x = h.clone().requires_grad_(True)
    out, lse = run(backend, x, w, targets, temperature=temperature, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert (out <= 0).all(), out
    ref_out, ref_lse = reference_fp64(h, w, targets, temperature=temperature)
    z_ulp = 64 * torch.finfo(torch.float32).eps * float(logits.abs().max()) / temperature
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=z_ulp)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=z_ulp)
    (grad,) = torch.autograd.grad(out, x, torch.randn_like(out))
    assert torch.isfinite(grad).all()


# ----------------------------------------------------------------------------- autocast


def _autocast_and_cast_by_hand(backend, leaves, targets, **kw):
    """``(out, grads)`` under torch.autocast, and the same with the operands cast to bfloat16 by
    hand (no autocast), each with the same random upstream gradient."""
    with alignkern.use_backend(backend):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            out = alignkern.linear_logprobs(*leaves[:2], targets, bias=leaves[2], **kw)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, grad_out)
        cast = [x.detach().to(torch.bfloat16).requires_grad_(True) for x in leaves]
        by_hand = alignkern.linear_logprobs(*cast[:2], targets, bias=cast[2], **kw)
        return out, grads, by_hand, torch.autograd.grad(by_hand, cast, grad_out), grad_out


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_gradient_is_the_gradient_of_the_forward(backend):
    """Under torch.autocast the op casts hidden, weight and bias to bfloat16 once; forward and
    backward then compute from those operands: exactly what the op gives for operands cast by
    hand, with the gradients arriving at the float32 leaves in float32, and close to float64
    autograd of that function. (The backward once recomputed the logits in float32 against a
    forward computed in bfloat16.)"""
    h, w, b, targets = make_inputs((24,), 500, 2, torch.float32, bias=True)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    out, grads, by_hand, hand_grads, grad_out = _autocast_and_cast_by_hand(
        backend, leaves, targets, temperature=0.8)
    assert out.dtype == torch.float32 and torch.equal(out, by_hand)
    cast = [x.to(torch.bfloat16) for x in (h, w, b)]
    expected = reference_grads(*cast, targets, grad_out, temperature=0.8)
    for name, got, hand, want in zip(("hidden", "weight", "bias"), grads, hand_grads, expected):
        assert got.dtype == torch.float32, name
        assert torch.equal(got, hand.float()), name
        assert_close_scaled(got, want, GRAD_TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden_dtype, head_dtype", [
    (torch.float16, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_autocast_takes_any_mix_of_dtypes(backend, hidden_dtype, head_dtype):
    """A direct call under torch.autocast casts hidden, weight and bias to the autocast dtype
    before checking them (TRL's test_train_model_dtype: float32 hidden states and a float16 head
    under bfloat16 autocast raised "weight must have the dtype of hidden")."""
    h, w, b, targets = make_inputs((7,), 300, 2, torch.float32, bias=True)
    h, w, b = h.to(hidden_dtype), w.to(head_dtype), b.to(head_dtype)
    with alignkern.use_backend(backend), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = alignkern.linear_logprobs(h, w, targets, bias=b, temperature=0.9)
    cast = [x.to(torch.bfloat16) for x in (h, w, b)]
    with alignkern.use_backend(backend):
        assert torch.equal(out, alignkern.linear_logprobs(*cast[:2], targets, bias=cast[2],
                                                          temperature=0.9))


def test_autocast_under_torch_compile():
    torch._dynamo.reset()
    h, w, _, targets = make_inputs((8,), 200, 2, torch.float32)
    leaves = [x.clone().requires_grad_(True) for x in (h, w)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def scores(hh, ww):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return alignkern.linear_logprobs(hh, ww, targets)

    out = scores(*leaves)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    cast = [x.detach().to(torch.bfloat16).requires_grad_(True) for x in leaves]
    by_hand = alignkern.linear_logprobs(*cast, targets)
    assert torch.equal(out, by_hand)
    for got, hand in zip(grads, torch.autograd.grad(by_hand, cast, grad_out)):
        assert torch.equal(got, hand.float())


# ----------------------------------------------------------------------------- a lower-precision head


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden_dtype, head_dtype", [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.float64, torch.float32), (torch.float64, torch.bfloat16)])
@pytest.mark.parametrize("stats", [None, ("entropy",)])
def test_a_head_of_lower_precision_than_the_hidden_states(backend, hidden_dtype, head_dtype,
                                                          stats):
    """TRL's cast_lm_head_to_fp32 on a bf16 model: float32 hidden states and a bf16 head (and
    bias). The kernels convert each tile (the head is never copied); the result is float64
    log_softmax of the same values at the hidden states' precision, and each gradient comes back
    in its input's dtype."""
    if backend == "cuda" and hidden_dtype == torch.float64:
        pytest.skip("the cuda backend takes no float64")
    h, w, b, targets = make_inputs((3, 7), 1029, 2, hidden_dtype, bias=True)
    w, b = w.to(head_dtype), b.to(head_dtype)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    kw = dict(temperature=0.8, softcap=6.0)
    with alignkern.use_backend(backend):
        result = alignkern.linear_logprobs(*leaves[:2], targets, bias=leaves[2], stats=stats,
                                           return_lse=True, **kw)
    out = result.logprobs
    want, want_lse = reference_fp64(h, w, targets, b, **kw)
    tol = 1e-10 if hidden_dtype == torch.float64 else 5e-5
    torch.testing.assert_close(out.double().cpu(), want.cpu(), rtol=tol, atol=tol)
    torch.testing.assert_close(result.lse.double().cpu(), want_lse.cpu(), rtol=tol, atol=tol)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    for got, leaf, want_grad in zip(grads, leaves, reference_grads(h, w, b, targets, grad_out,
                                                                   **kw)):
        assert got.dtype == leaf.dtype
        assert_close_scaled(got, want_grad, GRAD_TOL[leaf.dtype] if leaf.dtype != hidden_dtype
                            else GRAD_TOL[hidden_dtype])


@pytest.mark.parametrize("hidden_dtype, head_dtype", [
    (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16),
    (torch.float32, torch.float64)])
def test_a_head_of_higher_or_other_precision_is_refused(hidden_dtype, head_dtype):
    h, w, _, targets = make_inputs((3,), 50, None, torch.float32)
    with pytest.raises(TypeError, match=r"^linear_logprobs: weight must have the dtype of hidden "
                                        r"or a lower precision that it holds exactly"):
        alignkern.linear_logprobs(h.to(hidden_dtype), w.to(head_dtype), targets)


# ----------------------------------------------------------------------------- memory


def test_cpu_memory_stays_a_fraction_of_the_logits():
    """N = 2048, H = 64, V = 131072: float32 logits would take 1 GiB. Forward must stay under 1/8
    of that; forward+backward under 1/8 beyond the gradients themselves (dweight is 32 MiB)."""
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend unavailable")
    n, hidden, vocab = 2048, 64, 131072
    h = torch.randn(n, hidden)
    w = torch.randn(vocab, hidden) / 8
    targets = torch.randint(0, vocab, (n, 2))
    logits_bytes = n * vocab * 4
    forward = measure.peak_memory_bytes(lambda: run("cpu", h, w, targets), torch.device("cpu"))
    assert forward < logits_bytes / 8, f"forward allocated {forward / 2**20:.1f} MiB"

    x, y = h.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def forward_backward():
        out = run("cpu", x, y, targets)
        torch.autograd.grad(out, (x, y), torch.randn_like(out))

    both = measure.peak_memory_bytes(forward_backward, torch.device("cpu"))
    grads = (n + vocab) * hidden * 4
    assert both < grads + logits_bytes / 8, f"fwd+bwd allocated {both / 2**20:.1f} MiB"
    eager = measure.peak_memory_bytes(
        lambda: torch.log_softmax(h @ w.T, -1).gather(-1, targets), torch.device("cpu")
    )
    assert eager > logits_bytes, "the measurement must see the eager composition's logits"


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [32000, 128256, 151936])
def test_gpu_llm_shapes(backend, dtype, vocab):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} backend unavailable")
    h, w, b, targets = make_inputs((300,), vocab, 4, dtype, hidden=1024, bias=True)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    out = run(backend, leaves[0], leaves[1], targets, bias=leaves[2], softcap=30.0)
    expected = reference_fp64(h, w, targets, b, softcap=30.0)[0]
    torch.testing.assert_close(out.double(), expected, rtol=2e-4, atol=2e-4)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    for got, want in zip(grads, reference_grads(h, w, b, targets, grad_out, softcap=30.0)):
        assert_close_scaled(got, want, GRAD_TOL[dtype])
