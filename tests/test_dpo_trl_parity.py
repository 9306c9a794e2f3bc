"""alignkern's DPO losses against TRL's own ``DPOTrainer._compute_loss``, not copied formulas.

The seam: ``_compute_loss`` gets its per-token log-probabilities from
``model(..., labels=labels, fused_lm_head=True).log_probs`` (a ``FusedCausalLMOutput``, zero
where the label is -100) for the policy and ``self.ref_model`` for the reference. A stub model
returns prepared per-token log-probabilities there; from them on everything is TRL's code: the
sums over the completion, the f-divergence scores, every loss type, the loss weights, the length
normalisation from ``completion_mask`` and the logged metrics. The trainer is built with
``object.__new__(DPOTrainer)`` and the attributes ``DPOTrainer.__init__`` sets from a real
``DPOConfig`` (same assignments), with a single-process accelerator stub (gather = identity) so
no accelerate state is created.
"""

from __future__ import annotations

import types
import warnings
from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl")

from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402

from alignkern import losses, reference  # noqa: E402

B, T = 4, 10  # pairs, tokens per sequence (prompt + completion + padding)


class _FusedHeadStub(torch.nn.Module):
    """What ``add_fused_lm_head`` makes of a model, answering prepared per-token log-probs."""

    def __init__(self, per_token):
        super().__init__()
        self.per_token = per_token  # a callable, so a test can build them from leaves
        self.is_gradient_checkpointing = False

    def forward(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False,
                use_cache=None):
        assert fused_lm_head and labels is not None
        log_probs = self.per_token()
        mask = labels[:, 1:] != -100
        assert bool((log_probs.detach()[~mask] == 0).all()), "the fused head zeroes label -100"
        zeros = torch.zeros_like(log_probs.detach())
        return FusedCausalLMOutput(loss=None, log_probs=log_probs, entropy=zeros,
                                   mean_logits=zeros, is_top1=zeros.bool())


def _accelerator_stub():
    return types.SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t,
                                 gather_for_metrics=lambda t: t)


def _trl_trainer(policy, ref, **config) -> DPOTrainer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' own deprecation notices
        args = DPOConfig(output_dir="unused", report_to=[], use_cpu=True, **config)
    trainer = object.__new__(DPOTrainer)
    # The attributes DPOTrainer.__init__ sets (TRL 1.16) that _compute_loss reads.
    trainer.args = args
    trainer.accelerator = _accelerator_stub()
    trainer.model, trainer.ref_model = _FusedHeadStub(policy), _FusedHeadStub(ref)
    trainer.beta = args.beta
    trainer.precompute_ref_logps = args.precompute_ref_log_probs
    trainer.loss_types = args.loss_type
    trainer.loss_weights = args.loss_weights or [1.0] * len(trainer.loss_types)
    trainer.ld_alpha = args.ld_alpha
    trainer.f_divergence_type = args.f_divergence_type
    trainer.f_alpha_divergence_coef = args.f_alpha_divergence_coef
    trainer.label_smoothing = args.label_smoothing
    trainer.use_weighting = args.use_weighting
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    return trainer


def _batch(dtype, seed=0):
    """A DPO batch, rows [chosen..., rejected...]: a prompt of 1-3 tokens, a completion of 1 to
    the rest, then padding; per-token policy and reference log-probs on the completion. The last
    pair's completions are empty (TRL clamps such lengths to 1 where it divides, not in sft)."""
    g = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for row in range(2 * B):
        prompt = int(torch.randint(1, 4, (), generator=g))
        length = int(torch.randint(1, T - prompt + 1, (), generator=g))
        length = 0 if row % B == B - 1 else length
        completion_mask[row, prompt:prompt + length] = 1
    shifted = completion_mask[:, 1:].bool()
    policy = torch.where(shifted, -3 * torch.rand(2 * B, T - 1, generator=g, dtype=dtype), 0.0)
    ref = torch.where(shifted, -3 * torch.rand(2 * B, T - 1, generator=g, dtype=dtype), 0.0)
    inputs = {"input_ids": torch.randint(0, 50, (2 * B, T), generator=g),
              "attention_mask": torch.ones(2 * B, T, dtype=torch.long),
              "completion_mask": completion_mask}
    return policy, ref, inputs


def _run_trl(policy_tokens, ref_tokens, inputs, **config):
    """TRL's loss, the gradient w.r.t. the per-token policy log-probs, and its logged metrics."""
    leaf = policy_tokens.clone().requires_grad_(True)
    trainer = _trl_trainer(lambda: leaf, lambda: ref_tokens, **config)
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, {k: v[0] for k, v in trainer._metrics["train"].items()}


def _run_alignkern(policy_tokens, ref_tokens, inputs, **options):
    policy = policy_tokens.sum(1).requires_grad_(True)
    ref = ref_tokens.sum(1)
    lengths = inputs["completion_mask"].sum(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # label_smoothing unused by some types
        out = losses.dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:],
                              chosen_lengths=lengths[:B], rejected_lengths=lengths[B:], **options)
    (grad,) = torch.autograd.grad(out.loss, policy)
    return out, grad


