"""alignkern.losses against independent float64 formulas, brute force and the unfused composition."""

from __future__ import annotations

import itertools
import math
import warnings

import oracles
import pytest
import torch
from conftest import DEVICE, available_backends
from test_linear_logprobs import _cpu_backward_path

import alignkern
from alignkern import losses, reference

BACKENDS = available_backends()


def _scaled_error(actual, expected):
    return ((actual.double().cpu() - expected.cpu()).abs().max()
            / expected.abs().max().clamp(min=1e-30)).item()


def _sigmoid_log(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ----------------------------------------------------------------------------- Bradley-Terry, DPO


def test_bradley_terry_matches_formula_and_gradients():
    chosen = torch.randn(7, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(7, dtype=torch.float64, requires_grad=True)
    out = losses.bradley_terry_loss(chosen, rejected, margin=0.3, reduction="none")
    expected = [-_sigmoid_log(c - r - 0.3) for c, r in zip(chosen.tolist(), rejected.tolist())]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    grad = torch.randn(7, dtype=torch.float64)
    dc, dr = torch.autograd.grad(out, (chosen, rejected), grad)
    sig = torch.sigmoid(-(chosen - rejected - 0.3)).detach()
    torch.testing.assert_close(dc, -grad * sig)
    torch.testing.assert_close(dr, grad * sig)
    torch.testing.assert_close(losses.bradley_terry_loss(chosen, rejected, margin=0.3),
                               out.mean())


@pytest.mark.parametrize(("loss_type", "smoothing"), [("sigmoid", "trl"), ("sigmoid", "cdpo"),
                                                      ("robust", "trl"), ("hinge", "trl"),
                                                      ("ipo", "trl")])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_loss_matches_trl_formulas(loss_type, smoothing, label_smoothing):
    """Hand-written formulas for four types (tests/test_dpo_trl_parity.py holds every type
    against TRL's own trainer code). Sigmoid takes no label smoothing by default, as TRL 1.16;
    cDPO's smoothing (alignkern's default before) is ``smoothing="cdpo"``. IPO normalises by the
    completion lengths."""
    pc, pr, rc, rr = (torch.randn(6, dtype=torch.float64, requires_grad=i < 2) for i in range(4))
    lc = torch.randint(0, 5, (6,))
    lr = torch.randint(1, 5, (6,))
    beta = 0.3
    options = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                   reduction="none", smoothing=smoothing, chosen_lengths=lc, rejected_lengths=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # smoothing that reaches no loss type
        result = losses.dpo_loss(pc, pr, rc, rr, **options)
    for i in range(6):
        h = (pc[i] - rc[i] - (pr[i] - rr[i])).item()
        ls = label_smoothing
        cdpo = -(1 - ls) * _sigmoid_log(beta * h) - ls * _sigmoid_log(-beta * h)
        h_ipo = (pc[i] - rc[i]).item() / max(lc[i].item(), 1) - (pr[i] - rr[i]).item() / lr[i].item()
        want = {
            "sigmoid": cdpo if smoothing == "cdpo" else -_sigmoid_log(beta * h),
            "robust": (-(1 - ls) * _sigmoid_log(beta * h) + ls * _sigmoid_log(-beta * h))
            / (1 - 2 * ls),
            "hinge": max(0.0, 1 - beta * h),
            "ipo": (h_ipo - 1 / (2 * beta)) ** 2,
        }[loss_type]
        assert result.loss[i].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert result.chosen_rewards[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item())
        assert result.rejected_rewards[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item())
    torch.testing.assert_close(result.margins, result.chosen_rewards - result.rejected_rewards)
    assert torch.equal(result.accuracies,
                       (result.chosen_rewards > result.rejected_rewards).double())
    assert not result.chosen_rewards.requires_grad
    grad = torch.randn(6, dtype=torch.float64)
    got = torch.autograd.grad(result.loss, (pc, pr), grad)
    numeric = [x.detach().clone().requires_grad_(True) for x in (pc, pr)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        again = losses.dpo_loss(*numeric, rc, rr, **options)
        want = torch.autograd.grad(again.loss, numeric, grad)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        assert torch.autograd.gradcheck(
            lambda a, b: losses.dpo_loss(a, b, rc, rr, **options).loss,
            (pc.detach().requires_grad_(True), pr.detach().requires_grad_(True)),
        )


def test_dpo_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\), got 0.5 \(robust"):
        losses.dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="loss_type must be one of.*got 'kto'"):
        losses.dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match=r"shapes must match.*policy_rejected \(4,\)"):
        losses.dpo_loss(x, torch.zeros(4), x, x)
    with pytest.raises(ValueError, match="reduction must be one of"):
        losses.dpo_loss(x, x, x, x, reduction="avg")
    with pytest.raises(ValueError, match="beta must be positive"):
        losses.dpo_loss(x, x, x, x, beta=0.0)


# ----------------------------------------------------------------------------- fused DPO


def _dpo_inputs(batch=3, length=6, hidden=24, vocab=97, dtype=torch.float32):
    h = torch.randn(2 * batch, length, hidden, dtype=dtype, device=DEVICE)
    w = (torch.randn(vocab, hidden, dtype=dtype) / hidden**0.5).to(DEVICE)
    targets = torch.randint(0, vocab, (2 * batch, length), device=DEVICE)
    mask = torch.rand(2 * batch, length, device=DEVICE) > 0.2
    return h, w, targets, mask


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_fused_linear_dpo_matches_the_unfused_composition(loss_type):
    h, w, targets, mask = _dpo_inputs()
    ref_h, ref_w = h + 0.1 * torch.randn_like(h), w + 0.05 * torch.randn_like(w)
    leaves = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    fused = losses.fused_linear_dpo_loss(*leaves, targets, mask, ref_hidden=ref_h,
                                         ref_weight=ref_w, beta=0.2, loss_type=loss_type,
                                         average_log_prob=loss_type == "ipo")
    grads = torch.autograd.grad(fused.loss, leaves)

    dl = [h.double().requires_grad_(True), w.double().requires_grad_(True)]
    reduction = "mean" if loss_type == "ipo" else "sum"
    policy = reference.sequence_logprobs(*dl, targets, mask, reduction=reduction)
    ref = reference.sequence_logprobs(ref_h.double(), ref_w.double(), targets, mask,
                                      reduction=reduction)
    ones = torch.ones(3)  # average_log_prob: the log-likelihoods are already per token
    unfused = losses.dpo_loss(policy[:3], policy[3:], ref[:3], ref[3:], beta=0.2,
                              loss_type=loss_type, chosen_lengths=ones, rejected_lengths=ones)
    want = torch.autograd.grad(unfused.loss, dl)
    torch.testing.assert_close(fused.loss.double(), unfused.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.margins.double(), unfused.margins, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_fused_linear_dpo_lengths_count_the_scored_tokens():
    """ipo normalises by the completion length: the tokens sequence_logprobs sums, i.e. inside the
    mask and not ignore_index, also when there is no mask."""
    h, w, targets, _ = _dpo_inputs()
    targets = targets.clone()
    targets[0, :2] = -100
    targets[4, -1] = -100
    fused = losses.fused_linear_dpo_loss(h, w, targets, None, ref_logps=torch.zeros(6, device=DEVICE),
                                         beta=0.2, loss_type="ipo", reduction="none")
    counted = (targets != -100).sum(-1).to(torch.float32)
    assert counted.tolist() != [targets.shape[1]] * 6  # the ignored targets change the counts
    policy = alignkern.sequence_logprobs(h, w, targets)
    zero = torch.zeros(3, device=DEVICE)
    want = losses.dpo_loss(policy[:3], policy[3:], zero, zero, beta=0.2,
                           loss_type="ipo", reduction="none", chosen_lengths=counted[:3],
                           rejected_lengths=counted[3:])
    torch.testing.assert_close(fused.loss, want.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("loss_type", "label_smoothing"), [("sigmoid", 0.1), ("robust", 0.2),
                                                            ("hinge", 0.0)])
def test_fused_linear_dpo_per_pair_gradients_with_random_upstream(backend, loss_type,
                                                                  label_smoothing):
    """reduction="none" with a random gradient per pair: the bug class where a fused loss
    precomputes gradients for a scalar loss and gets per-example weights wrong. Sigmoid with
    label smoothing is cDPO's, an explicit option since the default follows TRL 1.16."""
    smoothing = "cdpo" if loss_type == "sigmoid" else "trl"
    h, w, targets, mask = _dpo_inputs(batch=2, length=5, vocab=61)
    ref_logps = -10 * torch.rand(4, device=DEVICE)
    leaves = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    with alignkern.use_backend(backend):
        fused = losses.fused_linear_dpo_loss(*leaves, targets, mask, ref_logps=ref_logps,
                                             beta=0.5, loss_type=loss_type,
                                             label_smoothing=label_smoothing, reduction="none",
                                             smoothing=smoothing)
    grad = torch.randn(2, device=DEVICE)
    got = torch.autograd.grad(fused.loss, leaves, grad)

    dl = [h.double().requires_grad_(True), w.double().requires_grad_(True)]
    policy = reference.sequence_logprobs(*dl, targets, mask)
    ref = ref_logps.double()
    unfused = losses.dpo_loss(policy[:2], policy[2:], ref[:2], ref[2:], beta=0.5,
                              loss_type=loss_type, label_smoothing=label_smoothing,
                              reduction="none", smoothing=smoothing)
    want = torch.autograd.grad(unfused.loss, dl, grad.double())
    assert fused.loss.shape == (2,) and fused.loss.dtype == torch.float32
    torch.testing.assert_close(fused.loss.double(), unfused.loss, rtol=1e-5, atol=1e-5)
    for g, r in zip(got, want):
        assert _scaled_error(g, r) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logit_scale", [0.0625, 0.25, 2.5])
def test_fused_linear_dpo_logit_scale_on_both_sides(backend, logit_scale):
    """logit_scale reaches the policy and the ref_hidden/ref_weight side alike: loss, margins and
    gradients match the float64 reference composition with the scale on both sides."""
    h, w, targets, mask = _dpo_inputs(vocab=61)
    ref_h, ref_w = h + 0.1 * torch.randn_like(h), w + 0.05 * torch.randn_like(w)
    leaves = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    with alignkern.use_backend(backend):
        fused = losses.fused_linear_dpo_loss(*leaves, targets, mask, ref_hidden=ref_h,
                                             ref_weight=ref_w, beta=0.2, reduction="none",
                                             logit_scale=logit_scale)
    grad = torch.randn(3, device=DEVICE)
    got = torch.autograd.grad(fused.loss, leaves, grad)

    dl = [h.double().requires_grad_(True), w.double().requires_grad_(True)]
    policy = reference.sequence_logprobs(*dl, targets, mask, logit_scale=logit_scale)
    ref = reference.sequence_logprobs(ref_h.double(), ref_w.double(), targets, mask,
                                      logit_scale=logit_scale)
    unfused = losses.dpo_loss(policy[:3], policy[3:], ref[:3], ref[3:], beta=0.2,
                              reduction="none")
    want = torch.autograd.grad(unfused.loss, dl, grad.double())
    torch.testing.assert_close(fused.loss.double(), unfused.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.margins.double(), unfused.margins, rtol=1e-5, atol=1e-6)
    for g, r in zip(got, want):
        assert _scaled_error(g, r) < 1e-4


def test_fused_linear_dpo_with_precomputed_reference_and_errors():
    h, w, targets, mask = _dpo_inputs()
    ref_logps = torch.randn(6, device=DEVICE)
    out = losses.fused_linear_dpo_loss(h, w, targets, mask, ref_logps=ref_logps,
                                       reduction="none")
    policy = alignkern.sequence_logprobs(h, w, targets, mask)
    expected = losses.dpo_loss(policy[:3], policy[3:], ref_logps[:3], ref_logps[3:],
                               reduction="none")
    torch.testing.assert_close(out.loss, expected.loss)
    with pytest.raises(ValueError, match="exactly one of ref_logps or ref_hidden"):
        losses.fused_linear_dpo_loss(h, w, targets, mask)
    with pytest.raises(ValueError, match=r"hidden must be \(2B, T, H\)"):
        losses.fused_linear_dpo_loss(h[:5], w, targets[:5], mask[:5], ref_logps=ref_logps[:5])
    with pytest.raises(ValueError, match=r"ref_logps must have shape \(6,\), got \(4,\)"):
        losses.fused_linear_dpo_loss(h, w, targets, mask, ref_logps=torch.zeros(4))


# ----------------------------------------------------------------------------- Plackett-Luce


def _brute_force_plackett_luce(scores, rewards, mask):
    """-log of the product of sequential softmax choices, in the order of decreasing reward
    (ties: lower index first), over the candidates the mask keeps."""
    kept = [i for i in range(len(scores)) if mask[i]]
    order = sorted(kept, key=lambda i: (-rewards[i], i))
    total = 0.0
    for position, chosen in enumerate(order):
        remaining = order[position:]
        top = max(scores[j] for j in remaining)
        total += -(scores[chosen] - top - math.log(sum(math.exp(scores[j] - top)
                                                        for j in remaining)))
    return total


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_plackett_luce_matches_brute_force_with_ties_and_masks(n):
    torch.manual_seed(n)
    scores = torch.randn(4, n, dtype=torch.float64, requires_grad=True)
    rewards = torch.randint(0, 3, (4, n)).double()  # ties
    mask = torch.rand(4, n) > 0.3
    mask[0] = True
    out = losses.plackett_luce_loss(scores, rewards, mask, reduction="none")
    for b in range(4):
        want = _brute_force_plackett_luce(scores[b].tolist(), rewards[b].tolist(),
                                          mask[b].tolist())
        assert out[b].item() == pytest.approx(want, rel=1e-10, abs=1e-10)
    grad = torch.randn(4, dtype=torch.float64)
    (got,) = torch.autograd.grad(out, scores, grad)
    assert (got[~mask] == 0).all(), "masked candidates get no gradient"
    assert torch.autograd.gradcheck(
        lambda s: losses.plackett_luce_loss(s, rewards, mask, reduction="none"),
        (scores.detach().requires_grad_(True),))


def test_plackett_luce_every_permutation_probability_sums_to_one():
    """exp(-loss) over all orderings of 4 candidates is a probability distribution."""
    scores = torch.randn(4, dtype=torch.float64)
    total = sum(math.exp(-losses.plackett_luce_loss(scores, torch.tensor(perm).double()).item())
                for perm in itertools.permutations(range(4)))
    assert total == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("n", [64, 333])
def test_plackett_luce_matches_the_pairwise_definition(n):
    """Against reference.plackett_luce_loss (no sort: an (N, N) "still available" mask), float64,
    graded rewards with many ties, a random mask, a random upstream gradient."""
    torch.manual_seed(n)
    scores = torch.randn(5, n, dtype=torch.float64, requires_grad=True)
    rewards = torch.randint(0, 6, (5, n)).double()
    mask = torch.rand(5, n) > 0.2
    out = losses.plackett_luce_loss(scores, rewards, mask, reduction="none")
    want = reference.plackett_luce_loss(scores, rewards, mask)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-9)
    grad = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(out, scores, grad)[0],
                               torch.autograd.grad(want, scores, grad)[0], rtol=1e-10, atol=1e-12)


