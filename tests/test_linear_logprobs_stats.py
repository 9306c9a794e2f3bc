"""linear_logprobs(..., stats=...): the entropy, log sum p^2, mean logit and is_top1 fused into the
same pass, on every backend, against float64 plain torch (tests/oracles.py); the entropy's gradient with
random upstream gradients, together with the log-probabilities' and each alone."""

from __future__ import annotations

import oracles
import pytest
import torch
from conftest import available_backends
from test_linear_logprobs import (
    DTYPES,
    FORWARD_TOL,
    GRAD_TOL,
    IGNORE,
    _cpu_backward_path,
    assert_close_scaled,
    make_inputs,
)

import alignkern

BACKENDS = available_backends()
ALL = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "max_logits")
ROW_STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "max_logits")


def run(backend, *args, **kw):
    with alignkern.use_backend(backend):
        return alignkern.linear_logprobs(*args, **kw)


def reference_stats(h, w, targets, b=None, **kw):
    """float64 (logprobs, lse, stats dict) from the materialised logits (plain torch)."""
    return oracles.linear_logprobs_stats(h, w, targets, b, **kw)


def check_stats(result, expected, stats, dtype, lead):
    out, lse, ref_stats = expected
    tol = FORWARD_TOL[dtype]
    torch.testing.assert_close(result.logprobs.double().cpu(), out.cpu(), rtol=tol, atol=tol,
                               equal_nan=True)
    torch.testing.assert_close(result.lse.double().cpu(), lse.cpu(), rtol=tol, atol=tol)
    for name in ALL:
        got = getattr(result, name)
        if name not in stats:
            assert got is None, name
        elif name == "is_top1":
            assert got.dtype == torch.bool and got.shape == out.shape
            assert torch.equal(got.cpu(), ref_stats[name].cpu())
        else:
            assert got.shape == lead and got.dtype == result.lse.dtype, name
            torch.testing.assert_close(got.double().cpu(), ref_stats[name].cpu(), rtol=tol,
                                       atol=tol, msg=lambda m, n=name: f"{n}: {m}")


def targets_with_top1(h, w, b, targets, share=0.5, **kw):
    """``targets`` with about ``share`` of the rows' first slot set to the row's first maximum
    (so is_top1 is True somewhere; random ids almost never are)."""
    logits = oracles.linear_logits(h, w, b, kw.get("softcap"), kw.get("logit_scale", 1.0))
    first_max = logits.argmax(-1)
    targets = targets.clone()
    pick = torch.rand(first_max.shape, device=first_max.device) < share
    slot = targets[..., 0] if targets.dim() == h.dim() else targets
    slot[pick] = first_max[pick].to(targets.dtype)
    return targets


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("vocab,k", [(7, None), (1029, 3), (2600, 1)])
def test_every_statistic_matches_the_reference(backend, dtype, vocab, k):
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the cuda backend takes no float64")
    h, w, b, targets = make_inputs((37,), vocab, k, dtype, bias=True)
    targets = targets_with_top1(h, w, b, targets)
    result = run(backend, h, w, targets, bias=b, stats=ALL)
    check_stats(result, reference_stats(h, w, targets, b), ALL, dtype, (37,))
    assert result.is_top1.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap,temperature,logit_scale", [(None, 0.6, 1.0), (2.5, 1.3, 0.5),
                                                             (None, 1.0, 4.0), (3.0, 1.0, 1.0)])
def test_softcap_temperature_logit_scale(backend, softcap, temperature, logit_scale):
    kw = dict(softcap=softcap, temperature=temperature, logit_scale=logit_scale)
    h, w, b, targets = make_inputs((5, 7), 301, 2, torch.float32, bias=True)
    targets = targets_with_top1(h, w, b, targets, **kw)
    result = run(backend, h, w, targets, bias=b, stats=ALL, **kw)
    check_stats(result, reference_stats(h, w, targets, b, **kw), ALL, torch.float32, (5, 7))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stats", [("entropy",), ("log_sum_sq_probs",), ("mean_logits",),
                                   ("is_top1",), ("max_logits",), ("entropy", "is_top1"), ()])
