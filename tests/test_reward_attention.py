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
@pytest.mark.parametrize("bias", ["shared", "head"])
@pytest.mark.parametrize("len_q,len_k", [(0, 6), (5, 0), (0, 0)])
def test_empty_queries_or_keys_with_ranks(backend, bias, len_q, len_k):
    """Lq = 0 or Lk = 0 with ranks (the cpu backend refused them: an empty rank tensor has no
    address, so it looked like a missing one): an empty output, or with no key out = 0 and
    lse = -inf; gradients of the inputs' shapes, 0 where there is nothing to differentiate,
    equal to the reference's."""
    inputs = make_inputs(batch=2, len_q=len_q, len_k=len_k, head_dim=8, bias=bias, ranks=True)
    q, k, v, key_bias, key_rank, query_rank = inputs
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, key_bias)]
    out, lse = run(backend, *leaves[:3], leaves[3], key_rank, query_rank, return_lse=True)
    ref_out, ref_lse = reference_fp64(*inputs)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert torch.equal(out.double(), ref_out) and (out == 0).all()
    assert torch.equal(lse.double(), ref_lse) and lse.isneginf().all()
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    expected = reference_grads(inputs, grad_out)
    for name, got, want, leaf in zip(("dq", "dk", "dv", "dbias"), grads, expected, leaves):
        assert got.shape == leaf.shape and got.dtype == leaf.dtype, name
        assert torch.equal(got.double(), want) and (got == 0).all(), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_ranks_compare_as_integers(backend):
    """2**53 and 2**53 + 1 are one float64, but as ranks key 2**53 + 1 is hidden from query 2**53;
    the int64 extremes are ranks too. Every backend must agree with the reference, which compares
    the integers directly."""
    base = 2**53
    inputs = list(make_inputs(batch=2, len_q=9, len_k=11, head_dim=16, bias="shared"))
    key_rank = base + torch.randint(0, 4, (2, 11), device=DEVICE)
    query_rank = base + torch.randint(-1, 4, (2, 9), device=DEVICE)
    key_rank[0, :2] = torch.tensor([base, base + 1])
    query_rank[0, 0] = base
    key_rank[1, :2] = torch.tensor([-(2**63), 2**63 - 1])
    query_rank[1, 0] = 2**63 - 1
    inputs[4:] = key_rank, query_rank
    visible = reference.visible_keys(9, 11, key_rank, query_rank)
    assert not visible[0, 0, 0, 1] and visible[0, 0, 0, 0]  # the case float64 gets wrong
    check_forward_and_backward(backend, inputs, torch.float32, causal=False)


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


def test_segment_bias_with_no_examples():
    """S = 0: only prompt tokens (every id negative); the bias is all zeros, still differentiable."""
    rewards = torch.zeros(2, 0, requires_grad=True)
    bias = alignkern.segment_bias(rewards, torch.full((2, 5), -1), beta=2.0)
    assert bias.shape == (2, 5) and bias.dtype == rewards.dtype and (bias == 0).all()
    (grad,) = torch.autograd.grad(bias, rewards, torch.ones_like(bias))
    assert grad.shape == (2, 0)


def test_segment_bias_refuses_lists():
    with pytest.raises(TypeError, match="segment_bias: rewards must be a torch.Tensor, got list"):
        alignkern.segment_bias([[0.5, 1.0]], torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="segment_bias: segment_ids must be a torch.Tensor, got "
                                        "list"):
        alignkern.segment_bias(torch.tensor([[0.5, 1.0]]), [[0, 1]])