def test_plackett_luce_4096_candidates_take_linear_memory():
    """B = 8 lists of N = 4096: anything pairwise allocates 8 * 4096^2 * 4 bytes = 512 MiB per
    (B, N, N) tensor; the sort-based loss holds a few (B, N) buffers."""
    from alignkern.bench import measure

    scores = torch.randn(8, 4096, requires_grad=True)
    rewards = torch.randint(0, 10, (8, 4096)).float()

    def step():
        loss = losses.plackett_luce_loss(scores, rewards)
        return torch.autograd.grad(loss, scores)

    peak = measure.peak_memory_bytes(step, torch.device("cpu"), cpu_method="profiler")
    assert peak < 16 * 2**20, f"forward+backward allocated {peak / 2**20:.1f} MiB"
    (grad,) = step()
    assert torch.isfinite(grad).all()


def test_plackett_luce_nan_reward_gives_nan_loss_for_its_list_only():
    scores = torch.randn(3, 4, requires_grad=True)
    rewards = torch.tensor([[1.0, math.nan, 0.0, 2.0], [1.0, 2.0, 3.0, 4.0],
                            [math.nan, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[True] * 4, [True] * 4, [False, True, True, True]])
    out = losses.plackett_luce_loss(scores, rewards, mask, reduction="none")
    assert math.isnan(out[0].item()), "a kept candidate with a NaN reward leaves no ordering"
    assert math.isfinite(out[1].item()) and math.isfinite(out[2].item()), "masked NaN is ignored"
    torch.testing.assert_close(out, reference.plackett_luce_loss(scores, rewards, mask),
                               equal_nan=True)
    (grad,) = torch.autograd.grad(out[1:].sum(), scores)
    assert (grad[0] == 0).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_losses_compute_in_float32_for_half_inputs(dtype):
    scores = torch.randn(3, 9).to(dtype).requires_grad_(True)
    rewards = torch.randn(3, 9)
    out = losses.plackett_luce_loss(scores, rewards, reduction="none")
    assert out.dtype == torch.float32
    want = reference.plackett_luce_loss(scores.detach().double(), rewards.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), scores)
    assert grad.dtype == dtype
    chosen, rejected = scores[:, 0], scores[:, 1]
    assert losses.bradley_terry_loss(chosen, rejected).dtype == torch.float32
    assert losses.dpo_loss(chosen, rejected, chosen, rejected).loss.dtype == torch.float32


