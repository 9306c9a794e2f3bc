"""SelfEvaluator hardening (issue 26): the prefix KV cache never goes stale by default, RAIN's
thresholded vote (``score_rule="rain_vote"``) against a re-implementation of RAIN's ``getv``, and
the constructor's argument checks. Tiny random Llama and tokenizer from ``alignkern.loops.tiny``."""

import pytest
import torch

pytest.importorskip("transformers")

from test_loops_helpers import PROMPT  # noqa: E402

from alignkern.integrations import transformers as ak_hf  # noqa: E402
from alignkern.loops import rain_generate  # noqa: E402
from alignkern.loops.judge import (  # noqa: E402
    HARMLESS_DESCRIPTIONS,
    HARMLESS_TEMPLATE,
    harmlessness_evaluator,
)
from alignkern.loops.tiny import tiny_model, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTION = "Can a cat fly?"
RESPONSES = ["No, a cat cannot fly.", "Yes.", "Mix flour, water, salt and yeast.",
             "The sky is blue.", "four", "Numbers one two three.", "I will not help.",
             "Sure, here it is:"]


def _fresh_scores(model, **kwargs):
    return harmlessness_evaluator(model, tiny_tokenizer(), **kwargs).score(QUESTION, RESPONSES)


# ----------------------------------------------------------------------------- the prefix cache


def _scale_data(model, other):
    for p in model.parameters():
        p.data.mul_(1.3)


def _copy_data(model, other):  # how TRL syncs a reference model (SyncRefModelCallback)
    for p, q in zip(model.parameters(), other.parameters()):
        p.data.copy_(q)


def _no_grad_step(model, other):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _rotary_buffer(model, other):
    model.model.rotary_emb.inv_freq.mul_(3.0)


def _load_state_dict(model, other):
    model.load_state_dict(other.state_dict())


CHANGES = [_scale_data, _copy_data, _no_grad_step, _rotary_buffer, _load_state_dict]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
def test_by_default_a_score_after_an_in_place_change_equals_a_fresh_evaluators(change):
    model, other = tiny_model(seed=1), tiny_model(seed=2)
    evaluator = harmlessness_evaluator(model, tiny_tokenizer())
    before = evaluator.score(QUESTION, RESPONSES).score
    change(model, other)
    after = evaluator.score(QUESTION, RESPONSES)
    fresh = _fresh_scores(model)
    assert not torch.allclose(before, fresh.score, atol=1e-4)  # the change matters
    torch.testing.assert_close(after.score, fresh.score, atol=1e-6, rtol=0)
    torch.testing.assert_close(after.mass, fresh.mass, atol=1e-7, rtol=1e-5)


def test_by_default_the_prefix_runs_once_per_call_and_is_not_kept():
    model, tok = tiny_model(seed=1), tiny_tokenizer()
    evaluator = harmlessness_evaluator(model, tok)
    without = harmlessness_evaluator(model, tok, reuse_prefix=False)
    got = evaluator.score(QUESTION, RESPONSES)
    torch.testing.assert_close(got.score, without.score(QUESTION, RESPONSES).score,
                               atol=1e-5, rtol=0)
    assert evaluator.forwards == 2  # the prefix, then every candidate in both orders
    assert evaluator.tokens < without.tokens  # the prefix was not run once per row
    assert not evaluator._prefix_caches
    evaluator.score(QUESTION, RESPONSES[:3])
    assert evaluator.forwards == 4
    batched = harmlessness_evaluator(model, tok, batch_size=5)
    torch.testing.assert_close(batched.score(QUESTION, RESPONSES).score, got.score,
                               atol=1e-5, rtol=0)
    assert batched.forwards == 1 + 4  # the prefix once, then 16 rows in batches of 5, 5, 5, 1


def test_opting_in_keeps_the_prefix_across_calls_and_clear_cache_restores_freshness():
    model, other = tiny_model(seed=1), tiny_model(seed=2)
    evaluator = harmlessness_evaluator(model, tiny_tokenizer(), reuse_prefix_across_calls=True)
    evaluator.score(QUESTION, RESPONSES)
    evaluator.score(QUESTION, RESPONSES[:3])
    assert evaluator.forwards == 3  # the prefix once for both calls
    _copy_data(model, other)  # escapes any cheap check: the caller must clear the cache
    evaluator.clear_cache()
    got = evaluator.score(QUESTION, RESPONSES)
    torch.testing.assert_close(got.score, _fresh_scores(model).score, atol=1e-6, rtol=0)
    assert evaluator.forwards == 5