def test_each_statistic_alone(backend, stats):
    h, w, _, targets = make_inputs((9,), 300, 2, torch.float32)
    result = run(backend, h, w, targets, stats=stats)
    check_stats(result, reference_stats(h, w, targets), stats, torch.float32, (9,))
    plain = run(backend, h, w, targets, return_lse=True)
    assert torch.equal(result.logprobs, plain.logprobs) and torch.equal(result.lse, plain.lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_is_top1_takes_the_first_of_tied_maxima(backend):
    """Columns 3, 200 and 290 have the same LM-head row, hence exactly equal logits; where they are
    the row's maximum only column 3 is the top-1 (TRL's rule: argmax's first maximum)."""
    h, w, _, _ = make_inputs((6,), 300, None, torch.float32)
    w[200] = w[3]
    w[290] = w[3]
    h = w[3].expand(6, -1) * 3.0 + 0.01 * h  # column 3 (and its copies) is every row's maximum
    targets = torch.tensor([[3, 200, 290, 5]] * 6, device=h.device)
    result = run(backend, h, w, targets, stats=("is_top1",))
    expected = torch.tensor([[True, False, False, False]] * 6)
    assert torch.equal(result.is_top1.cpu(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_and_out_of_range_targets(backend, monkeypatch):
    """is_top1 is False for ignore_index (and for an out-of-range id with validation off); the row
    statistics do not depend on the targets."""
    h, w, _, targets = make_inputs((8,), 100, 3, torch.float32, ignore_share=0.0)
    targets = targets_with_top1(h, w, None, targets, share=1.0)
    ignored = targets.clone()
    ignored[:, 0] = IGNORE
    result = run(backend, h, w, ignored, stats=ALL)
    assert not result.is_top1[:, 0].any()
    full = run(backend, h, w, targets, stats=ALL)
    for name in ROW_STATS:
        assert torch.equal(getattr(result, name), getattr(full, name))
    monkeypatch.setenv("ALIGNKERN_VALIDATE", "0")
    outside = targets.clone()
    outside[:, 1] = 100
    result = run(backend, h, w, outside, stats=("is_top1",))
    assert not result.is_top1[:, 1].any() and result.logprobs[:, 1].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (1,), (2, 0)])
def test_empty_and_single_rows(backend, lead):
    h, w, _, targets = make_inputs(lead, 50, 2, torch.float32)
    result = run(backend, h, w, targets, stats=ALL)
    check_stats(result, reference_stats(h, w, targets), ALL, torch.float32, lead)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "triton")])
@pytest.mark.parametrize("cpu_path", ["recompute", "kept"])
def test_many_tiles_and_vocabulary_splits(backend, cpu_path, monkeypatch):
    """Small tiles: the cpu path merges many vocabulary tiles' partials (or, keeping the logits,
    reads them back in many vocabulary blocks), the Triton forward several vocabulary splits',
    with the maximum and ties in different parts."""
    if backend != "cpu" and cpu_path == "kept":
        pytest.skip("the cpu backend's choice")
    from alignkern.ops import linear_logprobs_cpu
    from alignkern.triton_kernels import linear_logprobs as kernels

    monkeypatch.setattr(linear_logprobs_cpu, "TILE_BYTES", 8 * 50 * 4)
    monkeypatch.setattr(linear_logprobs_cpu, "MAX_TILE_ROWS", 8)
    _cpu_backward_path(monkeypatch, cpu_path)
    monkeypatch.setattr(kernels, "_vocab_splits", lambda *args: 3)
    h, w, b, targets = make_inputs((37,), 1029, 3, torch.float32, bias=True)
    w[900], b[900] = w[10], b[10]  # a tie between far-apart parts
    kw = dict(temperature=0.7, softcap=4.0)
    targets = targets_with_top1(h, w, b, targets, **kw)
    targets[:, 1] = 900
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    result = run(backend, leaves[0], leaves[1], targets, bias=leaves[2], stats=ALL, **kw)
    expected = reference_stats(h, w, targets, b, **kw)
    check_stats(result, expected, ALL, torch.float32, (37,))
    upstream = (torch.randn_like(result.logprobs), torch.randn_like(result.entropy))
    grads = torch.autograd.grad((result.logprobs, result.entropy), leaves, upstream)
    for got, want in zip(grads, reference_grads(h, w, b, targets, *upstream, **kw)):
        assert_close_scaled(got, want, GRAD_TOL[torch.float32])