def test_plackett_luce_errors():
    with pytest.raises(ValueError, match=r"shapes must match, got scores \(2, 3\), rewards \(2, 4\)"):
        losses.plackett_luce_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"scores must be \(N,\) or \(B, N\)"):
        losses.plackett_luce_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))


# ----------------------------------------------------------------------------- SCoRe and metrics


def test_score_shaping():
    r1, r2 = torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(losses.score_shaping(r1, r2, alpha=10.0),
                               torch.tensor([11.0, 1.0, -10.0, 0.0]))


def test_self_correction_metrics():
    r1 = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0])
    r2 = torch.tensor([1, 1, 0, 0, 1, 1, 0, 1])
    m = losses.self_correction_metrics(r1, r2)
    assert m.acc_t1.item() == pytest.approx(3 / 8) and m.acc_t2.item() == pytest.approx(5 / 8)
    assert m.delta.item() == pytest.approx(2 / 8)
    assert m.delta_i_to_c.item() == pytest.approx(3 / 8)
    assert m.delta_c_to_i.item() == pytest.approx(1 / 8)
    assert m.delta.item() == pytest.approx(m.delta_i_to_c.item() - m.delta_c_to_i.item())
    with pytest.raises(ValueError, match="r2 must be a non-empty tensor of correctness values"):
        losses.self_correction_metrics(r1.float(), r2.float() * 0.5)