def test_reusing_prefix_across_calls_holds_the_cache_for_the_block_only():
    model, other = tiny_model(seed=1), tiny_model(seed=2)
    evaluator = harmlessness_evaluator(model, tiny_tokenizer())
    with evaluator.reusing_prefix_across_calls():
        with evaluator.reusing_prefix_across_calls():  # nested: the outer block still holds it
            first = evaluator.score(QUESTION, RESPONSES[:4]).score
        second = evaluator.score(QUESTION, RESPONSES[4:]).score
        assert evaluator.forwards == 3
    assert not evaluator._prefix_caches
    torch.testing.assert_close(torch.cat([first, second]), _fresh_scores(model).score,
                               atol=1e-5, rtol=0)
    _copy_data(model, other)
    got = evaluator.score(QUESTION, RESPONSES).score
    torch.testing.assert_close(got, _fresh_scores(model).score, atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="inside"):
        with evaluator.reusing_prefix_across_calls():
            evaluator.score(QUESTION, RESPONSES[:1])
            raise RuntimeError("inside")
    assert not evaluator._prefix_caches


def test_rain_generate_runs_the_judge_prefix_once_per_search_and_leaves_no_cache():
    model, tok = tiny_model(seed=1), tiny_tokenizer()
    evaluator = harmlessness_evaluator(model, tok)
    calls = []
    score = evaluator.score

    def counted(prompts, responses):
        calls.append(len(responses))
        return score(prompts, responses)

    evaluator.score = counted
    settings = dict(max_iters=2, min_iters=2, expand=3, max_new_tokens=2)
    torch.manual_seed(0)
    result = rain_generate(model, tok, PROMPT, evaluator, **settings)
    assert len(calls) > 1 and evaluator.forwards == len(calls) + 1
    assert not evaluator._prefix_caches
    torch.manual_seed(0)
    uncached = rain_generate(model, tok, PROMPT,
                             harmlessness_evaluator(model, tok, reuse_prefix=False), **settings)
    assert result.token_ids == uncached.token_ids
    for ours, theirs in zip(result.steps, uncached.steps, strict=True):
        assert [c.tokens for c in ours.children] == [c.tokens for c in theirs.children]
        torch.testing.assert_close([c.value for c in ours.children],
                                   [c.value for c in theirs.children], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- RAIN's vote


def _rain_getv(model, tok, question: str, response: str) -> int:
    """RAIN's published self-evaluation (``getv``, SafeAILab/RAIN HH/main.py), re-implemented:
    the judge text with "(A) harmless (B) harmful" and with the listing reversed, each through
    the model's full-vocabulary logits and a float32 softmax; the first order counts as harmless
    when p(A) > p(B), the second when p(B) > p(A) (a tie is harmful); v = A + B - 1."""
    harmless, harmful = HARMLESS_DESCRIPTIONS
    listings = (f"(A) {harmless}\n(B) {harmful}", f"(A) {harmful}\n(B) {harmless}")
    votes = []
    for listing, harmless_label in zip(listings, ("A", "B")):
        text = HARMLESS_TEMPLATE.format(prompt=question, response=response, options=listing)
        ids = tok(text).input_ids
        label_a, label_b = tok(text + "A").input_ids[-1], tok(text + "B").input_ids[-1]
        with torch.no_grad():
            prob = torch.softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=0)
        p_a, p_b = prob[label_a].item(), prob[label_b].item()
        votes.append(int(p_a > p_b) if harmless_label == "A" else int(p_b > p_a))
    return votes[0] + votes[1] - 1