def test_segment_bias_errors():
    with pytest.raises(ValueError, match=r"rewards must be a \(B, S\) floating-point tensor"):
        alignkern.segment_bias(torch.zeros(3), torch.zeros(1, 3).long())
    with pytest.raises(ValueError, match=r"segment_ids must be a \(B, L\) int32/int64 tensor"):
        alignkern.segment_bias(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(IndexError, match="segment_ids must be < S = 3.*got 3"):
        alignkern.segment_bias(torch.zeros(1, 3), torch.tensor([[0, 3]]))


@pytest.mark.parametrize("beta, error, received", [
    ("2", TypeError, "got str '2'"),
    (True, TypeError, "got bool True"),
    (None, TypeError, "got None"),
    (torch.tensor(2.0), TypeError, r"got a torch.float32 tensor of shape \(\)"),
    (float("nan"), ValueError, "got nan"),
    (float("inf"), ValueError, "got inf"),
    (-float("inf"), ValueError, "got -inf"),
    (10**400, ValueError, r"within float's range .*got int 1000"),
], ids=["str", "bool", "None", "tensor", "nan", "inf", "-inf", "huge int"])
def test_segment_bias_beta_must_be_a_finite_real_number(beta, error, received):
    """A string used to reach the gather as an index (an indexing error), NaN and inf were
    accepted and gave a NaN or infinite bias."""
    with pytest.raises(error, match=rf"^segment_bias: beta must be .*{received}"):
        alignkern.segment_bias(torch.tensor([[0.5, 1.0]]), torch.tensor([[-1, 0, 1]]), beta=beta)


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


@pytest.mark.parametrize("backend", available_backends(torch.device("cpu")))
@pytest.mark.parametrize("compiled", [False, True])
def test_autocast_casts_q_k_v_and_differentiates_what_it_computed(backend, compiled):
    """Under CPU autocast to bfloat16, q, k and v are cast at the op's boundary (key_bias and the
    ranks are not): the output is bfloat16, and the gradients are those of the float64 reference
    evaluated on the bfloat16 q, k, v and the float32 key_bias, rounded to bfloat16 for q, k, v
    (their gradients pass through bfloat16) and to float32 for key_bias.

    Tolerance: 2 bfloat16 ulps of each entry. The kernels (not the reference backend) also take
    ``delta = rowsum(dO * O)`` from the bfloat16 output they saved, as FlashAttention does; that
    adds up to about 2 bfloat16 ulps of the largest entry (measured: 1.2)."""
    torch._dynamo.reset()
    cpu = torch.device("cpu")
    inputs = make_inputs(batch=1, len_q=9, len_k=11, head_dim=16, bias="shared", ranks=True,
                         device=cpu)
    q, k, v, key_bias, key_rank, query_rank = inputs

    def attend(q, k, v, bias):
        return alignkern.reward_attention(q, k, v, key_bias=bias, key_rank=key_rank,
                                          query_rank=query_rank, causal=True)

    attend_maybe_compiled = torch.compile(attend, fullgraph=True, backend="aot_eager") \
        if compiled else attend
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, key_bias)]
    with alignkern.use_backend(backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attend_maybe_compiled(*leaves)
        assert out.dtype == torch.bfloat16
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, grad_out)
        # Exactly what the op gives for q, k, v cast to bfloat16 by hand, outside autocast.
        by_hand = [x.detach().to(torch.bfloat16).requires_grad_(True) for x in (q, k, v)]
        by_hand.append(key_bias.clone().requires_grad_(True))
        hand_out = attend(*by_hand)
        hand_grads = torch.autograd.grad(hand_out, by_hand, grad_out)
    assert torch.equal(out, hand_out)
    for got, hand in zip(grads, hand_grads):
        assert torch.equal(got, hand.to(got.dtype))
    cast = [x.to(torch.bfloat16) for x in (q, k, v)]
    expected = reference_grads((*cast, key_bias, key_rank, query_rank), grad_out, causal=True)
    for name, leaf, got, want in zip(("dq", "dk", "dv", "dbias"), leaves, grads, expected):
        assert got.dtype == leaf.dtype, name
        rounded = want.to(torch.bfloat16 if name != "dbias" else torch.float32).double()
        atol = (1e-5 if backend == "reference" else 2**-6) * float(want.abs().max())
        torch.testing.assert_close(got.double(), rounded, rtol=2**-7, atol=atol, msg=name)


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
    with pytest.raises(ValueError, match="scale must be a finite number, got inf"):
        alignkern.reward_attention(q, k, v, scale=float("inf"))


def test_error_cuda_backend_unavailable_on_cpu_tensors():
    with alignkern.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        alignkern.reward_attention(*_qkv())


def test_error_empty_head_dim():
    """D = 0 is refused before the default scale D ** -0.5 is computed."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"reward_attention: head dim D must be in \[1, 256\], "
                                         "got 0"):
        alignkern.reward_attention(q[..., :0], k[..., :0], v[..., :0])


def test_error_scalars_and_arguments_of_the_wrong_type():
    """A string is not a bool ("no" is truthy) nor a scale; a list is not a tensor."""
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="reward_attention: causal must be True or False, got str "
                                        "'no'"):
        alignkern.reward_attention(q, k, v, causal="no")
    with pytest.raises(TypeError, match="reward_attention: scale must be a real number, got str "
                                        "'0.5'"):
        alignkern.reward_attention(q, k, v, scale="0.5")
    with pytest.raises(TypeError, match="reward_attention: key_bias must be a torch.Tensor, got "
                                        "list"):
        alignkern.reward_attention(q, k, v, key_bias=[[0.0] * 6])


@pytest.mark.parametrize("value", ["yes", None, torch.ones(2)], ids=["str", "None", "tensor"])
def test_error_return_lse_must_be_a_bool(value):
    """It was only tested for truth: "yes" returned a tuple, a tensor gave torch's "Boolean value
    of Tensor with more than one value is ambiguous"."""
    with pytest.raises(TypeError, match=r"^reward_attention: return_lse must be True or False, "
                                        r"got (str 'yes'|None|a torch.float32 tensor)"):
        alignkern.reward_attention(*_qkv(), return_lse=value)