def test_preference_distinguishability():
    torch.manual_seed(1)
    positive = torch.randn(50, 3, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]) + 3.0
    negative = torch.randn(70, 3, dtype=torch.float64)
    features = torch.cat([positive, negative])
    labels = torch.cat([torch.ones(50), torch.zeros(70)]).bool()
    d = losses.preference_distinguishability(features, labels)
    cov = [torch.cov(x.T, correction=0) for x in (positive, negative)]
    assert d.mean_distance.item() == pytest.approx(
        (positive.mean(0) - negative.mean(0)).norm().item())
    assert d.concentration.item() == pytest.approx(
        max(torch.linalg.eigvalsh(c).max().item() for c in cov))
    assert d.trace.item() == pytest.approx(max(c.trace().item() for c in cov))
    with pytest.raises(ValueError, match="labels must contain both classes"):
        losses.preference_distinguishability(features, torch.ones(120).bool())
    with pytest.raises(ValueError, match=r"features must be \(N, d\) and labels \(N,\)"):
        losses.preference_distinguishability(features, labels[:5])


# ----------------------------------------------------------------------------- bad and unusual input


def _pair(n=4, dtype=torch.float32):
    return torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)


def _fused_call(**kw):
    h, w, targets, mask = _dpo_inputs(batch=2, length=3, hidden=8, vocab=11)
    kw.setdefault("ref_logps", torch.randn(4, device=DEVICE))
    return losses.fused_linear_dpo_loss(h, w, targets, mask, **kw)


def _distinguishability_inputs(dtype=torch.float64):
    torch.manual_seed(3)
    features = (torch.randn(12, 3, dtype=torch.float64) * 4).round().to(dtype)
    return features, torch.arange(12) % 3 == 0


x4, y4 = torch.zeros(4), torch.ones(4)
LIST = [0.0, 1.0, 0.0, 1.0]
NON_TENSOR_CASES = {
    "bradley_terry_loss: chosen": lambda: losses.bradley_terry_loss(LIST, x4),
    "bradley_terry_loss: rejected": lambda: losses.bradley_terry_loss(x4, LIST),
    "dpo_loss: policy_chosen": lambda: losses.dpo_loss(LIST, x4, x4, x4),
    "dpo_loss: policy_rejected": lambda: losses.dpo_loss(x4, LIST, x4, x4),
    "dpo_loss: ref_chosen": lambda: losses.dpo_loss(x4, x4, LIST, x4),
    "dpo_loss: ref_rejected": lambda: losses.dpo_loss(x4, x4, x4, 0.5),
    "fused_linear_dpo_loss: ref_logps": lambda: _fused_call(ref_logps=LIST),
    "plackett_luce_loss: scores": lambda: losses.plackett_luce_loss(LIST, x4),
    "plackett_luce_loss: rewards": lambda: losses.plackett_luce_loss(x4, LIST),
    "plackett_luce_loss: mask": lambda: losses.plackett_luce_loss(x4, y4, [True] * 4),
    "score_shaping: r1": lambda: losses.score_shaping(LIST, x4, alpha=1.0),
    "score_shaping: r2": lambda: losses.score_shaping(x4, LIST, alpha=1.0),
    "self_correction_metrics: r1": lambda: losses.self_correction_metrics(LIST, y4),
    "self_correction_metrics: r2": lambda: losses.self_correction_metrics(y4, (1, 0, 1, 0)),
    "preference_distinguishability: features":
        lambda: losses.preference_distinguishability([[0.0], [1.0]], torch.tensor([True, False])),
    "preference_distinguishability: labels":
        lambda: losses.preference_distinguishability(torch.zeros(4, 2), [1, 0, 1, 0]),
}


@pytest.mark.parametrize("where", NON_TENSOR_CASES)
def test_non_tensor_inputs_raise_type_error_naming_the_argument(where):
    with pytest.raises(TypeError, match=rf"^{where} must be a torch.Tensor, got (list|tuple|float)"):
        NON_TENSOR_CASES[where]()


c4 = torch.zeros(4, dtype=torch.complex64)
REAL_FLOAT = r"must be a real floating-point tensor, got torch.complex(64|128)"
REAL = r"must be a real tensor \(floating-point, integer or bool\), got torch.complex(64|128)"
COMPLEX_CASES = {
    "bradley_terry_loss: chosen": (REAL_FLOAT, lambda: losses.bradley_terry_loss(c4, c4)),
    "dpo_loss: ref_rejected": (REAL_FLOAT, lambda: losses.dpo_loss(x4, x4, x4, c4)),
    "fused_linear_dpo_loss: ref_logps": (REAL_FLOAT, lambda: _fused_call(ref_logps=c4)),
    "plackett_luce_loss: scores": (REAL_FLOAT, lambda: losses.plackett_luce_loss(c4, x4)),
    "plackett_luce_loss: rewards": (REAL, lambda: losses.plackett_luce_loss(x4, c4)),
    "plackett_luce_loss: mask": (REAL, lambda: losses.plackett_luce_loss(x4, y4, c4 + 1)),
    "score_shaping: r2": (REAL, lambda: losses.score_shaping(x4, c4, alpha=1.0)),
    "self_correction_metrics: r1": (REAL, lambda: losses.self_correction_metrics(c4, y4)),
    "preference_distinguishability: features":
        (REAL, lambda: losses.preference_distinguishability(torch.zeros(4, 2, dtype=torch.complex128),
                                                            torch.tensor([1, 0, 1, 0]))),
    "preference_distinguishability: labels":
        (REAL, lambda: losses.preference_distinguishability(torch.zeros(4, 2), c4)),
}


@pytest.mark.parametrize("where", COMPLEX_CASES)
def test_complex_inputs_are_refused(where):
    expected, call = COMPLEX_CASES[where]
    with pytest.raises(TypeError, match=rf"^{where} {expected}"):
        call()


def test_integer_scores_are_refused_where_losses_want_floats():
    with pytest.raises(TypeError, match="^bradley_terry_loss: chosen must be a real floating-point "
                                        "tensor, got torch.int64"):
        losses.bradley_terry_loss(torch.arange(3), torch.arange(3))
    with pytest.raises(TypeError, match="^dpo_loss: policy_chosen must be a real floating-point"):
        losses.dpo_loss(torch.ones(3, dtype=torch.int32), *torch.zeros(3, 3))