def _near_tie_model(seed: int, spread: float):
    """The tiny Llama with the head row of "B" set to that of "A" plus a direction that flips
    between the two listings differently for each response (and ``spread`` of a direction that
    does not), so that RAIN's vote takes each of -1, 0 and +1 on ``RESPONSES``."""
    model, tok = tiny_model(seed=seed), tiny_tokenizer()
    a, b = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    texts = harmlessness_evaluator(model, tok).texts([QUESTION] * len(RESPONSES), RESPONSES)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        last = torch.stack([torch.stack([
            model.model(torch.tensor([tok(t).input_ids])).last_hidden_state[0, -1]
            for t in texts_of_pass]) for texts_of_pass in texts])  # (2, N, H)
        between, within = last[1] - last[0], last.mean(0)
        flips = between.T @ torch.randn(len(RESPONSES), generator=g)
        basis, _ = torch.linalg.qr(within.T)
        flips -= basis @ (basis.T @ flips)
        common = within.T @ torch.randn(len(RESPONSES), generator=g) / within.norm()
        model.lm_head.weight[b] = model.lm_head.weight[a] + 5 * (flips / flips.norm()
                                                                 + spread * common)
    return model


def test_rain_vote_equals_a_reimplementation_of_rains_getv():
    model, tok = _near_tie_model(seed=1, spread=0.02), tiny_tokenizer()
    got = harmlessness_evaluator(model, tok, score_rule="rain_vote").score(QUESTION, RESPONSES)
    want = [_rain_getv(model, tok, QUESTION, r) for r in RESPONSES]
    assert set(want) == {-1, 0, 1}  # every outcome occurs
    assert got.score.dtype == torch.float32
    assert got.score.tolist() == want
    expected = _fresh_scores(model)  # the continuous default: same passes, same option mass
    torch.testing.assert_close(got.mass, expected.mass, atol=1e-7, rtol=1e-5)
    assert not torch.equal(got.score, expected.score)


def test_rain_vote_counts_a_tie_as_harmful_in_both_orders():
    model, tok = tiny_model(seed=1), tiny_tokenizer()
    a, b = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    with torch.no_grad():
        model.lm_head.weight[b] = model.lm_head.weight[a]
    got = harmlessness_evaluator(model, tok, score_rule="rain_vote").score(QUESTION, RESPONSES)
    assert [_rain_getv(model, tok, QUESTION, r) for r in RESPONSES] == [-1] * len(RESPONSES)
    assert got.score.tolist() == [-1.0] * len(RESPONSES)
    assert _fresh_scores(model).score.abs().max() == 0  # the continuous score: an even split


def test_rain_vote_with_several_options_takes_the_most_probable_ones_value():
    model, tok = tiny_model(seed=3), tiny_tokenizer()
    kwargs = dict(options=("A", "B", "C"), values=(1.0, -1.0, 0.5), swap_options=False)
    voted = ak_hf.SelfEvaluator(model, tok, HARMLESS_TEMPLATE, score_rule="rain_vote", **kwargs)
    got = voted.score(QUESTION, RESPONSES).score
    ids = [tok(t).input_ids for t in voted.texts([QUESTION] * len(RESPONSES), RESPONSES)[0]]
    with torch.no_grad():
        last = torch.stack([model(torch.tensor([row])).logits[0, -1] for row in ids])
    want = torch.tensor(kwargs["values"])[last[:, voted.option_ids].argmax(-1)]
    assert got.tolist() == want.tolist()


def test_rain_generate_with_rains_vote_gives_values_of_minus_one_zero_or_one():
    model, tok = _near_tie_model(seed=1, spread=0.02), tiny_tokenizer()
    evaluator = harmlessness_evaluator(model, tok, score_rule="rain_vote")
    torch.manual_seed(0)
    result = rain_generate(model, tok, PROMPT, evaluator, max_iters=1, min_iters=1, expand=6,
                           max_new_tokens=1)
    values = [c.value for c in result.steps[0].children]  # one evaluation each
    assert len(values) == 6 and set(values) <= {-1.0, 0.0, 1.0}


# ----------------------------------------------------------------------------- argument checks


class _LowercasingTokenizer:
    """The tiny tokenizer behind a lower-casing normaliser (as an uncased tokenizer has)."""

    def __init__(self, tok):
        self.tok = tok
        self.pad_token_id = tok.pad_token_id

    def __call__(self, text, **kwargs):
        return self.tok([t.lower() for t in text] if isinstance(text, list) else text.lower(),
                        **kwargs)

    def encode(self, text, **kwargs):
        return self.tok.encode(text.lower(), **kwargs)

    def convert_ids_to_tokens(self, ids):
        return self.tok.convert_ids_to_tokens(ids)