def _compare(dtype, tol, **options):
    policy_tokens, ref_tokens, inputs = _batch(dtype)
    config = {k: v for k, v in options.items() if k != "smoothing"}  # alignkern's own option
    trl_loss, trl_grad, metrics = _run_trl(policy_tokens, ref_tokens, inputs, **config)
    out, grad = _run_alignkern(policy_tokens, ref_tokens, inputs, **options)

    assert out.loss.dtype == dtype
    torch.testing.assert_close(out.loss, trl_loss, rtol=tol, atol=tol)
    ours = {k: v.item() for k, v in out.metrics().items()}
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ours[key] == pytest.approx(metrics[key], rel=tol, abs=tol), key
    # d loss / d (a sequence's log-prob) is what TRL gives each of its completion tokens.
    mask = inputs["completion_mask"][:, 1:].bool()
    expected = grad[:, None].expand_as(trl_grad)
    torch.testing.assert_close(trl_grad[mask], expected[mask], rtol=tol, atol=tol)
    assert (trl_grad[mask] != 0).any(), "a gradient that is all zero proves nothing"


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("loss_type", losses.DPO_LOSS_TYPES)
def test_every_loss_type_equals_trl(loss_type, label_smoothing, beta):
    if loss_type == "exo_pair" and label_smoothing == 0.0:
        # TRL refuses it in DPOTrainer.__init__ (log(0) in EXO's target); so does alignkern.
        x = torch.zeros(B, dtype=torch.float64)
        with pytest.raises(ValueError, match="exo_pair' needs label_smoothing > 0"):
            losses.dpo_loss(x, x, x, x, loss_type="exo_pair")
        return
    # TRL builds EXO's epsilon as a float32 tensor, so its log(eps) terms carry float32 rounding.
    tol = 1e-6 if loss_type == "exo_pair" else 1e-12
    _compare(torch.float64, tol, loss_type=loss_type, label_smoothing=label_smoothing, beta=beta)


F_DIVERGENCES = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                 ("alpha_divergence", 0.3), ("alpha_divergence", 1.0)]


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("f_divergence", F_DIVERGENCES)
@pytest.mark.parametrize(("loss_type", "label_smoothing"), [
    (loss_type, smoothing) for loss_type in losses.F_DIVERGENCE_LOSS_TYPES for smoothing in (0.0, 0.1)
    if not (loss_type == "exo_pair" and smoothing == 0.0)])  # exo_pair needs smoothing > 0
def test_f_divergences_equal_trl(loss_type, label_smoothing, f_divergence, beta):
    """In float32: TRL's alpha divergence has no float64 path (its clamp table lacks float64)."""
    kind, coef = f_divergence
    _compare(torch.float32, 2e-6, loss_type=loss_type, label_smoothing=label_smoothing,
             beta=beta, f_divergence_type=kind, f_alpha_divergence_coef=coef)


@pytest.mark.parametrize(("loss_type", "loss_weights"), [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO's combination
    (["ipo", "hinge", "aot", "nca_pair"], None),
    (["sigmoid_norm", "apo_zero", "discopop"], [0.5, 2.0, -0.25]),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_combined_loss_types_with_weights_equal_trl(loss_type, loss_weights, dtype):
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    _compare(dtype, tol, loss_type=loss_type, loss_weights=loss_weights, beta=0.3,
             label_smoothing=0.1)


def test_discopop_tau_and_combined_f_divergence_equal_trl():
    _compare(torch.float64, 1e-12, loss_type="discopop", discopop_tau=0.3, beta=0.5)
    _compare(torch.float32, 2e-6, loss_type=["sigmoid", "sft", "robust"],
             loss_weights=[1.0, 0.1, 0.5], f_divergence_type="js_divergence",
             label_smoothing=0.2)


def test_the_comparison_can_fail():
    """The harness tells TRL's semantics apart: cDPO smoothing and unnormalised IPO differ."""
    with pytest.raises(AssertionError):
        _compare(torch.float64, 1e-12, loss_type="sigmoid", label_smoothing=0.1,
                 smoothing="cdpo")
    policy_tokens, ref_tokens, inputs = _batch(torch.float64)
    trl_loss, _, _ = _run_trl(policy_tokens, ref_tokens, inputs, loss_type="ipo")
    policy, ref = policy_tokens.sum(1), ref_tokens.sum(1)
    ones = torch.ones(B)
    unnormalised = losses.dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], loss_type="ipo",
                                   chosen_lengths=ones, rejected_lengths=ones)
    assert abs(unnormalised.loss.item() - trl_loss.item()) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_linear_dpo_loss_equals_trl(dtype):
    """From hidden states: TRL gets float64 per-token log-probs of the same hidden states and
    head; alignkern's fused loss, in ``dtype``, takes the completion lengths from ``mask``."""
    torch.manual_seed(0)
    _, ref_tokens, inputs = _batch(torch.float64, seed=1)
    vocab, width = 37, 16
    hidden = torch.randn(2 * B, T - 1, width, dtype=torch.float64)
    weight = torch.randn(vocab, width, dtype=torch.float64) / width**0.5
    targets = torch.randint(0, vocab, (2 * B, T - 1))
    mask = inputs["completion_mask"][:, 1:].bool()
    ref_logps = ref_tokens.sum(1)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for options in ({"loss_type": "sigmoid"}, {"loss_type": "ipo", "beta": 0.5},
                    {"loss_type": "sft"}, {"loss_type": "sigmoid_norm"},
                    {"loss_type": ["robust", "sft"], "loss_weights": [1.0, 0.5],
                     "label_smoothing": 0.1, "f_divergence_type": "forward_kl"}):
        leaves = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)]

        def per_token(leaves=leaves):
            tokens = reference.token_logprobs(leaves[0] @ leaves[1].T, targets)[0]
            return torch.where(mask, tokens, 0.0)

        trainer = _trl_trainer(per_token, lambda: ref_tokens, **options)
        trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
        trl_grads = torch.autograd.grad(trl_loss, leaves)
        metrics = {k: v[0] for k, v in trainer._metrics["train"].items()}

        ours = [hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)]
        out = losses.fused_linear_dpo_loss(*ours, targets, mask, ref_logps=ref_logps.to(dtype),
                                           **options)
        grads = torch.autograd.grad(out.loss, ours)
        torch.testing.assert_close(out.loss.double(), trl_loss.detach(), rtol=tol, atol=tol)
        for key, value in out.metrics().items():
            assert value.item() == pytest.approx(metrics[key], rel=tol, abs=tol), key
        for got, want in zip(grads, trl_grads):  # error relative to the largest entry
            error = (got.double() - want).abs().max() / want.abs().max()
            assert error.item() < 10 * tol, (options, error.item())