def test_error_scale_beyond_float_range():
    """An integer too large for a float was a bare OverflowError from float()."""
    with pytest.raises(ValueError, match=r"^reward_attention: scale must be within float's range "
                                         r".*got int 1000"):
        alignkern.reward_attention(*_qkv(), scale=10**400)


# The registered ops validate every argument themselves: a direct caller (a compiled graph, another
# library) must never reach a kernel with inconsistent sizes. Arguments: B = 1, Hq = 4, Hkv = 2,
# Lq = 5, Lk = 6, D = 8. Each case: the arguments it replaces, the error, and the message after
# "<op>: ".
_OP_ERRORS = {
    "q 3-D": (lambda a: dict(q=a["q"][0]), ValueError,
              r"q must be 4-D \(B, H, L, D\), got shape \(4, 5, 8\)"),
    "q head dim": (lambda a: dict(q=a["q"][..., :4]), ValueError,
                   "head dims differ: q has D = 4, k and v have D = 8"),
    "k head dim": (lambda a: dict(k=a["k"][..., :4]), ValueError,
                   r"k and v must have the same shape, got k \(1, 2, 6, 4\) and v \(1, 2, 6, 8\)"),
    "k, v head dim": (lambda a: dict(k=a["k"][..., :4], v=a["v"][..., :4]), ValueError,
                      "head dims differ: q has D = 8, k and v have D = 4"),
    "v length": (lambda a: dict(v=a["v"][:, :, :3]), ValueError,
                 "k and v must have the same shape"),
    "k, v heads": (lambda a: dict(k=a["k"][:, :0], v=a["v"][:, :0]), ValueError,
                   "the query heads Hq = 4 must be a multiple of the key/value heads Hkv = 0"),
    "zero head dim": (lambda a: dict(q=a["q"][..., :0], k=a["k"][..., :0], v=a["v"][..., :0]),
                      ValueError, r"head dim D must be in \[1, 256\], got 0"),
    "key_bias shape": (lambda a: dict(key_bias=torch.zeros(1, 2, 6)), ValueError,
                       r"key_bias must have shape \(B, Lk\) = \(1, 6\) or \(B, Hq, Lk\) = "
                       r"\(1, 4, 6\), got \(1, 2, 6\)"),
    "key_rank shape": (lambda a: dict(key_rank=torch.zeros(1, 5)), ValueError,
                       r"key_rank must have shape \(B, L\) = \(1, 6\), got \(1, 5\)"),
    "query_rank shape": (lambda a: dict(query_rank=torch.zeros(1, 6)), ValueError,
                         r"query_rank must have shape \(B, L\) = \(1, 5\), got \(1, 6\)"),
    "only key_rank": (lambda a: dict(query_rank=None), ValueError,
                      "key_rank and query_rank go together: got only key_rank"),
    "grad_out shape": (lambda a: dict(grad_out=a["grad_out"][..., :4]), ValueError,
                       r"grad_out must have shape \(1, 4, 5, 8\).*got \(1, 4, 5, 4\)"),
    "out shape": (lambda a: dict(out=a["out"][:, :, :4]), ValueError,
                  r"out must have shape \(1, 4, 5, 8\).*got \(1, 4, 4, 8\)"),
    "lse shape": (lambda a: dict(lse=torch.zeros(1, 4, 6)), ValueError,
                  r"lse must have shape \(1, 4, 5\).*got \(1, 4, 6\)"),
    "grad_lse shape": (lambda a: dict(grad_lse=torch.zeros(1, 4)), ValueError,
                       r"grad_lse must have shape \(1, 4, 5\).*got \(1, 4\)"),
    "q dtype": (lambda a: dict(q=a["q"].long()), TypeError,
                "q must be float32, float16, bfloat16 or float64, got torch.int64"),
    "k dtype": (lambda a: dict(k=a["k"].half()), TypeError,
                r"k must have q's dtype \(torch.float32\), got torch.float16"),
    "v dtype": (lambda a: dict(v=a["v"].double()), TypeError,
                r"v must have q's dtype \(torch.float32\), got torch.float64"),
    "key_bias dtype": (lambda a: dict(key_bias=torch.zeros(1, 6, dtype=torch.int32)), TypeError,
                       "key_bias must be a floating-point tensor, got torch.int32"),
    "key_rank dtype": (lambda a: dict(key_rank=torch.zeros(1, 6, dtype=torch.bool)), TypeError,
                       "key_rank must be a real-valued tensor, got torch.bool"),
    "query_rank dtype": (lambda a: dict(query_rank=torch.zeros(1, 5, dtype=torch.complex64)),
                         TypeError, "query_rank must be a real-valued tensor, got torch.complex64"),
    "grad_out dtype": (lambda a: dict(grad_out=a["grad_out"].long()), TypeError,
                       "grad_out must be a real floating-point tensor, got torch.int64"),
    "out dtype": (lambda a: dict(out=a["out"].int()), TypeError,
                  "out must be a real floating-point tensor, got torch.int32"),
    "lse dtype": (lambda a: dict(lse=a["lse"].long()), TypeError,
                  "lse must be a real floating-point tensor, got torch.int64"),
    "grad_lse dtype": (lambda a: dict(grad_lse=a["grad_lse"].to(torch.complex64)), TypeError,
                       "grad_lse must be a real floating-point tensor, got torch.complex64"),
    "scale": (lambda a: dict(scale=float("nan")), ValueError, "scale must be a finite number, got nan"),
    "backend": (lambda a: dict(backend="bogus"), ValueError,
                "backend must be one of 'auto', 'triton', 'cuda', 'cpu', 'reference', got .*'bogus'"),
}


