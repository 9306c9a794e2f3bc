"""Log-probabilities near the row maximum keep their low bits, on every backend.

Every kernel keeps a row's maximum ``m`` and the log of its rescaled sum ``log s`` apart and forms
``(z - m) - log s`` (backward: ``exp((z - m) - log s)``): ``z - lse`` with ``lse = m + log s``
rounded to one float32 loses every bit of ``log s`` below the spacing of ``|m|`` (tied top logits
at T = 1e-6 gave -0.5 for -0.693). Each case is checked against float64 ``torch.log_softmax`` of the
same inputs (tests/oracles.py), never against alignkern's own reference backend, which had the same
flaw. Inputs are chosen so that ``z = logits / T`` itself is exact in float32 (a power-of-two
temperature, dyadic hidden states and heads whose dot products are exact in any order), so what is
measured is the log-sum-exp, not the rounding of z that no float32 kernel can avoid; where z does
round (bf16 logits at T = 1e-2), the bound is twice the error of torch's own float32
``log_softmax``.
"""

from __future__ import annotations

import math

import oracles
import pytest
import torch
from conftest import DEVICE, available_backends

import alignkern

BACKENDS = available_backends()
LOG2, LOG3 = math.log(2.0), math.log(3.0)


def _run(backend, fn, *args, **kwargs):
    with alignkern.use_backend(backend):
        return fn(*args, **kwargs)


def _grad64(fn, leaves, upstream):
    """float64 autograd of ``fn(*leaves)`` (each leaf promoted) with ``upstream`` gradients."""
    leaves = [x.detach().double().cpu().requires_grad_(True) for x in leaves]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return torch.autograd.grad(outputs, leaves, [g.double().cpu() for g in upstream])


def _assert_scaled(got, want, tol, what):
    """|got - want| <= tol * max|want| (gradients at tiny T are of order 1 / T)."""
    scale = max(float(want.abs().max()), 1e-30)
    error = float((got.double().cpu() - want).abs().max())
    assert error <= tol * scale, f"{what}: error {error:.3g} > {tol:g} x {scale:.3g}"


# ----------------------------------------------------------------------------- token_logprobs


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_top_logits_at_tiny_temperature(backend):
    """The issue's case: [5, 5, 1] at T = 1e-6 is log 1/2 for both tied tokens (was -0.5)."""
    logits = torch.tensor([[5.0, 5.0, 1.0]], device=DEVICE, requires_grad=True)
    targets = torch.tensor([[0, 1]], device=DEVICE)
    out, lse = _run(backend, alignkern.token_logprobs, logits, targets, temperature=1e-6,
                    return_lse=True)
    torch.testing.assert_close(out.double().cpu(), torch.full((1, 2), -LOG2, dtype=torch.float64),
                               rtol=0, atol=1e-7)
    # d/dlogits of (g0 log p0 + g1 log p1): (g_t - (g0 + g1) p) / T with p = (1/2, 1/2, 0)
    g = torch.tensor([[1.0, -3.0]], device=DEVICE)
    (grad,) = torch.autograd.grad(out, logits, g)
    want = torch.tensor([[1.0 + 1.0, -3.0 + 1.0, 0.0]], dtype=torch.float64) / 1e-6
    torch.testing.assert_close(grad.double().cpu(), want, rtol=1e-6, atol=1e-6)
    assert float(lse.detach()) == pytest.approx(5e6 + LOG2, rel=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [-1e9, 1e9, -1e30, 3e30])
def test_a_constant_huge_row_is_uniform(backend, value):
    """Every id of a row of equal logits has probability 1/V however large |logit| is (a row of
    -1e9 gave log-probabilities of 0: a mass of 3)."""
    logits = torch.full((2, 3), value, device=DEVICE)
    targets = torch.tensor([[0, 1, 2], [2, 2, 0]], device=DEVICE)
    out = _run(backend, alignkern.token_logprobs, logits, targets)
    torch.testing.assert_close(out.double().cpu(), torch.full((2, 3), -LOG3, dtype=torch.float64),
                               rtol=0, atol=1e-7)


def _tied_bf16_logits(rows=3, vocab=32000, seed=0):
    """bf16 logits of order 2 whose top two ids (7 and 9000) are tied one above the rest."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 2).bfloat16()
    top = logits.float().amax(-1) + 1
    logits[:, 7] = top.bfloat16()
    logits[:, 9000] = logits[:, 7]
    targets = torch.tensor([[7, 9000, 5]] * rows)
    return logits.to(DEVICE), targets.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1e-2, 1e-4, 2.0**-20])
def test_tied_top_tokens_of_a_large_vocabulary(backend, temperature):
    """bf16 logits, V = 32000, two tied top ids: each log-probability within twice torch's own
    float32 log_softmax error (plus 1e-6), the tied ones log 1/2 (errors were 5.8e-5 at T = 1e-2
    and 5.7e-3 at T = 1e-4); the gradient equals float64 autograd's."""
    logits, targets = _tied_bf16_logits()
    leaf = logits.clone().requires_grad_(True)
    out = _run(backend, alignkern.token_logprobs, leaf, targets, temperature=temperature)
    want, _ = oracles.token_logprobs(logits.cpu(), targets.cpu(), temperature)
    torch_f32 = torch.log_softmax(logits.float().cpu() / temperature, -1).gather(-1, targets.cpu())
    bound = 2 * (torch_f32.double() - want).abs() + 1e-6
    error = (out.double().cpu() - want).abs()
    assert (error <= bound).all(), f"error {error.max():.3g}"
    torch.testing.assert_close(out[:, :2].double().cpu(), torch.full((3, 2), -LOG2,
                                                                     dtype=torch.float64),
                               rtol=0, atol=1e-6)
    g = torch.randn(out.shape, device=DEVICE)
    (grad,) = torch.autograd.grad(out, leaf, g)
    (want_grad,) = _grad64(lambda x: oracles.token_logprobs(x, targets.cpu(), temperature)[0],
                           [logits], [g])
    # The gradient comes back in bf16 (relative rounding 2^-8).
    _assert_scaled(grad, want_grad, 1e-2, "dlogits")