def test_label_smoothing_that_reaches_no_loss_type_warns():
    x = torch.zeros(B)
    with pytest.warns(UserWarning, match="label_smoothing=0.1 has no effect.*smoothing='cdpo'"):
        losses.dpo_loss(x, x, x, x, label_smoothing=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses.dpo_loss(x, x, x, x, label_smoothing=0.1, smoothing="cdpo")
        losses.dpo_loss(x, x, x, x, loss_type=["sigmoid", "robust"], label_smoothing=0.1)


def test_dpo_option_errors():
    x = torch.zeros(B)
    with pytest.raises(ValueError, match="loss_type 'ipo' needs chosen_lengths, the completion"):
        losses.dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="loss_type 'sigmoid_norm' needs rejected_lengths"):
        losses.dpo_loss(x, x, x, x, loss_type=["sigmoid", "sigmoid_norm"], chosen_lengths=x)
    losses.dpo_loss(x, x, x, x, loss_type="sft", chosen_lengths=x + 1)  # sft: chosen only
    with pytest.raises(ValueError, match=r"f_divergence_type 'forward_kl' is only supported for "
                                         r"loss types .*got 'bco_pair'"):
        losses.dpo_loss(x, x, x, x, loss_type=["sigmoid", "bco_pair"],
                        f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="f_divergence_type must be one of 'reverse_kl'"):
        losses.dpo_loss(x, x, x, x, f_divergence_type="kl")
    with pytest.raises(ValueError, match="loss_weights must have one weight per loss type, got 1 "
                                         "weights for 2 loss types"):
        losses.dpo_loss(x, x, x, x, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(TypeError, match="loss_weights must be None or a list of numbers"):
        losses.dpo_loss(x, x, x, x, loss_weights=1.0)
    with pytest.raises(ValueError, match="loss_type must name at least one loss type"):
        losses.dpo_loss(x, x, x, x, loss_type=[])
    with pytest.raises(ValueError, match="loss_type must be one of .*got 'kto'"):
        losses.dpo_loss(x, x, x, x, loss_type=["sigmoid", "kto"])
    with pytest.raises(ValueError, match="smoothing must be one of 'trl', 'cdpo', got 'none'"):
        losses.dpo_loss(x, x, x, x, smoothing="none")
    with pytest.raises(ValueError, match="discopop_tau must be positive"):
        losses.dpo_loss(x, x, x, x, loss_type="discopop", discopop_tau=0.0)
    with pytest.raises(ValueError, match=r"shapes must match.*chosen_lengths \(3,\)"):
        losses.dpo_loss(x, x, x, x, loss_type="ipo", chosen_lengths=torch.ones(3),
                        rejected_lengths=x)
    h = torch.zeros(2 * B, 3, 4)
    with pytest.raises(ValueError, match="fused_linear_dpo_loss: f_divergence_type"):
        losses.fused_linear_dpo_loss(h, torch.zeros(5, 4), torch.zeros(2 * B, 3, dtype=torch.long),
                                     ref_logps=torch.zeros(2 * B), loss_type="aot",
                                     f_divergence_type="js_divergence")