# ----------------------------------------------------------------------------- backward


def reference_grads(h, w, b, targets, grad_out=None, grad_entropy=None, grad_lse=None, **kw):
    """float64 autograd through the materialised logits: (dh, dw, db or None) of
    sum(grad_out * logprobs) + sum(grad_entropy * entropy) + sum(grad_lse * lse)."""
    leaves = [x.detach().double().requires_grad_(True) for x in (h, w)]
    if b is not None:
        leaves.append(b.detach().double().requires_grad_(True))
    out, lse, stats = oracles.linear_logprobs_stats(
        leaves[0], leaves[1], targets, leaves[2] if b is not None else None, **kw)
    loss = 0.0
    for value, grad in ((out, grad_out), (stats["entropy"], grad_entropy), (lse, grad_lse)):
        if grad is not None:
            loss = loss + (value * grad.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    return (*grads, None) if b is None else grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["both", "entropy", "logprobs", "all three"])
def test_entropy_gradient_random_upstream(backend, dtype, which):
    kw = dict(temperature=0.8, softcap=5.0, logit_scale=0.7)
    h, w, b, targets = make_inputs((3, 11), 1029, 2, dtype, bias=True)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    result = run(backend, *leaves[:2], targets, bias=leaves[2], stats=ALL, **kw)
    grad_out = torch.randn_like(result.logprobs) if which != "entropy" else None
    grad_entropy = torch.randn_like(result.entropy) if which != "logprobs" else None
    grad_lse = torch.randn_like(result.lse) if which == "all three" else None
    pairs = [(v, g) for v, g in ((result.logprobs, grad_out), (result.entropy, grad_entropy),
                                 (result.lse, grad_lse)) if g is not None]
    grads = torch.autograd.grad([v for v, _ in pairs], leaves, [g for _, g in pairs])
    expected = reference_grads(h, w, b, targets, grad_out, grad_entropy, grad_lse, **kw)
    for got, want in zip(grads, expected):
        assert got.dtype == dtype
        assert_close_scaled(got, want, GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_without_gradient_take_none(backend):
    """log_sum_sq_probs, mean_logits and is_top1 are outputs without gradient (TRL logs them);
    an entropy nobody differentiates leaves the log-probabilities' gradient unchanged."""
    h, w, _, targets = make_inputs((6,), 200, 1, torch.float32)
    leaf = h.clone().requires_grad_(True)
    result = run(backend, leaf, w, targets, stats=ALL)
    for name in ("log_sum_sq_probs", "mean_logits", "is_top1", "max_logits"):
        assert not getattr(result, name).requires_grad
    assert result.entropy.requires_grad
    (with_stats,) = torch.autograd.grad(result.logprobs.sum(), leaf)
    (plain,) = torch.autograd.grad(run(backend, leaf, w, targets).sum(), leaf)
    torch.testing.assert_close(with_stats, plain)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])
def test_gradcheck_float64(backend):
    h, w, b, targets = make_inputs((3,), 11, 2, torch.float64, hidden=5, bias=True)
    leaves = tuple(x.clone().requires_grad_(True) for x in (h, w, b))
    temperature = 1.0 if backend == "triton" else 0.7  # triton scales by 1/T in float32

    def fn(hh, ww, bb):
        result = alignkern.linear_logprobs(hh, ww, targets, bias=bb, softcap=3.0,
                                           temperature=temperature, stats=("entropy",))
        return result.logprobs, result.lse, result.entropy

    with alignkern.use_backend(backend):
        assert torch.autograd.gradcheck(fn, leaves)


