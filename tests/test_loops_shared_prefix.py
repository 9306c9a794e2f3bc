"""The loops hold their shared text's KV cache once (SharedPrefixCache) instead of copying it per
row: each loop gives the same tokens and scores (fp32, within 1e-5) as with the per-row copy
(today's path, forced here by declaring the model unable to share), and really builds a
SharedPrefixCache of the expected rows."""

import pytest
import torch

pytest.importorskip("transformers")

from test_loops_helpers import PROMPT, Scripted, model, tokenizer  # noqa: E402

from alignkern.integrations import transformers as ak_hf  # noqa: E402
from alignkern.integrations.transformers import shared_prefix  # noqa: E402
from alignkern.loops import (  # noqa: E402
    best_of_n,
    check_and_correct,
    harmlessness_evaluator,
    rain_generate,
)

pytestmark = pytest.mark.usefixtures("one_thread")

RESPONSES = ["No, cats cannot fly.", "Yes.", "Cats walk and jump but they do not fly at all.",
             "Only in dreams.", "No", "A cat is a mammal without wings.", "Maybe", "Never."]


class _Spy:
    """Counts the SharedPrefixCache built (their row counts) while patched in."""

    def __init__(self, monkeypatch):
        self.rows: list[int] = []
        real = shared_prefix.SharedPrefixCache

        def spy(prefix, rows):
            self.rows.append(rows)
            return real(prefix, rows)

        monkeypatch.setattr(shared_prefix, "SharedPrefixCache", spy)


def _copy_path(monkeypatch):
    """Today's path: the prefix copied per row."""
    monkeypatch.setattr(shared_prefix, "model_can_share", lambda m: False)


def _both(monkeypatch, run):
    spy = _Spy(monkeypatch)
    shared = run()
    with monkeypatch.context() as patch:
        _copy_path(patch)
        copied = run()
    return shared, copied, spy.rows


def test_self_evaluation_scores_every_candidate_against_one_copy_of_the_judge_prefix(
        monkeypatch):
    m, tok = model(), tokenizer()
    evaluator = harmlessness_evaluator(m, tok)
    shared, copied, rows = _both(monkeypatch, lambda: evaluator.score(
        [PROMPT] * len(RESPONSES), RESPONSES))
    assert rows and all(r > 1 for r in rows) and sum(rows) == 2 * len(RESPONSES)  # both orders
    torch.testing.assert_close(shared, copied, rtol=0, atol=1e-5)
    assert m.config._attn_implementation == "sdpa"  # switched back after each call


def test_best_of_n_samples_the_same_candidates_and_scores(monkeypatch):
    m, tok = model(), tokenizer()
    prompts = [PROMPT, "Human: How do I bake bread?\nAssistant:"]

    def run():
        torch.manual_seed(5)
        return best_of_n(m, tok, prompts, n=4, score="likelihood",
                         generation_kwargs={"max_new_tokens": 6})

    shared, copied, rows = _both(monkeypatch, run)
    assert rows == [8]
    assert shared.candidates == copied.candidates
    torch.testing.assert_close(shared.scores, copied.scores, rtol=0, atol=1e-5)


def test_rain_expands_and_evaluates_children_on_the_committed_prefix(monkeypatch):
    m, tok = model(), tokenizer()
    evaluator = harmlessness_evaluator(m, tok)

    def run():
        torch.manual_seed(0)
        return rain_generate(m, tok, PROMPT, evaluator, max_iters=2, min_iters=1,
                             token_set_lengths=(1, 3), expand=4, max_new_tokens=4)

    shared, copied, rows = _both(monkeypatch, run)
    assert 4 in rows  # the sampled token sets: four rows on one copy of the committed text
    assert shared.token_ids == copied.token_ids
    values = [[c.value for c in s.children] for s in shared.steps]
    want = [[c.value for c in s.children] for s in copied.steps]
    assert [len(v) for v in values] == [len(v) for v in want]
    torch.testing.assert_close(torch.tensor(sum(values, [])), torch.tensor(sum(want, [])),
                               rtol=0, atol=1e-5)


def test_check_and_correct_rounds_continue_the_cached_context(monkeypatch):
    """One row per round: nothing to share, so each round continues a copy of the cached
    context (the faster way at one row), with the same answers as before."""
    m, tok = model(attn_implementation=ak_hf.register()), tokenizer()

    def run():
        return check_and_correct(m, tok, "Can a cat fly?", Scripted([[0.3], [0.6], [0.1]]),
                                 rounds=3, generation_kwargs={"max_new_tokens": 6},
                                 reward_bias=2.0, rank_mask=True)

    shared, copied, rows = _both(monkeypatch, run)
    assert rows == []
    assert shared.responses == copied.responses and shared.contexts == copied.contexts