BAD_ARGUMENTS = [  # (kwargs, error, message): the message names the class, argument, expected, got
    (dict(options=("A", "A")), ValueError,
     r"SelfEvaluator: options must be distinct .*\('A', 'A'\)"),
    (dict(options="AB"), TypeError, "SelfEvaluator: options must be a sequence of str, got str"),
    (dict(options=("A", 2)), TypeError, r"SelfEvaluator: options\[1\] must be a str, got int"),
    (dict(options=()), ValueError, "SelfEvaluator: options must not be empty"),
    (dict(values=(1.0, float("nan"))), ValueError,
     r"SelfEvaluator: values must be finite, got \[1.0, nan\]"),
    (dict(values=torch.tensor([float("inf"), -1.0])), ValueError, "values must be finite"),
    (dict(values=(1.0, -1.0, 0.0)), ValueError,
     r"values must give one value per option \(2\), got 3"),
    (dict(values=torch.tensor([[1.0, -1.0]])), ValueError,
     r"values must be 1-D, one value per option \(2,\), got shape \(1, 2\)"),
    (dict(values=("1", "-1")), TypeError,
     r"SelfEvaluator: values\[0\] must be a real number, got str"),
    (dict(values=(True, False)), TypeError, r"values\[0\] must be a real number, got bool"),
    (dict(values=1.0), TypeError,
     "values must be a sequence of 2 real numbers or a tensor, got float"),
    (dict(batch_size=True), TypeError,
     "SelfEvaluator: batch_size must be None or a positive int, got bool True"),
    (dict(batch_size=2.0), TypeError, "batch_size must be None or a positive int, got float"),
    (dict(batch_size=0), ValueError,
     "SelfEvaluator: batch_size must be None or a positive int, got 0"),
    (dict(batch_size=-3), ValueError, "batch_size must be None or a positive int, got -3"),
    (dict(swap_options="no"), TypeError,
     "SelfEvaluator: swap_options must be True or False, got str"),
    (dict(reuse_prefix=1), TypeError, "SelfEvaluator: reuse_prefix must be True or False, got int"),
    (dict(reuse_prefix_across_calls="yes"), TypeError,
     "reuse_prefix_across_calls must be True or False, got str"),
    (dict(score_rule="vote"), ValueError,
     "SelfEvaluator: score_rule must be one of 'expected', 'rain_vote', got 'vote'"),
    (dict(score_rule=None), TypeError, "score_rule must be one of 'expected', 'rain_vote', got None"),
    (dict(descriptions=("harmless", "harmless")), ValueError, "descriptions must be distinct"),
    (dict(descriptions="ab"), TypeError, "descriptions must be a sequence of str, got str"),
    (dict(descriptions=("harmless",)), ValueError,
     r"descriptions must give one meaning per option \(2\), got 1"),
    (dict(descriptions=("a", "b"), option_format="{description}"), ValueError,
     r"option_format must use \{description\} and \{option\} \(with descriptions\), got "
     r"'\{description\}'"),
    (dict(option_format="{option} {description}"), ValueError,
     r"option_format must use \{option\} \(without descriptions\)"),
    (dict(option_format="{option"), ValueError, "option_format is not a valid format string"),
    (dict(option_format=3), TypeError, "option_format must be None or a str, got int"),
    (dict(option_separator=[","]), TypeError, "option_separator must be None or a str, got list"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_ARGUMENTS)
def test_self_evaluator_refuses_a_bad_argument_by_name(kwargs, error, message):
    model, tok = tiny_model(seed=1), tiny_tokenizer()
    with pytest.raises(error, match=message):
        ak_hf.SelfEvaluator(model, tok, HARMLESS_TEMPLATE, **kwargs)


def test_self_evaluator_refuses_options_that_are_the_same_token():
    model, tok = tiny_model(seed=1), _LowercasingTokenizer(tiny_tokenizer())
    ak_hf.SelfEvaluator(model, tok, HARMLESS_TEMPLATE, options=("a", "b"))  # distinct tokens
    with pytest.raises(ValueError, match=r"SelfEvaluator: options must be distinct tokens where "
                                         r"the template ends, got 'a' and 'A' both as token \d+"):
        ak_hf.SelfEvaluator(model, tok, HARMLESS_TEMPLATE, options=("a", "A"))
