"""alignkern.loops.score (SCoRe's two-attempt rollouts and stage-II loss) against a naive
logits-based implementation, a few training steps on a tiny model, and ``alignkern demo``."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from test_loops_helpers import model, tokenizer  # noqa: E402

from alignkern.loops import (  # noqa: E402
    DEFAULT_CORRECTION,
    score_stage2_loss,
    two_attempt_rollout,
)
from alignkern.loops import demo as loops_demo  # noqa: E402
from alignkern.loops.tiny import tiny_model  # noqa: E402

PROMPTS = ["Question: what is two plus two? Answer:", "Human: Can a cat fly?\nAssistant:",
           "Question: is the sky blue?"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _contains_o(prompts, responses):
    return [float("o" in r) for r in responses]


def _rollout(m, prompts=PROMPTS, reward=_contains_o, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("generation_kwargs", {"max_new_tokens": 5})
    return two_attempt_rollout(m, tokenizer(), prompts, reward, **kwargs)


def test_the_second_attempt_continues_the_first_with_the_instruction():
    tok = tokenizer()
    rollout = _rollout(model())
    instruction = tok(DEFAULT_CORRECTION, add_special_tokens=False).input_ids
    for b, prompt in enumerate(PROMPTS):
        first = rollout.first_attempt
        ids = first.input_ids[b][first.attention_mask[b].bool()].tolist()
        generated = first.input_ids[b][first.completion_mask[b]].tolist()
        assert ids == tok(prompt).input_ids + generated
        assert tok.decode(generated, skip_special_tokens=True) == rollout.first[b]
        second = rollout.second_attempt
        ids2 = second.input_ids[b][second.attention_mask[b].bool()].tolist()
        generated2 = second.input_ids[b][second.completion_mask[b]].tolist()
        kept = [t for t in generated if t != tok.eos_token_id]
        assert ids2 == tok(prompt).input_ids + kept + instruction + generated2
        assert tok.decode(generated2, skip_special_tokens=True) == rollout.second[b]
    assert rollout.r1.tolist() == _contains_o(None, rollout.first)
    torch.testing.assert_close(rollout.shaped, rollout.r2 + 10.0 * (rollout.r2 - rollout.r1))
    m = rollout.metrics
    assert m is not None and float(m.acc_t2 - m.acc_t1) == pytest.approx(float(m.delta))
    assert float(m.delta_i_to_c) == pytest.approx(
        float(((rollout.r1 == 0) & (rollout.r2 == 1)).double().mean()))
    graded = _rollout(model(), reward=lambda p, r: [0.5] * len(r), alpha=2.0)
    assert graded.metrics is None and graded.shaped.tolist() == [0.5] * 3


def _naive_loss(m, ref, rollout, beta_kl):
    """SCoRe stage II the plain way: full logits, float32 log_softmax, full-vocabulary KL."""
    policy, kl_terms = 0.0, []
    for attempt, reward in ((rollout.first_attempt, rollout.r1),
                            (rollout.second_attempt, rollout.shaped)):
        ids, mask = attempt.input_ids, attempt.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logp = torch.log_softmax(m(ids, attention_mask=mask,
                                   position_ids=positions).logits[:, :-1], -1)
        with torch.no_grad():
            ref_logp = torch.log_softmax(ref(ids, attention_mask=mask,
                                             position_ids=positions).logits[:, :-1], -1)
        scored = attempt.completion_mask[:, 1:]
        token = logp.gather(-1, ids[:, 1:, None])[..., 0]
        policy = policy + ((reward - reward.mean()) * (token * scored).sum(-1)).mean()
        kl_terms.append((logp.exp() * (logp - ref_logp)).sum(-1)[scored])
    return -policy + beta_kl * torch.cat(kl_terms).mean()


def test_stage2_loss_and_gradient_equal_autograd_of_the_logits_path():
    policy = tiny_model(seed=1)
    reference = tiny_model(seed=2)
    rollout = _rollout(policy, prompts=PROMPTS * 2, seed=4)
    assert rollout.r1.std() > 0 and rollout.shaped.std() > 0  # the policy term is not zero
    loss = score_stage2_loss(policy, reference, rollout, beta_kl=0.3)
    grads = torch.autograd.grad(loss, list(policy.parameters()))
    want = _naive_loss(policy, reference, rollout, 0.3)
    want_grads = torch.autograd.grad(want, list(policy.parameters()))
    torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-5)
    for (name, _), got, expected in zip(policy.named_parameters(), grads, want_grads):
        scale = expected.abs().max().clamp(min=1e-3)
        assert (got - expected).abs().max() <= 1e-4 * scale, name
    kl_only = score_stage2_loss(policy, copy.deepcopy(policy), rollout, beta_kl=1.0)
    no_kl = score_stage2_loss(policy, copy.deepcopy(policy), rollout, beta_kl=0.0)
    torch.testing.assert_close(kl_only, no_kl, atol=1e-5, rtol=0)  # KL to itself is 0


def test_a_few_stage2_steps_raise_the_shaped_reward():
    policy = tiny_model(seed=0)
    reference = copy.deepcopy(policy)
    prompts = [PROMPTS[0]] * 16
    gen = {"max_new_tokens": 4, "do_sample": True, "top_k": 0}

    def shaped():
        torch.manual_seed(123)
        return two_attempt_rollout(policy, tokenizer(), prompts * 8, _contains_o,
                                   generation_kwargs=gen).shaped.mean().item()

    before = shaped()
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(6):
        rollout = two_attempt_rollout(policy, tokenizer(), prompts, _contains_o,
                                      generation_kwargs=gen)
        loss = score_stage2_loss(policy, reference, rollout, beta_kl=0.01)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = shaped()
    assert after > before + 1.0, (before, after)


def test_score_rejects_bad_arguments():
    m, tok = model(), tokenizer()
    cases = [
        (dict(prompts=[]), ValueError, "two_attempt_rollout: prompts must hold at least one"),
        (dict(reward_fn="exact"), TypeError, "reward_fn must be a callable"),
        (dict(alpha=float("inf")), ValueError, "alpha must be a finite number"),
        (dict(correction_instruction=None), TypeError, "correction_instruction must be a str"),
        (dict(reward_fn=lambda p, r: [1.0]), ValueError, "the scorer returned 1 scores for 3"),
        (dict(generation_kwargs={"attention_mask": None}), ValueError,
         "may not set attention_mask"),
    ]
    for overrides, error, message in cases:
        kwargs = dict(prompts=PROMPTS, reward_fn=_contains_o,
                      generation_kwargs={"max_new_tokens": 2})
        kwargs.update(overrides)
        with pytest.raises(error, match=message):
            two_attempt_rollout(m, tok, kwargs.pop("prompts"), kwargs.pop("reward_fn"), **kwargs)
    rollout = _rollout(m)
    with pytest.raises(ValueError, match="score_stage2_loss: beta_kl must be at least 0"):
        score_stage2_loss(m, m, rollout, beta_kl=-0.1)
    with pytest.raises(TypeError, match="rollout must be what two_attempt_rollout returns"):
        score_stage2_loss(m, m, tuple(rollout))


def test_demo_runs_a_loop_end_to_end(capsys):
    parser = __import__("argparse").ArgumentParser()
    loops_demo.add_arguments(parser)
    assert parser.parse_args([]).loop == "all"
    assert loops_demo.main(["score", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "=== score ===" in out and "full logits + log_softmax + full KL" in out
    assert "alignkern score_stage2_loss" in out
    assert "verdict: score_stage2_loss against full logits: " in out
    assert "the same results (max |difference|" in out


def test_demo_loads_a_local_checkpoint(tmp_path):
    saved = tiny_model(seed=5)
    saved.save_pretrained(tmp_path)
    tokenizer().save_pretrained(tmp_path)
    loaded, tok, description = loops_demo._load(str(tmp_path), torch.device("cpu"))
    assert str(tmp_path) in description and not loaded.training
    ids = torch.tensor([tok(PROMPTS[0]).input_ids])
    assert ids.tolist() == [tokenizer()(PROMPTS[0]).input_ids]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, saved(ids).logits, atol=0, rtol=0)