def test_integer_and_bool_correctness_labels_and_ranks_stay_allowed():
    r1 = torch.tensor([True, False, False, True])
    r2 = torch.tensor([True, True, False, False])
    m = losses.self_correction_metrics(r1, r2)
    assert m == losses.self_correction_metrics(r1.long(), r2.float())
    torch.testing.assert_close(losses.score_shaping(r1, r2, alpha=2.0),
                               losses.score_shaping(r1.float(), r2.float(), alpha=2.0))
    torch.testing.assert_close(losses.score_shaping(r1.int(), r2.int(), alpha=2.0),
                               torch.tensor([1.0, 3.0, 0.0, -2.0]))
    scores = torch.randn(2, 5, dtype=torch.float64)
    ranks = torch.randint(0, 3, (2, 5))
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]])
    torch.testing.assert_close(losses.plackett_luce_loss(scores, ranks, mask, reduction="none"),
                               losses.plackett_luce_loss(scores, ranks.double(), mask.bool(),
                                                         reduction="none"))


SCALAR_CASES = {
    "dpo beta str": (TypeError, r"dpo_loss: beta must be a real number, got str '0.1'",
                     lambda: losses.dpo_loss(x4, x4, x4, x4, beta="0.1")),
    "dpo beta bool": (TypeError, r"dpo_loss: beta must be a real number, got bool True",
                      lambda: losses.dpo_loss(x4, x4, x4, x4, beta=True)),
    "dpo beta tensor": (TypeError, r"dpo_loss: beta must be a real number, got a torch.float32",
                        lambda: losses.dpo_loss(x4, x4, x4, x4, beta=torch.tensor(0.1))),
    "dpo beta inf": (ValueError, r"dpo_loss: beta must be positive and finite, got inf",
                     lambda: losses.dpo_loss(x4, x4, x4, x4, beta=math.inf)),
    "dpo beta nan": (ValueError, r"dpo_loss: beta must be positive and finite, got nan",
                     lambda: losses.dpo_loss(x4, x4, x4, x4, beta=math.nan)),
    "dpo beta overflows float32": (
        ValueError, r"dpo_loss: beta must be at most 3.403e\+38 in magnitude .*got 1e\+39",
        lambda: losses.dpo_loss(x4, x4, x4, x4, beta=1e39)),
    "dpo label_smoothing str": (
        TypeError, r"dpo_loss: label_smoothing must be a real number, got str",
        lambda: losses.dpo_loss(x4, x4, x4, x4, label_smoothing="0")),
    "dpo label_smoothing bool": (
        TypeError, r"dpo_loss: label_smoothing must be a real number, got bool",
        lambda: losses.dpo_loss(x4, x4, x4, x4, label_smoothing=True)),
    "dpo label_smoothing nan": (
        ValueError, r"dpo_loss: label_smoothing must be a finite number, got nan",
        lambda: losses.dpo_loss(x4, x4, x4, x4, label_smoothing=math.nan)),
    "dpo loss_type not a str": (
        TypeError, r"dpo_loss: loss_type must be one of 'sigmoid', .*got int 1",
        lambda: losses.dpo_loss(x4, x4, x4, x4, loss_type=1)),
    "dpo reduction not a str": (
        TypeError, r"dpo_loss: reduction must be one of 'mean', .*got None",
        lambda: losses.dpo_loss(x4, x4, x4, x4, reduction=None)),
    "bt margin str": (TypeError, r"bradley_terry_loss: margin must be a real number, got str",
                      lambda: losses.bradley_terry_loss(x4, x4, margin="0.3")),
    "bt margin tensor": (TypeError, r"bradley_terry_loss: margin must be a real number, got a",
                         lambda: losses.bradley_terry_loss(x4, x4, margin=torch.tensor(0.3))),
    "bt margin inf": (ValueError, r"bradley_terry_loss: margin must be a finite number, got -inf",
                      lambda: losses.bradley_terry_loss(x4, x4, margin=-math.inf)),
    "bt reduction": (TypeError, r"bradley_terry_loss: reduction must be one of .*got int 0",
                     lambda: losses.bradley_terry_loss(x4, x4, reduction=0)),
    "pl reduction": (TypeError, r"plackett_luce_loss: reduction must be one of .*got bool",
                     lambda: losses.plackett_luce_loss(x4, x4, reduction=True)),
    "shaping alpha None": (TypeError, r"score_shaping: alpha must be a real number, got None",
                           lambda: losses.score_shaping(x4, y4, alpha=None)),
    "shaping alpha nan": (ValueError, r"score_shaping: alpha must be a finite number, got nan",
                          lambda: losses.score_shaping(x4, y4, alpha=math.nan)),
    "fused beta inf": (ValueError, r"fused_linear_dpo_loss: beta must be positive and finite",
                       lambda: _fused_call(beta=math.inf)),
    "fused average_log_prob str": (
        TypeError, r"fused_linear_dpo_loss: average_log_prob must be True or False, got str 'no'",
        lambda: _fused_call(average_log_prob="no")),
    "fused average_log_prob int": (
        TypeError, r"fused_linear_dpo_loss: average_log_prob must be True or False, got int 1",
        lambda: _fused_call(average_log_prob=1)),
    "fused logit_scale zero": (
        ValueError, r"fused_linear_dpo_loss: logit_scale must be positive and finite, got 0.0",
        lambda: _fused_call(logit_scale=0.0)),
    "fused logit_scale nan": (
        ValueError, r"fused_linear_dpo_loss: logit_scale must be positive and finite, got nan",
        lambda: _fused_call(logit_scale=math.nan)),
    "fused logit_scale bool": (
        TypeError, r"fused_linear_dpo_loss: logit_scale must be a real number, got bool True",
        lambda: _fused_call(logit_scale=True)),
    "fused logit_scale tensor": (
        TypeError, r"fused_linear_dpo_loss: logit_scale must be a real number, got a",
        lambda: _fused_call(logit_scale=torch.tensor(2.0))),
}


@pytest.mark.parametrize("case", SCALAR_CASES)
def test_scalar_arguments_get_clear_errors(case):
    error, message, call = SCALAR_CASES[case]
    with pytest.raises(error, match="^" + message):
        call()


NONE_CASES = {
    "bradley_terry_loss: chosen": lambda: losses.bradley_terry_loss(None, x4),
    "dpo_loss: ref_chosen": lambda: losses.dpo_loss(x4, x4, None, x4),
    "plackett_luce_loss: rewards": lambda: losses.plackett_luce_loss(x4, None),
    "score_shaping: r2": lambda: losses.score_shaping(x4, None, alpha=1.0),
    "self_correction_metrics: r1": lambda: losses.self_correction_metrics(None, y4),
}


