"""reward_attention and segment_bias on every backend against alignkern.reference in float64, and
the in-context alignment theorem it implements."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import DEVICE, available_backends

import alignkern
from alignkern import reference
from alignkern.bench import measure

BACKENDS = available_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative to the largest entry of the float64 reference; outputs and gradients come back in the
# inputs' dtype, so the tolerance is that dtype's rounding (a little more for fp16/bf16 matmuls).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_inputs(batch=2, heads_q=4, heads_kv=2, len_q=17, len_k=33, head_dim=32, *,
                dtype=torch.float32, bias=None, ranks=False, blind_row=False, device=DEVICE):
    """q, k, v (never zeros), a key bias (None / "shared" / "head"), ranks with ties, and
    optionally a query that outranks no key (it sees nothing)."""
    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(dtype).to(device)

    q = rand(batch, heads_q, len_q, head_dim)
    k = rand(batch, heads_kv, len_k, head_dim)
    v = rand(batch, heads_kv, len_k, head_dim)
    key_bias = {None: None, "shared": lambda: rand(batch, len_k),
                "head": lambda: rand(batch, heads_q, len_k)}[bias]
    key_bias = key_bias() if callable(key_bias) else None
    key_rank = query_rank = None
    if ranks:
        key_rank = torch.randint(0, 4, (batch, len_k), device=device).float()
        query_rank = torch.randint(0, 4, (batch, len_q), device=device).float()
        if blind_row:
            query_rank[0, 0] = -1.0
    return q, k, v, key_bias, key_rank, query_rank


def run(backend, q, k, v, key_bias=None, key_rank=None, query_rank=None, **kw):
    with alignkern.use_backend(backend):
        return alignkern.reward_attention(q, k, v, key_bias=key_bias, key_rank=key_rank,
                                          query_rank=query_rank, **kw)


def reference_fp64(q, k, v, key_bias=None, key_rank=None, query_rank=None, **kw):
    return reference.reward_attention(q.double(), k.double(), v.double(),
                                      None if key_bias is None else key_bias.double(), key_rank,
                                      query_rank, **kw)


def reference_grads(inputs, grad_out, grad_lse=None, **kw):
    q, k, v, key_bias, key_rank, query_rank = inputs
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    bias = None if key_bias is None else key_bias.detach().double().requires_grad_(True)
    out, lse = reference.reward_attention(*leaves, bias, key_rank, query_rank, **kw)
    loss = (out * grad_out.double()).sum()
    if grad_lse is not None:
        loss = loss + (lse.masked_fill(lse.isinf(), 0.0) * grad_lse.double()).sum()
    return torch.autograd.grad(loss, leaves + ([bias] if bias is not None else []))


def assert_close_scaled(actual, expected, rel, name=""):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, name
    assert not actual.isnan().any(), f"{name}: NaN"
    scale = expected.abs().max().clamp(min=1e-30)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel:.1g} * {scale:.3g}"


def check_forward_and_backward(backend, inputs, dtype, **kw):
    q, k, v, key_bias, key_rank, query_rank = inputs
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    bias = None if key_bias is None else key_bias.clone().requires_grad_(True)
    out, lse = run(backend, *leaves, bias, key_rank, query_rank, return_lse=True, **kw)
    ref_out, ref_lse = reference_fp64(*inputs, **kw)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == lse_dtype
    assert_close_scaled(out, ref_out, TOL[dtype], "out")
    assert torch.equal(lse.isneginf().cpu(), ref_lse.isneginf().cpu())
    finite = ref_lse.isfinite()
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse.masked_fill(lse.isinf(), 0.0)),
                                leaves + ([bias] if bias is not None else []), (grad_out, grad_lse))
    expected = reference_grads(inputs, grad_out, grad_lse, **kw)
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads, expected):
        assert got.dtype == dtype, name
        assert_close_scaled(got, want, TOL[dtype], name)


# ----------------------------------------------------------------------------- correctness


COMBINATIONS = list(itertools.product([None, "shared", "head"], [False, True], [False, True]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias,ranks,causal", COMBINATIONS)
@pytest.mark.parametrize("lengths", [(17, 33), (33, 17)])
def test_every_bias_mask_and_length_combination(backend, bias, ranks, causal, lengths):
    inputs = make_inputs(len_q=lengths[0], len_k=lengths[1], bias=bias, ranks=ranks,
                         blind_row=ranks)
    check_forward_and_backward(backend, inputs, torch.float32, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_dtypes_and_head_dims(backend, dtype, head_dim):
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the cuda backend refuses float64")
    inputs = make_inputs(batch=1, heads_q=2, heads_kv=1, len_q=33, len_k=33, head_dim=head_dim,
                         dtype=dtype, bias="shared", ranks=True)
    check_forward_and_backward(backend, inputs, dtype, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, 17, 130])
def test_odd_lengths(backend, length):
    inputs = make_inputs(batch=1, heads_q=2, heads_kv=2, len_q=length, len_k=length, head_dim=16,
                         bias="head", ranks=True)
    check_forward_and_backward(backend, inputs, torch.float32, causal=True)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])
def test_float64_and_gradcheck(backend):
    inputs = make_inputs(batch=1, heads_q=2, heads_kv=1, len_q=5, len_k=6, head_dim=3,
                         dtype=torch.float64, bias="shared", ranks=True, blind_row=True)
    check_forward_and_backward(backend, inputs, torch.float64, causal=True, scale=0.7)
    q, k, v, key_bias, key_rank, query_rank = inputs
    leaves = tuple(x.clone().requires_grad_(True) for x in (q, k, v, key_bias))
    with alignkern.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *xs: alignkern.reward_attention(*xs[:3], key_bias=xs[3], key_rank=key_rank,
                                                   query_rank=query_rank, causal=True, scale=0.7),
            leaves,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_see_no_key_are_zero_not_nan(backend):
    q, k, v, _, key_rank, query_rank = make_inputs(ranks=True)
    query_rank[:, :5] = -10.0  # below every key
    x = q.clone().requires_grad_(True)
    out, lse = run(backend, x, k, v, None, key_rank, query_rank, return_lse=True)
    assert (out[:, :, :5] == 0).all() and lse[:, :, :5].isneginf().all()
    assert not out.isnan().any()
    (grad,) = torch.autograd.grad(out, x, torch.randn_like(out))
    assert (grad[:, :, :5] == 0).all() and not grad.isnan().any()
    empty_keys = run(backend, q, k[:, :, :0], v[:, :, :0], causal=False)
    assert (empty_keys == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gradient_is_bit_identical_across_runs(backend):
    inputs = make_inputs(len_q=65, len_k=70, bias="shared", ranks=True)
    q, k, v, key_bias, key_rank, query_rank = inputs
    grad_out = torch.randn_like(q)

    def bias_grad():
        bias = key_bias.clone().requires_grad_(True)
        out = run(backend, q, k, v, bias, key_rank, query_rank, causal=True)
        return torch.autograd.grad(out, bias, grad_out)[0]

    assert torch.equal(bias_grad(), bias_grad())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_default_scale(backend):
    q, k, v, *_ = make_inputs(batch=0)
    assert run(backend, q, k, v).shape == q.shape
    q, k, v, *_ = make_inputs(batch=1)
    explicit = run(backend, q, k, v, scale=32 ** -0.5)
    torch.testing.assert_close(run(backend, q, k, v), explicit)


# ----------------------------------------------------------------------------- the theory


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_performs_the_plackett_luce_gradient_step(backend):
    """Wang et al. 2024: with q = y_hat repeated, k = v = Y, key_bias = -|y_j|^2, scale 2 and the
    reward-ordering mask, output row i is the Plackett-Luce suffix average y_bar_i (the average of
    the candidates ranked at or below i, weighted by softmax of s_j = -|y_hat - y_j|^2), and
    -2 sum_i (y_i - y_bar_i) is the gradient of the Plackett-Luce loss with respect to y_hat."""
    torch.manual_seed(3)
    n, dim = 6, 8
    y_hat = torch.randn(dim, dtype=torch.float64)
    candidates = torch.randn(n, dim, dtype=torch.float64)
    rewards = torch.randperm(n).double()  # distinct
    q = y_hat.expand(1, 1, n, dim).contiguous()
    kv = candidates[None, None]
    out = run(backend, q.float(), kv.float(), kv.float(), key_bias=-(candidates**2).sum(-1)[None].float(),
              key_rank=rewards[None], query_rank=rewards[None], scale=2.0)[0, 0].double()

    y = y_hat.clone().requires_grad_(True)
    scores = -((y - candidates) ** 2).sum(-1)
    order = torch.argsort(rewards, descending=True)
    ranked = scores[order]
    suffix_lse = torch.logcumsumexp(ranked.flip(0), 0).flip(0)
    loss = (suffix_lse - ranked).sum()
    (grad,) = torch.autograd.grad(loss, y)

    for i in range(n):  # the suffix average by brute force
        below = rewards <= rewards[i]
        weights = torch.softmax(scores.detach()[below], 0)
        torch.testing.assert_close(out[i], weights @ candidates[below], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(-2 * (candidates - out).sum(0), grad, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- segment_bias


def test_segment_bias():
    rewards = torch.tensor([[0.5, -1.0, 2.0]], requires_grad=True)
    segments = torch.tensor([[-1, -1, 0, 0, 1, 2, 2]])
    bias = alignkern.segment_bias(rewards, segments, beta=3.0)
    torch.testing.assert_close(bias, torch.tensor([[0.0, 0.0, 1.5, 1.5, -3.0, 6.0, 6.0]]))
    (grad,) = torch.autograd.grad(bias, rewards, torch.arange(7.0)[None])
    torch.testing.assert_close(grad, torch.tensor([[3.0 * (2 + 3), 3.0 * 4, 3.0 * (5 + 6)]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_bias_feeds_reward_attention(backend):
    """One line biases each in-context example by its reward; gradients reach the rewards."""
    q, k, v, *_ = make_inputs(batch=1, len_q=9, len_k=9)
    rewards = torch.tensor([[0.3, 1.2]], device=DEVICE, requires_grad=True)
    segments = torch.tensor([[-1, -1, -1, 0, 0, 0, 1, 1, 1]], device=DEVICE)
    out = run(backend, q, k, v, alignkern.segment_bias(rewards, segments, beta=2.0), causal=True)
    (grad,) = torch.autograd.grad(out, rewards, torch.ones_like(out))
    rd = rewards.detach().double().requires_grad_(True)
    ref = reference_fp64(q, k, v, reference.segment_bias(rd, segments, 2.0), causal=True)[0]
    (want,) = torch.autograd.grad(ref, rd, torch.ones_like(ref))
    assert_close_scaled(grad, want, 1e-4)


def test_segment_bias_errors():
    with pytest.raises(ValueError, match=r"rewards must be a \(B, S\) floating-point tensor"):
        alignkern.segment_bias(torch.zeros(3), torch.zeros(1, 3).long())
    with pytest.raises(ValueError, match=r"segment_ids must be a \(B, L\) int32/int64 tensor"):
        alignkern.segment_bias(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(IndexError, match="segment_ids must be < S = 3.*got 3"):
        alignkern.segment_bias(torch.zeros(1, 3), torch.tensor([[0, 3]]))


# ----------------------------------------------------------------------------- torch integration


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, k, v, key_bias, key_rank, query_rank = make_inputs(batch=1, len_q=9, len_k=11, head_dim=16,
                                                          bias="shared", ranks=True)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, key_bias)]
    torch.library.opcheck(torch.ops.alignkern.reward_attention.default,
                          (*leaves, key_rank, query_rank, True, 0.25, backend))
    torch.library.opcheck(torch.ops.alignkern.reward_attention.default,
                          (q, k, v, None, None, None, False, 0.25, backend))
    out, lse = torch.ops.alignkern.reward_attention(q, k, v, key_bias, key_rank, query_rank, True,
                                                    0.25, backend)
    for need_bias in (True, False):
        torch.library.opcheck(
            torch.ops.alignkern.reward_attention_backward.default,
            (torch.randn_like(out), torch.randn_like(lse), q, k, v, key_bias, key_rank, query_rank,
             out, lse, True, 0.25, need_bias, backend),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_with_backward(backend):
    torch._dynamo.reset()
    inputs = make_inputs(batch=1, len_q=9, len_k=9, head_dim=16, bias="head", ranks=True)
    q, k, v, key_bias, key_rank, query_rank = inputs

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(q, k, v, bias):
        out = alignkern.reward_attention(q, k, v, key_bias=bias, key_rank=key_rank,
                                         query_rank=query_rank, causal=True)
        return (out * 3.0).sum()

    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, key_bias)]
    with alignkern.use_backend(backend):
        loss_fn(*leaves).backward()
    expected = reference_grads(inputs, torch.full(q.shape, 3.0), causal=True)
    for leaf, want in zip(leaves, expected):
        assert_close_scaled(leaf.grad, want, TOL[torch.float32])


def test_torch_compile_inductor():
    torch._dynamo.reset()
    q, k, v, key_bias, *_ = make_inputs(batch=1, len_q=9, len_k=9, head_dim=16, bias="shared")

    @torch.compile(fullgraph=True)
    def attend(q, k, v, bias):
        return alignkern.reward_attention(q * 0.5, k, v, key_bias=bias).exp()

    expected = reference_fp64(q * 0.5, k, v, key_bias)[0].exp()
    assert_close_scaled(attend(q, k, v, key_bias), expected, 1e-5)


# ----------------------------------------------------------------------------- errors


def _qkv(b=1, hq=4, hkv=2, lq=5, lk=6, d=8):
    return torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, d)


def test_error_head_dims_or_batch_disagree():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="head dims differ: q has D = 8, k and v have D = 4"):
        alignkern.reward_attention(q, k[..., :4], v[..., :4])
    with pytest.raises(ValueError, match=r"batch sizes differ: q has B = 1.*k has B = 2"):
        alignkern.reward_attention(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        alignkern.reward_attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match=r"q must be 4-D \(B, H, L, D\), got shape \(4, 5, 8\)"):
        alignkern.reward_attention(q[0], k, v)


def test_error_heads_not_a_multiple():
    q, k, v = _qkv(hq=3, hkv=2)
    with pytest.raises(ValueError, match="Hq = 3 must be a multiple of the key/value heads Hkv = 2"):
        alignkern.reward_attention(q, k, v)


def test_error_ranks():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="key_rank and query_rank go together: got only key_rank"):
        alignkern.reward_attention(q, k, v, key_rank=torch.zeros(1, 6))
    with pytest.raises(ValueError, match=r"key_rank must have shape \(B, L\) = \(1, 6\), got \(1, 5\)"):
        alignkern.reward_attention(q, k, v, key_rank=torch.zeros(1, 5), query_rank=torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"query_rank must have shape \(B, L\) = \(1, 5\), got \(1, 6\)"):
        alignkern.reward_attention(q, k, v, key_rank=torch.zeros(1, 6), query_rank=torch.zeros(1, 6))
    with pytest.raises(TypeError, match="key_rank must be a real-valued tensor, got torch.bool"):
        alignkern.reward_attention(q, k, v, key_rank=torch.zeros(1, 6, dtype=torch.bool),
                                   query_rank=torch.zeros(1, 5))


def test_error_bias_shape_and_dtypes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"key_bias must have shape \(B, Lk\) = \(1, 6\) or "
                                         r"\(B, Hq, Lk\) = \(1, 4, 6\), got \(1, 2, 6\)"):
        alignkern.reward_attention(q, k, v, key_bias=torch.zeros(1, 2, 6))
    with pytest.raises(TypeError, match="key_bias must be a floating-point tensor, got torch.int64"):
        alignkern.reward_attention(q, k, v, key_bias=torch.zeros(1, 6).long())
    with pytest.raises(TypeError, match=r"k must have q's dtype \(torch.float32\), got torch.float16"):
        alignkern.reward_attention(q, k.half(), v)
    with pytest.raises(TypeError, match="q must be float32, float16, bfloat16 or float64"):
        alignkern.reward_attention(q.long(), k.long(), v.long())


def test_error_mixed_devices_and_scale():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="same device.*q on cpu.*k on meta"):
        alignkern.reward_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="scale must be finite, got inf"):
        alignkern.reward_attention(q, k, v, scale=float("inf"))


def test_error_cuda_backend_unavailable_on_cpu_tensors():
    with alignkern.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        alignkern.reward_attention(*_qkv())


# ----------------------------------------------------------------------------- memory


def test_cpu_never_allocates_the_score_matrix():
    """4096 x 4096 with 8 heads: the fp32 scores would take 512 MiB; forward and backward must
    stay far below that (their outputs and gradients are 8 MiB each)."""
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend unavailable")
    q, k, v, key_bias, key_rank, query_rank = make_inputs(
        batch=1, heads_q=8, heads_kv=8, len_q=4096, len_k=4096, head_dim=64, bias="shared",
        ranks=True, device=torch.device("cpu"))
    scores_bytes = 8 * 4096 * 4096 * 4
    forward = measure.peak_memory_bytes(
        lambda: run("cpu", q, k, v, key_bias, key_rank, query_rank, causal=True),
        torch.device("cpu"))
    assert forward < scores_bytes / 16, f"forward allocated {forward / 2**20:.1f} MiB"
    out, lse = torch.ops.alignkern.reward_attention(q, k, v, key_bias, key_rank, query_rank, True,
                                                    0.125, "cpu")
    grad_out = torch.randn_like(out)
    backward = measure.peak_memory_bytes(
        lambda: torch.ops.alignkern.reward_attention_backward(
            grad_out, None, q, k, v, key_bias, key_rank, query_rank, out, lse, True, 0.125, True,
            "cpu"),
        torch.device("cpu"))
    assert backward < scores_bytes / 8, f"backward allocated {backward / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_long_sequences(backend, dtype, head_dim, causal):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} backend unavailable")
    inputs = make_inputs(batch=2, heads_q=8, heads_kv=2, len_q=1000, len_k=1030,
                         head_dim=head_dim, dtype=dtype, bias="head", ranks=True, blind_row=True)
    check_forward_and_backward(backend, inputs, dtype, causal=causal)
