"""shared_prefix_attention and merge_attention on every backend against plain float64 attention
over the concatenated keys (the prefix repeated per row), forward and backward; the registered
ops' contract (opcheck, torch.compile, errors)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, available_backends

import alignkern

BACKENDS = available_backends()
# Relative to the largest entry of the float64 oracle (as in test_reward_attention.py).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
NAMES = ("q", "prefix_k", "prefix_v", "suffix_k", "suffix_v", "prefix_key_bias",
         "suffix_key_bias")


def make_problem(rows=6, groups=2, heads_q=4, heads_kv=2, len_q=3, len_s=5, len_p=7, head_dim=16,
                 *, dtype=torch.float32, prefix_bias=None, suffix_bias=None, ranks=None,
                 device=DEVICE) -> dict:
    """Random inputs by argument name. ``prefix_bias``/``suffix_bias``: None, "shared" (one per
    key) or "head" (per query head); ``ranks``: None, "float" or "int" (with ties)."""
    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(dtype).to(device)

    bias_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    problem = dict(q=rand(rows, heads_q, len_q, head_dim),
                   prefix_k=rand(groups, heads_kv, len_p, head_dim),
                   prefix_v=rand(groups, heads_kv, len_p, head_dim),
                   suffix_k=rand(rows, heads_kv, len_s, head_dim),
                   suffix_v=rand(rows, heads_kv, len_s, head_dim))
    for arg, kind, batch, length in (("prefix_key_bias", prefix_bias, groups, len_p),
                                     ("suffix_key_bias", suffix_bias, rows, len_s)):
        problem[arg] = None if kind is None else (
            torch.randn(batch, length) if kind == "shared"
            else torch.randn(batch, heads_q, length)).to(bias_dtype).to(device)
    problem.update(prefix_key_rank=None, suffix_key_rank=None, query_rank=None)
    if ranks is not None:
        dtype = torch.float32 if ranks == "float" else torch.int64
        for arg, shape in (("prefix_key_rank", (groups, len_p)),
                           ("suffix_key_rank", (rows, len_s)), ("query_rank", (rows, len_q))):
            problem[arg] = torch.randint(0, 4, shape, device=device).to(dtype)
    return problem


def oracle(problem: dict, causal: bool, scale=None):
    """Plain float64 softmax attention of each row over [its group's prefix, its suffix]."""
    q = problem["q"].double()
    rows, heads, len_q, head_dim = q.shape
    per_group = rows // problem["prefix_k"].shape[0]
    heads_kv, len_p = problem["prefix_k"].shape[1], problem["prefix_k"].shape[2]
    len_s = problem["suffix_k"].shape[2]

    def keys(prefix, suffix):
        both = torch.cat([prefix.double().repeat_interleave(per_group, 0), suffix.double()], 2)
        return both.repeat_interleave(heads // heads_kv, 1)

    k = keys(problem["prefix_k"], problem["suffix_k"])
    v = keys(problem["prefix_v"], problem["suffix_v"])
    scores = (head_dim ** -0.5 if scale is None else scale) * q @ k.transpose(-1, -2)
    for arg, start, length, batch_rows in (("prefix_key_bias", 0, len_p, per_group),
                                           ("suffix_key_bias", len_p, len_s, 1)):
        bias = problem[arg]
        if bias is not None:
            bias = bias.double().repeat_interleave(batch_rows, 0)
            bias = bias[:, None, None, :] if bias.dim() == 2 else bias[:, :, None, :]
            scores[..., start:start + length] += bias
    visible = torch.ones(len_q, len_p + len_s, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril(len_p + len_s - len_q)
    visible = visible.expand(rows, heads, len_q, len_p + len_s)
    if problem["query_rank"] is not None:
        key_rank = torch.cat([problem["prefix_key_rank"].double().repeat_interleave(per_group, 0),
                              problem["suffix_key_rank"].double()], 1)
        visible = visible & (key_rank[:, None, None, :]
                             <= problem["query_rank"].double()[:, None, :, None])
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - torch.where(lse.isinf(), 0.0, lse)[..., None])
    return probs @ v, lse


def call(backend, problem, causal, **kw):
    with alignkern.use_backend(backend):
        return alignkern.shared_prefix_attention(
            *(problem[n] for n in NAMES[:5]), causal=causal, return_lse=True,
            **{n: problem[n] for n in (*NAMES[5:], "prefix_key_rank", "suffix_key_rank",
                                       "query_rank")}, **kw)


def assert_close_scaled(actual, expected, rel, name=""):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, name
    assert not actual.isnan().any(), f"{name}: NaN"
    if expected.numel() == 0:
        return
    scale = expected.abs().max().clamp(min=1e-30)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel:.1g} * {scale:.3g}"


def assert_lse_close(lse, expected, rel):
    assert torch.equal(lse.isneginf().cpu(), expected.isneginf().cpu())
    finite = ~expected.isinf()
    assert_close_scaled(lse[finite], expected[finite], rel, "lse")


def check_forward_and_backward(backend, problem, causal, dtype):
    leaves = {n: problem[n].clone().requires_grad_(True) for n in NAMES if problem[n] is not None}
    out, lse = call(backend, {**problem, **leaves}, causal)
    oracle_leaves = {n: x.detach().double().requires_grad_(True) for n, x in leaves.items()}
    want_out, want_lse = oracle({**problem, **oracle_leaves}, causal)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64
                                                else torch.float32)
    assert_close_scaled(out, want_out, TOL[dtype], "out")
    assert_lse_close(lse, want_lse, TOL[dtype] / 4)
    grad_out = torch.randn_like(want_out)
    grad_lse = torch.randn_like(want_lse)
    got = torch.autograd.grad((out.double() * grad_out).sum()
                              + (lse.double().masked_fill(lse.isinf(), 0) * grad_lse).sum(),
                              list(leaves.values()))
    want = torch.autograd.grad((want_out * grad_out).sum()
                               + (want_lse.masked_fill(want_lse.isinf(), 0) * grad_lse).sum(),
                               list(oracle_leaves.values()))
    for name, g, w in zip(leaves, got, want):
        assert g.dtype == leaves[name].dtype, name
        assert_close_scaled(g, w, TOL[dtype] * (4 if dtype != torch.float32 else 2), f"d{name}")


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", [
    dict(),                                                     # one group of GQA rows
    dict(groups=1, prefix_bias="shared", suffix_bias="head"),
    dict(groups=3, heads_kv=4, prefix_bias="head", ranks="float"),
    dict(groups=2, suffix_bias="shared", ranks="int", head_dim=24),
    dict(rows=5, groups=5, len_q=1, len_s=1, len_p=70, head_dim=8),  # a decode step, 5 prompts
    dict(rows=4, groups=1, len_q=4, len_s=4, len_p=0),                # no prefix
    dict(rows=4, groups=1, len_q=1, len_s=1, len_p=130, heads_q=2, heads_kv=1, head_dim=40),
], ids=["gqa", "biases", "head-bias-ranks", "int-ranks", "decode", "no-prefix", "long-prefix"])
def test_equals_attention_over_the_concatenated_keys_fp32(backend, causal, case):
    problem = make_problem(**case)
    check_forward_and_backward(backend, problem, causal, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes(backend, dtype):
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the cuda backend takes no float64")
    problem = make_problem(dtype=dtype, prefix_bias="shared", ranks="float")
    check_forward_and_backward(backend, problem, True, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_see_nothing_give_zero_and_no_nan(backend):
    """Ranks that hide every key from some queries: out 0, lse -inf, zero gradients; and rows that
    see only the prefix or only the suffix."""
    problem = make_problem(ranks="float", prefix_bias="shared", suffix_bias="shared")
    problem["query_rank"][0, :] = -1.0                       # row 0 sees nothing
    problem["prefix_key_rank"][:] = 5.0                      # nobody sees the prefix but row 2
    problem["prefix_key_rank"][0, :2] = 0.0
    problem["suffix_key_rank"][1, :] = 9.0                   # row 1 sees no suffix key
    out, lse = call(backend, problem, causal=False)
    assert (out[0] == 0).all() and lse[0].isneginf().all()
    check_forward_and_backward(backend, problem, False, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_biases_stay_exact(backend):
    """A prefix bias of +60 on one key and a suffix bias of -60: the merge's weights span e^120
    (fp32's exp overflows at e^88 without the max shift)."""
    problem = make_problem(prefix_bias="shared", suffix_bias="shared", groups=1)
    problem["prefix_key_bias"][0, 3] = 60.0
    problem["suffix_key_bias"][:, 1] = -60.0
    check_forward_and_backward(backend, problem, True, torch.float32)
    problem["prefix_key_bias"][0, 3] = -80.0
    problem["suffix_key_bias"][:, 0] = 80.0
    check_forward_and_backward(backend, problem, True, torch.float32)


def test_prefix_part_is_one_problem_per_prefix(monkeypatch):
    """Hydragen's point: the prefix part is one attention call whose queries are all m rows' (G
    problems of m·Lq queries against one copy), not m calls against m copies."""
    from alignkern.ops import reward_attention as attention

    calls = []
    real = attention._run_forward

    def spy(q, k, *args):
        calls.append((tuple(q.shape), tuple(k.shape)))
        return real(q, k, *args)

    monkeypatch.setattr(attention, "_run_forward", spy)
    problem = make_problem(rows=8, groups=2, len_q=3, len_p=11)
    call("cpu" if "cpu" in BACKENDS else "triton", problem, causal=True)
    assert calls[0] == ((2, 4, 4 * 3, 16), (2, 2, 11, 16))  # the prefix part: 2 problems of 12
    assert calls[1] == ((8, 4, 3, 16), (8, 2, 5, 16))        # the suffixes


# ----------------------------------------------------------------------------- merge_attention


def test_merge_attention_equals_attention_over_both_key_sets():
    q = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    k, v = torch.randn(2, 3, 9, 8, dtype=torch.float64), torch.randn(2, 3, 9, 8, dtype=torch.float64)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    parts = [alignkern.reward_attention(leaves[0], leaves[1][:, :, s], leaves[2][:, :, s],
                                        return_lse=True) for s in (slice(0, 4), slice(4, 9))]
    out, lse = alignkern.merge_attention(*parts[0], *parts[1])
    scores = q @ k.transpose(-1, -2) / 8 ** 0.5
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-12, atol=1e-12)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * grad_out).sum() + (lse * grad_lse).sum(), leaves)
    plain = [x.clone().requires_grad_(True) for x in (q, k, v)]
    scores = plain[0] @ plain[1].transpose(-1, -2) / 8 ** 0.5
    want = torch.autograd.grad(((torch.softmax(scores, -1) @ plain[2]) * grad_out).sum()
                               + (torch.logsumexp(scores, -1) * grad_lse).sum(), plain)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_merge_attention_rows_without_keys():
    """-inf on one side: the other side unchanged; on both: 0 and -inf, zero finite gradients."""
    out_a, out_b = torch.randn(3, 4), torch.randn(3, 4)
    lse_a = torch.tensor([0.5, float("-inf"), float("-inf")])
    lse_b = torch.tensor([float("-inf"), 2.0, float("-inf")])
    leaves = [x.clone().requires_grad_(True) for x in (out_a, lse_a, out_b, lse_b)]
    out, lse = alignkern.merge_attention(*leaves)
    torch.testing.assert_close(out[0], out_a[0])
    torch.testing.assert_close(out[1], out_b[1])
    assert (out[2] == 0).all() and lse[2].isneginf() and lse[0] == 0.5 and lse[1] == 2.0
    grads = torch.autograd.grad((out * torch.randn(3, 4)).sum()
                                + (lse.masked_fill(lse.isinf(), 0)).sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][2] == 0).all() and (grads[2][2] == 0).all()