def _op_arguments() -> dict:
    """Valid arguments of alignkern::reward_attention_backward, by name, on the CPU."""
    q, k, v = _qkv()
    return dict(grad_out=torch.randn_like(q), grad_lse=torch.randn(1, 4, 5), q=q, k=k, v=v,
                key_bias=torch.randn(1, 6), key_rank=torch.zeros(1, 6),
                query_rank=torch.zeros(1, 5), out=torch.randn_like(q), lse=torch.randn(1, 4, 5),
                causal=True, scale=0.3, need_bias_grad=True,
                backend="cpu" if "cpu" in available_backends(torch.device("cpu")) else "reference")


def _op_cases():
    """Every case on the backward op, and on the forward op where it only replaces forward
    arguments."""
    forward = ("q", "k", "v", "key_bias", "key_rank", "query_rank", "causal", "scale", "backend")
    for case, (replace, _, _) in _OP_ERRORS.items():
        yield pytest.param("reward_attention_backward", case, id=f"backward-{case}")
        if set(replace(_op_arguments())) <= set(forward):
            yield pytest.param("reward_attention", case, id=f"forward-{case}")


@pytest.mark.parametrize("op,case", list(_op_cases()))
def test_registered_ops_validate_every_argument(op, case):
    """Called directly, each op refuses each bad argument with a clear error before any kernel
    runs (mis-shaped arguments used to reach the C++ backward kernel: out-of-bounds reads and
    writes)."""
    replace, error, message = _OP_ERRORS[case]
    arguments = _op_arguments()
    arguments.update(replace(arguments))
    names = [a.name for a in getattr(torch.ops.alignkern, op).default._schema.arguments]
    with pytest.raises(error, match=f"^{op}: {message}"):
        getattr(torch.ops.alignkern, op)(*(arguments[name] for name in names))


def test_registered_ops_fake_kernels_check_shapes():
    """On meta tensors (the fake kernels, as torch.compile traces them) the shape checks hold too."""
    arguments = {name: value.to("meta") if isinstance(value, torch.Tensor) else value
                 for name, value in _op_arguments().items()}
    names = [a.name for a in torch.ops.alignkern.reward_attention_backward.default._schema.arguments]
    for arg, bad, message in (("lse", torch.zeros(1, 4, 6), "lse must have shape"),
                              ("out", torch.zeros(1, 4, 4, 8), "out must have q's shape"),
                              ("k", torch.zeros(1, 2, 6, 4), "k and v must have the same shape")):
        with pytest.raises(RuntimeError, match=f"reward_attention_backward: {message}"):
            torch.ops.alignkern.reward_attention_backward(
                *(bad.to("meta") if name == arg else arguments[name] for name in names))
    with pytest.raises(RuntimeError, match="reward_attention: key_rank must have shape"):
        torch.ops.alignkern.reward_attention(
            arguments["q"], arguments["k"], arguments["v"], None,
            torch.zeros(1, 5, device="meta"), arguments["query_rank"], False, 0.3, "auto")


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