@pytest.mark.parametrize("where", NONE_CASES)
def test_a_required_tensor_given_as_none_is_a_type_error(where):
    """None was skipped as if the argument were optional, and the loss then failed with a raw
    AttributeError ('NoneType' object has no attribute 'dtype')."""
    with pytest.raises(TypeError, match=rf"^{where} must be a torch.Tensor, got None"):
        NONE_CASES[where]()


HUGE = 10**400  # an int that float() refuses with a bare OverflowError
HUGE_CASES = {
    "dpo_loss: beta": lambda: losses.dpo_loss(x4, x4, x4, x4, beta=HUGE),
    "dpo_loss: label_smoothing": lambda: losses.dpo_loss(x4, x4, x4, x4, label_smoothing=HUGE),
    "dpo_loss: discopop_tau": lambda: losses.dpo_loss(x4, x4, x4, x4, discopop_tau=-HUGE),
    "bradley_terry_loss: margin": lambda: losses.bradley_terry_loss(x4, x4, margin=HUGE),
    "score_shaping: alpha": lambda: losses.score_shaping(x4, y4, alpha=HUGE),
    "fused_linear_dpo_loss: logit_scale": lambda: _fused_call(logit_scale=HUGE),
}


@pytest.mark.parametrize("where", HUGE_CASES)
def test_a_number_beyond_float_range_is_a_value_error(where):
    with pytest.raises(ValueError, match=rf"^{where} must be within float's range .*got int "
                                         rf"-?1000"):
        HUGE_CASES[where]()


def _fused_with(**replace):
    """fused_linear_dpo_loss with some of its inputs (hidden, weight, targets, mask, ref_hidden,
    ref_weight: B = 2, T = 3, H = 8, V = 11; the reference computed from ref_hidden, H' = 5)
    replaced."""
    h, w, targets, mask = _dpo_inputs(batch=2, length=3, hidden=8, vocab=11)
    args = dict(hidden=h, weight=w, targets=targets, mask=mask, ref_hidden=torch.randn(4, 3, 5),
                ref_weight=torch.randn(11, 5))
    args.update(replace)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return losses.fused_linear_dpo_loss(args.pop("hidden"), args.pop("weight"),
                                        args.pop("targets"), args.pop("mask"), **args)


FUSED_CASES = {
    "weight None": (TypeError, "weight must be a torch.Tensor, got None", dict(weight=None)),
    "weight H": (ValueError, r"weight must be the 2-D LM head \(V, H\) with H = 8, got shape "
                 r"\(11, 5\)", dict(weight=torch.randn(11, 5))),
    "targets float": (TypeError, "targets must be int32 or int64, got torch.float32",
                      dict(targets=torch.zeros(4, 3))),
    "targets shape": (ValueError, r"targets must have shape \(4, 3\) .*got \(4, 2\)",
                      dict(targets=torch.zeros(4, 2, dtype=torch.long))),
    "mask shape": (ValueError, r"mask must have shape \(4, 3\) .*got \(4, 1\)",
                   dict(mask=torch.ones(4, 1, dtype=torch.bool))),
    "ref_hidden rows": (ValueError, r"ref_hidden must have shape \(2B, T, H'\) with hidden's "
                        r"2B, T = \(4, 3\), got \(2, 3, 5\)", dict(ref_hidden=torch.randn(2, 3, 5))),
    "ref_weight H": (ValueError, r"ref_weight must be the 2-D LM head \(V, H\) with H = 5, got "
                     r"shape \(11, 8\)", dict(ref_weight=torch.randn(11, 8))),
}


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_linear_dpo_errors_name_fused_linear_dpo_loss(case):
    """They were raised by the sequence_logprobs inside (named so, or a raw AttributeError)."""
    error, message, replace = FUSED_CASES[case]
    _fused_with()  # the unchanged call runs
    with pytest.raises(error, match=rf"^fused_linear_dpo_loss: {message}"):
        _fused_with(**replace)


COMPLETION_CASES = {
    "targets list": (TypeError, "targets must be a torch.Tensor, got list", dict(targets=[[1, 2]])),
    "targets float": (TypeError, "targets must be int32 or int64, got torch.float32",
                      dict(targets=torch.zeros(2, 3))),
    "targets 1-D": (ValueError, r"targets must have shape \(rows, T\), got \(3,\)",
                    dict(targets=torch.zeros(3, dtype=torch.long))),
    "mask list": (TypeError, "mask must be a torch.Tensor, got list", dict(mask=[[True] * 3] * 2)),
    "mask shape": (ValueError, r"mask must have shape \(2, 3\) .*got \(2, 2\)",
                   dict(mask=torch.ones(2, 2, dtype=torch.bool))),
    "average_log_prob str": (TypeError, "average_log_prob must be True or False, got str 'no'",
                             dict(average_log_prob="no")),
    "ignore_index huge": (ValueError, "ignore_index must fit in int64, got 1180591620717411303424",
                          dict(ignore_index=2**70)),
    "ignore_index str": (TypeError, "ignore_index must be an integer, got str '-100'",
                         dict(ignore_index="-100")),
}


@pytest.mark.parametrize("case", COMPLETION_CASES)
def test_completion_lengths_checks_its_arguments(case):
    """Nothing was checked: an OverflowError for ignore_index=2**70, AttributeErrors for lists
    and strings, torch's broadcasting error for a mask of another shape."""
    error, message, replace = COMPLETION_CASES[case]
    args = dict(targets=torch.tensor([[1, -100, 2], [3, 4, -100]]),
                mask=torch.tensor([[True, True, False], [True, True, True]]))
    torch.testing.assert_close(losses.completion_lengths(**args), torch.tensor([1.0, 2.0]))
    with pytest.raises(error, match=rf"^completion_lengths: {message}"):
        losses.completion_lengths(**{**args, **replace})


def test_scalar_arguments_accept_ints_and_numpy_numbers():
    import numpy as np

    pc, pr = _pair(dtype=torch.float64)
    rc, rr = _pair(dtype=torch.float64)
    want = losses.dpo_loss(pc, pr, rc, rr, beta=2.0, label_smoothing=0.0)
    assert losses.dpo_loss(pc, pr, rc, rr, beta=2, label_smoothing=0).loss == want.loss
    assert losses.dpo_loss(pc, pr, rc, rr, beta=np.float32(2.0)).loss == want.loss
    torch.testing.assert_close(losses.bradley_terry_loss(pc, pr, margin=np.int64(1)),
                               losses.bradley_terry_loss(pc, pr, margin=1.0))