# ----------------------------------------------------------------------------- the registered op


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    h, w, b, targets = make_inputs((4, 3), 50, 2, torch.float32, bias=True)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    for flags in [(True, True, True, True, True), (True, False, False, False, False),
                  (False, True, False, True, False), (False, False, False, False, True)]:
        torch.library.opcheck(torch.ops.alignkern.linear_logprobs_stats.default,
                              (*leaves[:2], targets, leaves[2], 1.3, 2.0, 0.4, IGNORE, *flags,
                               False, backend))
    out, row_max, log_sum, entropy, *_ = torch.ops.alignkern.linear_logprobs_stats(
        h, w, targets, b, 1.3, None, 2.5, IGNORE, True, False, False, False, False, False,
        backend)
    torch.library.opcheck(
        torch.ops.alignkern.linear_logprobs_backward.default,
        (torch.randn_like(out), None, h, w, targets, b, row_max, log_sum, 1.3, None, 2.5, IGNORE,
         True, True, True, backend, torch.randn_like(entropy), entropy),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_with_backward(backend):
    torch._dynamo.reset()
    h, w, b, targets = make_inputs((2, 6), 100, 2, torch.float32, bias=True)
    kw = dict(temperature=0.9, softcap=3.0, logit_scale=0.5)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(hh, ww, bb, t):
        result = alignkern.linear_logprobs(hh, ww, t, bias=bb, stats=("entropy", "is_top1"), **kw)
        return -result.logprobs.sum() + 0.5 * result.entropy.sum(), result.is_top1

    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    with alignkern.use_backend(backend):
        loss, is_top1 = loss_fn(*leaves, targets)
        loss.backward()
    out, _, stats = reference_stats(h, w, targets, b, **kw)
    torch.testing.assert_close(loss.double(), -out.sum() + 0.5 * stats["entropy"].sum(),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(is_top1.cpu(), stats["is_top1"].cpu())
    expected = reference_grads(h, w, b, targets, torch.full(targets.shape, -1.0),
                               torch.full(targets.shape[:-1], 0.5), **kw)
    for leaf, want in zip(leaves, expected):
        assert_close_scaled(leaf.grad, want, GRAD_TOL[torch.float32])


def test_bad_stats_are_refused():
    h, w, _, targets = make_inputs((3,), 20, None, torch.float32)
    with pytest.raises(ValueError, match=r"linear_logprobs: stats must be among .* got \['entropie'\]"):
        alignkern.linear_logprobs(h, w, targets, stats=("entropie",))
    with pytest.raises(TypeError, match=r"linear_logprobs: stats must be a tuple of names"):
        alignkern.linear_logprobs(h, w, targets, stats="entropy")
    for bad in (5, 2.0, ("entropy", 3)):  # 5 once said "'int' object is not iterable"
        with pytest.raises(TypeError, match=r"^linear_logprobs: stats must be a tuple of names "
                                            r".* got (int 5|float 2.0|tuple)"):
            alignkern.linear_logprobs(h, w, targets, stats=bad)
    # An iterator is read once: its statistics are computed, not consumed by the check.
    result = alignkern.linear_logprobs(h, w, targets, stats=iter(["entropy"]))
    assert result.entropy is not None and result.log_sum_sq_probs is None


@pytest.mark.parametrize("call", ["linear_logprobs", "linear_kl"])
def test_a_scale_over_temperature_beyond_float32_is_refused(call):
    """temperature = 1e-30 and logit_scale = 1e10 are each in range, their ratio (the factor the
    kernels hold in float32) is not: it gave [-inf, nan]."""
    h, w, _, targets = make_inputs((3,), 20, None, torch.float32)
    with pytest.raises(ValueError, match=rf"^{call}: logit_scale / temperature must be within"):
        if call == "linear_logprobs":
            alignkern.linear_logprobs(h, w, targets, temperature=1e-30, logit_scale=1e10)
        else:
            alignkern.losses.linear_kl(h, w, h, w, temperature=1e-30, logit_scale=1e10)


def test_backward_op_refuses_an_entropy_gradient_without_the_entropy():
    h, w, _, targets = make_inputs((3,), 20, None, torch.float32)
    out, row_max, log_sum, _ = torch.ops.alignkern.linear_logprobs(h, w, targets, None, 1.0, None,
                                                                   1.0, IGNORE, False, "reference")
    with pytest.raises(ValueError, match=r"^linear_logprobs_backward: grad_entropy and entropy "
                                         r"must be given together"):
        torch.ops.alignkern.linear_logprobs_backward(
            out, None, h, w, targets, None, row_max, log_sum, 1.0, None, 1.0, IGNORE, True, True,
            False, "reference", torch.randn_like(log_sum), None)