@pytest.mark.parametrize("args,error,message", [
    ((torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 4), torch.zeros(2)), ValueError,
     r"out_a and out_b must have one shape"),
    ((torch.zeros(2, 3), torch.zeros(3), torch.zeros(2, 3), torch.zeros(2)), ValueError,
     r"lse_a must have shape"),
    ((torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2)),
     TypeError, r"out_b must have out_a's dtype"),
    ((torch.zeros(2, 3), [0.0, 1.0], torch.zeros(2, 3), torch.zeros(2)), TypeError, r"lse_a"),
    ((torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2), torch.zeros(2, 3), torch.zeros(2)),
     TypeError, r"out_a"),
])
def test_merge_attention_errors(args, error, message):
    with pytest.raises(error, match=f"^merge_attention: {message}"):
        alignkern.merge_attention(*args)


# ----------------------------------------------------------------------------- torch integration


def _op_args(problem, causal=True, scale=0.25, backend="auto"):
    return (*(problem[n] for n in NAMES), problem["prefix_key_rank"], problem["suffix_key_rank"],
            problem["query_rank"], causal, scale, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    problem = make_problem(rows=4, groups=2, len_q=2, len_s=3, len_p=5, head_dim=8,
                           prefix_bias="shared", suffix_bias="head", ranks="float")
    leaves = {n: problem[n].clone().requires_grad_(True) for n in NAMES}
    op = torch.ops.alignkern.shared_prefix_attention
    torch.library.opcheck(op.default, _op_args({**problem, **leaves}, backend=backend))
    plain = {**problem, "prefix_key_bias": None, "suffix_key_bias": None, "prefix_key_rank": None,
             "suffix_key_rank": None, "query_rank": None}
    torch.library.opcheck(op.default, _op_args(plain, causal=False, backend=backend))
    out, lse = op(*_op_args(problem, backend=backend))
    for needs in ((True, True), (False, True), (False, False)):
        torch.library.opcheck(
            torch.ops.alignkern.shared_prefix_attention_backward.default,
            (torch.randn_like(out), torch.randn_like(lse), *_op_args(problem)[:10], out, lse,
             True, 0.25, *needs, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_with_backward(backend):
    torch._dynamo.reset()
    problem = make_problem(prefix_bias="shared", ranks="float")
    leaves = {n: problem[n].clone().requires_grad_(True) for n in NAMES if problem[n] is not None}

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(q, pk, pv, sk, sv, bias):
        out = alignkern.shared_prefix_attention(
            q, pk, pv, sk, sv, prefix_key_bias=bias, prefix_key_rank=problem["prefix_key_rank"],
            suffix_key_rank=problem["suffix_key_rank"], query_rank=problem["query_rank"],
            causal=True)
        return (out * 3.0).sum()

    with alignkern.use_backend(backend):
        loss_fn(*leaves.values()).backward()
    oracle_leaves = {n: x.detach().double().requires_grad_(True) for n, x in leaves.items()}
    want = torch.autograd.grad(oracle({**problem, **oracle_leaves}, True)[0].sum() * 3.0,
                               list(oracle_leaves.values()))
    for (name, leaf), w in zip(leaves.items(), want):
        assert_close_scaled(leaf.grad, w, 2 * TOL[torch.float32], name)


def test_torch_compile_inductor():
    torch._dynamo.reset()
    problem = make_problem(suffix_bias="shared")

    @torch.compile(fullgraph=True)
    def attend(q, pk, pv, sk, sv, bias):
        return alignkern.shared_prefix_attention(q * 0.5, pk, pv, sk, sv, suffix_key_bias=bias,
                                                 causal=True).exp()

    got = attend(*(problem[n] for n in NAMES[:5]), problem["suffix_key_bias"])
    want = oracle({**problem, "q": problem["q"] * 0.5}, True)[0].exp()
    assert_close_scaled(got, want, 2e-5)


def test_autocast_casts_the_attention_operands():
    problem = make_problem(prefix_bias="shared", device=torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = alignkern.shared_prefix_attention(*(problem[n] for n in NAMES[:5]),
                                                prefix_key_bias=problem["prefix_key_bias"])
    assert out.dtype == torch.bfloat16
    by_hand = alignkern.shared_prefix_attention(
        *(problem[n].to(torch.bfloat16) for n in NAMES[:5]),
        prefix_key_bias=problem["prefix_key_bias"])
    assert torch.equal(out, by_hand)


# ----------------------------------------------------------------------------- errors


def _valid() -> dict:
    return make_problem(rows=4, groups=2, heads_q=4, heads_kv=2, len_q=2, len_s=3, len_p=5,
                        head_dim=8, prefix_bias="shared", suffix_bias="shared", ranks="float",
                        device=torch.device("cpu"))


_ERRORS = {
    "q-3d": (dict(q=torch.zeros(4, 4, 2)), ValueError, r"q must be 4-D \(N, Hq, Lq, D\)"),
    "q-int": (dict(q=torch.zeros(4, 4, 2, 8, dtype=torch.int32)), TypeError, r"q must be"),
    "groups": (dict(prefix_k=torch.zeros(3, 2, 5, 8), prefix_v=torch.zeros(3, 2, 5, 8)),
               ValueError, r"the rows N = 4 \(q's dim 0\) must be a multiple of the prefixes G = 3"),
    "no-group": (dict(prefix_k=torch.zeros(0, 2, 5, 8)), ValueError,
                 r"prefix_k must be 4-D \(G, Hkv, Lp, D\) with G >= 1"),
    "prefix-v-shape": (dict(prefix_v=torch.zeros(2, 2, 6, 8)), ValueError,
                       r"prefix_k and prefix_v must have the same shape"),
    "prefix-dtype": (dict(prefix_k=torch.zeros(2, 2, 5, 8, dtype=torch.float64)), TypeError,
                     r"prefix_k must have q's dtype"),
    "suffix-rows": (dict(suffix_k=torch.zeros(2, 2, 3, 8), suffix_v=torch.zeros(2, 2, 3, 8)),
                    ValueError, r"suffix_k must have N = 4 rows"),
    "heads": (dict(suffix_k=torch.zeros(4, 4, 3, 8), suffix_v=torch.zeros(4, 4, 3, 8)),
              ValueError, r"prefix and suffix must have the same key/value heads"),
    "gqa": (dict(prefix_k=torch.zeros(2, 3, 5, 8), prefix_v=torch.zeros(2, 3, 5, 8)),
            ValueError, r"the query heads Hq = 4 must be a multiple of prefix_k's heads Hkv = 3"),
    "head-dim": (dict(suffix_k=torch.zeros(4, 2, 3, 4), suffix_v=torch.zeros(4, 2, 3, 4)),
                 ValueError, r"head dims differ"),
    "prefix-bias": (dict(prefix_key_bias=torch.zeros(4, 5)), ValueError,
                    r"prefix_key_bias must have shape \(G, L\) = \(2, 5\)"),
    "suffix-bias": (dict(suffix_key_bias=torch.zeros(4, 5)), ValueError,
                    r"suffix_key_bias must have shape \(N, L\) = \(4, 3\)"),
    "bias-int": (dict(suffix_key_bias=torch.zeros(4, 3, dtype=torch.int64)), TypeError,
                 r"suffix_key_bias must be"),
    "ranks-partial": (dict(suffix_key_rank=None), ValueError,
                      r"prefix_key_rank, suffix_key_rank and query_rank go together"),
    "rank-shape": (dict(query_rank=torch.zeros(4, 3)), ValueError,
                   r"query_rank must have shape \(4, 2\)"),
    "rank-complex": (dict(prefix_key_rank=torch.zeros(2, 5, dtype=torch.complex64)), TypeError,
                     r"prefix_key_rank must be a real-valued tensor"),
    "causal-long-queries": (dict(q=torch.zeros(4, 4, 4, 8), query_rank=torch.zeros(4, 4),
                             grad_out=torch.zeros(4, 4, 4, 8), out=torch.zeros(4, 4, 4, 8),
                             lse=torch.zeros(4, 4, 4), grad_lse=torch.zeros(4, 4, 4)), ValueError,
                            r"with causal=True the queries must be the last Lq of the suffix's "
                            r"keys \(Lq <= Ls\), got Lq = 4 and Ls = 3"),
    "device": (dict(query_rank=torch.zeros(4, 2, device="meta")), ValueError,
               r"all tensors must be on the same device, got .* query_rank on meta"),
    "causal": (dict(causal="yes"), TypeError, r"causal must be True or False, got str 'yes'"),
    "scale": (dict(scale=float("inf")), ValueError, r"scale must be a finite number"),
}


@pytest.mark.parametrize("case", list(_ERRORS))
def test_public_function_errors(case):
    replace, error, message = _ERRORS[case]
    args = {**_valid(), **replace}
    options = {n: args.pop(n) for n in ("causal", "scale") if n in args}
    with pytest.raises(error, match=f"^shared_prefix_attention: {message}"):
        alignkern.shared_prefix_attention(
            *(args[n] for n in NAMES[:5]), causal=options.get("causal", True),
            scale=options.get("scale"),
            **{n: args[n] for n in (*NAMES[5:], "prefix_key_rank", "suffix_key_rank",
                                    "query_rank")})


def _backward_args() -> dict:
    problem = _valid()
    q = problem["q"]
    return dict(grad_out=torch.randn_like(q), grad_lse=torch.randn(q.shape[:3]), **problem,
                out=torch.randn_like(q), lse=torch.randn(q.shape[:3]), causal=True, scale=0.3,
                need_prefix_bias_grad=True, need_suffix_bias_grad=True,
                backend="cpu" if "cpu" in available_backends(torch.device("cpu")) else "reference")


_BACKWARD_ONLY = {
    "grad-out": (dict(grad_out=torch.zeros(4, 4, 2, 7)), ValueError, r"grad_out must have"),
    "lse": (dict(lse=torch.zeros(4, 4, 3)), ValueError, r"lse must have"),
    "backend": (dict(backend="bogus"), ValueError, r"backend must be one of"),
}


@pytest.mark.parametrize("op,case", [(op, c) for c in (*_ERRORS, *_BACKWARD_ONLY)
                                     for op in ("shared_prefix_attention",
                                                "shared_prefix_attention_backward")
                                     # the dispatcher itself refuses a causal that is not a bool
                                     if c != "causal" and not (op == "shared_prefix_attention"
                                                               and c in ("grad-out", "lse"))])
def test_registered_ops_validate_every_argument(op, case):
    """Called directly, each op refuses each bad argument with a clear error before any kernel
    runs."""
    replace, error, message = {**_ERRORS, **_BACKWARD_ONLY}[case]
    arguments = {**_backward_args(), **replace}
    names = [a.name for a in getattr(torch.ops.alignkern, op).default._schema.arguments]
    with pytest.raises(error, match=f"^{op}: {message}"):
        getattr(torch.ops.alignkern, op)(*(arguments[name] for name in names))


def test_fake_kernels_check_shapes():
    arguments = {n: v.to("meta") if isinstance(v, torch.Tensor) else v
                 for n, v in _backward_args().items()}
    names = [a.name for a in
             torch.ops.alignkern.shared_prefix_attention.default._schema.arguments]
    bad = {**arguments, "prefix_k": torch.zeros(3, 2, 5, 8, device="meta"),
           "prefix_v": torch.zeros(3, 2, 5, 8, device="meta")}
    with pytest.raises(RuntimeError, match="shared_prefix_attention: N must be a multiple of G"):
        torch.ops.alignkern.shared_prefix_attention(*(bad[n] for n in names))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_long_prefix(backend, dtype, head_dim):
    """A self-evaluation's shape: 32 rows of 40 tokens after a 1,000-token prefix, GQA 4:1,
    causal within the suffix, a shared key bias over the prefix."""
    if backend not in BACKENDS:
        pytest.skip(f"{backend} backend unavailable")
    problem = make_problem(rows=32, groups=1, heads_q=8, heads_kv=2, len_q=40, len_s=40,
                           len_p=1000, head_dim=head_dim, dtype=dtype, prefix_bias="shared")
    check_forward_and_backward(backend, problem, True, dtype)