def test_mixed_devices_are_a_value_error():
    meta = torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match=r"^dpo_loss: all tensors must be on the same device, got "
                                         r"policy_chosen on cpu, .*ref_rejected on meta"):
        losses.dpo_loss(x4, x4, x4, meta)
    with pytest.raises(ValueError, match=r"^preference_distinguishability: all tensors must be on "
                                         r"the same device"):
        losses.preference_distinguishability(torch.zeros(4, 2), meta.bool())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, torch.int8])
def test_preference_distinguishability_computes_in_float32_for_half_and_integer_features(dtype):
    features, labels = _distinguishability_inputs(dtype)  # small integers: exact in every dtype
    got = losses.preference_distinguishability(features, labels)
    want = losses.preference_distinguishability(features.double(), labels)
    assert want.trace.dtype == torch.float64
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-6)


def test_preference_distinguishability_nan_features_give_nan_not_an_error():
    features, labels = _distinguishability_inputs()
    for row in (0, 1):  # a preferred row, then a rejected one
        bad = features.clone()
        bad[row, 1] = math.nan
        d = losses.preference_distinguishability(bad, labels)
        assert all(math.isnan(v.item()) for v in d), d
    bad = features.float()
    bad[0, 0] = math.inf
    d = losses.preference_distinguishability(bad, labels)
    assert math.isinf(d.mean_distance.item()) and math.isnan(d.concentration.item())


def test_preference_distinguishability_labels_must_be_bool_or_0_1():
    features, labels = _distinguishability_inputs()
    want = losses.preference_distinguishability(features, labels)
    assert losses.preference_distinguishability(features, labels.long()) == want
    assert losses.preference_distinguishability(features, labels.half()) == want
    for bad, shown in ((labels * 2, "2"), (labels * 0.5, "0.5"), (labels.double() - 1, "-1.0")):
        with pytest.raises(ValueError, match=rf"^preference_distinguishability: labels must be a "
                                             rf"non-empty tensor of labels \(bool or 0/1\), got a "
                                             rf"torch\.\w+ tensor of shape \(12,\) on cpu holding "
                                             rf"{shown}"):
            losses.preference_distinguishability(features, bad)


# ----------------------------------------------------------------------------- linear_kl

KL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def _kl_inputs(lead=(3, 7), hidden=40, ref_hidden=33, vocab=1029, dtype=torch.float32):
    h = torch.randn(*lead, hidden, dtype=torch.float64).to(dtype).to(DEVICE)
    w = (torch.randn(vocab, hidden, dtype=torch.float64) / 6).to(dtype).to(DEVICE)
    rh = torch.randn(*lead, ref_hidden, dtype=torch.float64).to(dtype).to(DEVICE)
    rw = (torch.randn(vocab, ref_hidden, dtype=torch.float64) / 6).to(dtype).to(DEVICE)
    return h, w, rh, rw


def _kl_reference_grads(h, w, rh, rw, grad, temperature=1.0, logit_scale=1.0):
    """float64 KL through plain torch.log_softmax (tests/oracles.py), and its gradients."""
    hd, wd = (x.detach().double().requires_grad_(True) for x in (h, w))
    kl = oracles.kl(oracles.linear_logits(hd, wd, logit_scale=logit_scale),
                    oracles.linear_logits(rh, rw, logit_scale=logit_scale), temperature)
    return kl, torch.autograd.grad(kl, (hd, wd), grad.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_linear_kl_matches_reference_with_random_upstream_gradient(backend, dtype):
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is not a GPU dtype here")
    h, w, rh, rw = _kl_inputs(dtype=dtype)
    leaves = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    with alignkern.use_backend(backend):
        kl = losses.linear_kl(*leaves, rh, rw, temperature=0.8)
    grad = torch.randn_like(kl)
    got = torch.autograd.grad(kl, leaves, grad)
    ref_kl, want = _kl_reference_grads(h, w, rh, rw, grad, temperature=0.8)
    assert kl.shape == (3, 7) and (kl > -1e-5).all()
    assert _scaled_error(kl, ref_kl) < 2e-5
    for g, r in zip(got, want):
        assert g.dtype == dtype
        assert _scaled_error(g, r) < KL_TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("logit_scale", [0.0625, 0.25, 2.5])
def test_linear_kl_logit_scale_on_both_sides(backend, dtype, logit_scale):
    """KL between softmax(s h W^T / T) and softmax(s h_ref W_ref^T / T), forward and the policy
    gradients under a random upstream gradient, against float64."""
    h, w, rh, rw = _kl_inputs(lead=(2, 7), vocab=300, dtype=dtype)
    w, rw = w * 3, rw * 3  # logits of order 3 before the scale
    leaves = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    with alignkern.use_backend(backend):
        kl = losses.linear_kl(*leaves, rh, rw, temperature=0.8, logit_scale=logit_scale)
    grad = torch.randn_like(kl)
    got = torch.autograd.grad(kl, leaves, grad)
    ref_kl, want = _kl_reference_grads(h, w, rh, rw, grad, temperature=0.8,
                                       logit_scale=logit_scale)
    assert _scaled_error(kl, ref_kl) < 2e-5
    for g, r in zip(got, want):
        assert g.dtype == dtype
        assert _scaled_error(g, r) < KL_TOL[dtype]


def test_linear_kl_logit_scale_errors():
    h, w, rh, rw = _kl_inputs(lead=(4,), vocab=50)
    for value in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="^linear_kl: logit_scale must be positive and finite"):
            losses.linear_kl(h, w, rh, rw, logit_scale=value)
    for value in (True, "2", torch.tensor(2.0)):
        with pytest.raises(TypeError, match="^linear_kl: logit_scale must be a real number"):
            losses.linear_kl(h, w, rh, rw, logit_scale=value)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "triton")])