# ----------------------------------------------------------------------------- linear_logprobs


def _dyadic_head(rows=5, vocab=300, hidden=24, seed=1):
    """Hidden states and an LM head of small dyadic values (every logit exact in float32 in any
    summation order) where ids 0 and 1 share the same head row, so they tie at every row's
    maximum or below it, and the first row's maximum is at ids 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    hidden_states = torch.randint(-3, 4, (rows, hidden), generator=g).float() / 4
    head = torch.randint(-3, 4, (vocab, hidden), generator=g).float() / 4
    head[0] = torch.sign(hidden_states[0]) * 3 / 4  # the largest dot any row of this head gives
    head[1] = head[0]
    return hidden_states.to(DEVICE), head.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [2.0**-17, 1.0])
def test_linear_logprobs_near_the_maximum(backend, temperature):
    """At T = 2^-17 (|z| ~ 1e6) the tied top ids of the first row are log 1/2 (was -0.75 for
    -0.693 at T = 1e-5); every log-probability, the LSE, the entropy and the gradients equal
    float64 log_softmax's."""
    h, w = _dyadic_head()
    targets = torch.tensor([[0, 1, 2]] * h.shape[0], device=DEVICE)
    leaves = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    result = _run(backend, alignkern.linear_logprobs, *leaves, targets, temperature=temperature,
                  stats=("entropy",))
    want, want_lse = oracles.linear_logprobs(h.cpu(), w.cpu(), targets.cpu(), None, temperature)
    torch.testing.assert_close(result.logprobs.double().cpu(), want, rtol=1e-6, atol=1e-6)
    if temperature < 1:  # the two tied ids hold all the mass
        assert abs(float(result.logprobs[0, 0]) + LOG2) < 1e-6
    torch.testing.assert_close(result.lse.double().cpu(), want_lse, rtol=1e-7, atol=1e-6)
    logits64 = oracles.linear_logits(h.cpu(), w.cpu())
    torch.testing.assert_close(result.entropy.double().cpu(),
                               oracles.entropy(logits64, temperature), rtol=1e-6, atol=1e-6)
    g = torch.randn(result.logprobs.shape, device=DEVICE)
    g_entropy = torch.randn(result.entropy.shape, device=DEVICE)
    grads = torch.autograd.grad((result.logprobs, result.entropy), leaves, (g, g_entropy))

    def loss64(hh, ww):
        logits = oracles.linear_logits(hh, ww)
        return (oracles.token_logprobs(logits, targets.cpu(), temperature)[0],
                oracles.entropy(logits, temperature))

    for got, want_grad, name in zip(grads, _grad64(loss64, [h, w], [g, g_entropy]),
                                    ("dhidden", "dweight")):
        _assert_scaled(got, want_grad, 1e-5, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_kl_of_shifted_logits_is_zero(backend):
    """The reference's logits are the policy's plus a constant per row (an extra hidden unit), so
    KL = 0 exactly; at T = 2^-17 the two log-sum-exps differ by ~1e6 and rounding each to one
    float32 left an error of the order of its spacing (0.06)."""
    h, w = _dyadic_head()
    shift = torch.arange(1, h.shape[0] + 1, device=DEVICE, dtype=torch.float32)[:, None] / 4
    ref_h = torch.cat([h, shift], 1)
    ref_w = torch.cat([w, torch.full((w.shape[0], 1), 2.0, device=DEVICE)], 1)
    leaf = h.clone().requires_grad_(True)
    kl = _run(backend, alignkern.losses.linear_kl, leaf, w, ref_h, ref_w, temperature=2.0**-17)
    want = oracles.kl(oracles.linear_logits(h.cpu(), w.cpu()),
                      oracles.linear_logits(ref_h.cpu(), ref_w.cpu()), 2.0**-17)
    assert float(want.abs().max()) < 1e-9
    torch.testing.assert_close(kl.double().cpu(), want, rtol=0, atol=1e-6)
    # The gradient of KL at its minimum is 0.
    (grad,) = torch.autograd.grad(kl.sum(), leaf)
    assert float(grad.abs().max()) < 1e-3