@pytest.mark.parametrize("cpu_path", ["recompute", "kept"])
def test_linear_kl_many_tiles_mask_and_identity(backend, cpu_path, monkeypatch):
    """Many tiles in the forward and the recomputing backward, or (cpu, gradient kept) many
    vocabulary blocks of the kept direction in the backward."""
    if backend != "cpu" and cpu_path == "kept":
        pytest.skip("the cpu backend's choice")
    from alignkern.ops import linear_logprobs_cpu

    monkeypatch.setattr(linear_logprobs_cpu, "TILE_BYTES", 8 * 50 * 4)
    monkeypatch.setattr(linear_logprobs_cpu, "MAX_TILE_ROWS", 8)
    _cpu_backward_path(monkeypatch, cpu_path)
    h, w, rh, rw = _kl_inputs(lead=(37,))
    mask = torch.rand(37, device=DEVICE) > 0.3
    x = h.clone().requires_grad_(True)
    with alignkern.use_backend(backend):
        kl = losses.linear_kl(x, w, rh, rw, mask)
        same = losses.linear_kl(h, w, h, w)
    grad = torch.randn_like(kl)
    (got,) = torch.autograd.grad(kl, x, grad)
    ref_kl, (want, _) = _kl_reference_grads(h, w, rh, rw, grad * mask)
    assert _scaled_error(kl, torch.where(mask.cpu(), ref_kl.cpu(), 0.0)) < 2e-5
    assert _scaled_error(got, want) < 2e-5
    assert (got[~mask] == 0).all()
    assert same.abs().max() < 1e-5, "KL of a distribution with itself is 0"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logit_scale", [1.0, 0.25])
def test_linear_kl_opcheck_and_compile(backend, logit_scale):
    h, w, rh, rw = _kl_inputs(lead=(5,), vocab=50)
    torch.library.opcheck(torch.ops.alignkern.linear_kl.default,
                          (h.clone().requires_grad_(True), w.clone().requires_grad_(True), rh, rw,
                           0.9, logit_scale, False, backend))
    if backend == "cpu":  # the forward keeps the gradient's direction for the backward
        torch.library.opcheck(torch.ops.alignkern.linear_kl.default,
                              (h.clone().requires_grad_(True), w.clone().requires_grad_(True), rh,
                               rw, 0.9, logit_scale, True, backend))
    kl, row_max, log_sum, expect, *_ = torch.ops.alignkern.linear_kl(h, w, rh, rw, 0.9,
                                                                     logit_scale, False, backend)
    for need in (True, False):
        torch.library.opcheck(torch.ops.alignkern.linear_kl_backward.default,
                              (torch.randn_like(kl), h, w, rh, rw, row_max, log_sum, expect, 0.9,
                               logit_scale, need, backend))
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def kl_loss(hh, ww):
        return losses.linear_kl(hh, ww, rh, rw, temperature=0.9, logit_scale=logit_scale).sum()

    x = h.clone().requires_grad_(True)
    with alignkern.use_backend(backend):
        kl_loss(x, w).backward()
    _, (want, _) = _kl_reference_grads(h, w, rh, rw, torch.ones(5), temperature=0.9,
                                       logit_scale=logit_scale)
    assert _scaled_error(x.grad, want) < 2e-5


def test_linear_kl_errors():
    h, w, rh, rw = _kl_inputs(lead=(4,), vocab=50)
    with pytest.raises(ValueError, match="share a non-empty vocabulary, got V = 50 and 49"):
        losses.linear_kl(h, w, rh, rw[:49])
    with pytest.raises(ValueError, match=r"hidden size mismatch: ref_hidden \(4, 33\) vs ref_weight"):
        losses.linear_kl(h, w, rh, w)
    with pytest.raises(ValueError, match="same leading shape"):
        losses.linear_kl(h, w, rh[:3], rw)
    with pytest.raises(TypeError, match=r"ref_weight must have hidden's dtype \(torch.float32\)"):
        losses.linear_kl(h, w, rh, rw.double())
    with pytest.raises(ValueError, match="temperature must be positive and finite"):
        losses.linear_kl(h, w, rh, rw, temperature=0.0)
    with pytest.raises(ValueError,
                       match=r"mask must have shape \(4,\) \(the leading shape of hidden\), got \(3,\)"):
        losses.linear_kl(h, w, rh, rw, torch.ones(3, dtype=torch.bool))


def test_linear_kl_clear_errors_for_an_empty_hidden_size_and_a_list_mask():
    h, w, rh, rw = _kl_inputs(lead=(4,), vocab=50)
    with pytest.raises(ValueError, match=r"^linear_kl: weight must have a non-empty hidden size H, "
                                         r"got shape \(50, 0\)"):
        losses.linear_kl(h[:, :0], w[:, :0], rh, rw)
    with pytest.raises(TypeError, match="^linear_kl: mask must be a torch.Tensor, got list"):
        losses.linear_kl(h, w, rh, rw, [True, False, True, True])
    with pytest.raises(TypeError, match="^linear_kl: mask must be a bool .* got torch.float32"):
        losses.linear_kl(h, w, rh, rw, torch.ones(4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_kl_autocast_gradient_is_the_gradient_of_the_forward(backend):
    """Under torch.autocast both sides are cast to bfloat16 once at the op: the result and the
    policy gradients are exactly those of operands cast by hand (the inner GEMMs are not autocast
    again, and the backward does not recompute in float32)."""
    h, w, rh, rw = _kl_inputs(lead=(6,), vocab=300)
    leaves = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    with alignkern.use_backend(backend):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            kl = losses.linear_kl(*leaves, rh, rw)
        grad = torch.randn_like(kl)
        got = torch.autograd.grad(kl, leaves, grad)
        cast = [x.detach().to(torch.bfloat16).requires_grad_(True) for x in (h, w)]
        by_hand = losses.linear_kl(*cast, rh.to(torch.bfloat16), rw.to(torch.bfloat16))
        hand = torch.autograd.grad(by_hand, cast, grad)
    assert kl.dtype == torch.float32 and torch.equal(kl, by_hand)
    ref_kl, want = _kl_reference_grads(*(x.to(torch.bfloat16) for x in (h, w, rh, rw)), grad)
    for g, gh, r in zip(got, hand, want):
        assert g.dtype == torch.float32 and torch.equal(g, gh.float())
        assert _scaled_error(g, r) < KL_TOL[torch.bfloat16]


def test_linear_kl_cpu_memory_stays_a_fraction_of_two_logits_tensors():
    """N = 2048, H = 64, V = 131072: each side's float32 logits would take 1 GiB."""
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend unavailable")
    from alignkern.bench import measure

    h = torch.randn(2048, 64)
    w = torch.randn(131072, 64) / 8
    with alignkern.use_backend("cpu"):
        peak = measure.peak_memory_bytes(lambda: losses.linear_kl(h, w, h, w * 1.1),
                                         torch.device("cpu"))
    assert peak < 2**30 / 8, f"forward allocated {peak / 2**20:.1f} MiB"
