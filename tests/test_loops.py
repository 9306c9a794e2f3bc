"""alignkern.loops: best_of_n and rain_generate on a tiny random Llama (alignkern.loops.tiny),
against naive full-logits computations and a scripted evaluator with known scores."""

import zlib

import pytest
import torch

pytest.importorskip("transformers")

from test_loops_helpers import PROMPT, MultiTokenOptions, Scripted, model, tokenizer  # noqa: E402

from alignkern.loops import (  # noqa: E402
    _common,
    best_of_n,
    cost,
    harmlessness_evaluator,
    rain_generate,
)

pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = ["Human: How do I bake bread?\nAssistant:", "Human: Can a cat fly?\nAssistant:"]


def _left_padded(tok, texts):
    """Independent of the loops' helpers: left padding by hand."""
    rows = [tok(t).input_ids for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# ----------------------------------------------------------------------------- best_of_n


def test_best_of_n_likelihood_equals_a_full_logits_computation_and_picks_the_argmax():
    m, tok = model(), tokenizer()
    ids, mask = _left_padded(tok, PROMPTS)
    with torch.no_grad():  # a frequent token as EOS, so that some candidates stop early
        stop = int(m(ids[:1]).logits[0, -1].argmax())
    gen = {"max_new_tokens": 6, "eos_token_id": stop}
    torch.manual_seed(3)
    got = best_of_n(m, tok, PROMPTS, n=4, score="likelihood", generation_kwargs=gen)
    # the same generate, by hand, then log_softmax of the full logits
    torch.manual_seed(3)
    seqs = m.generate(ids, attention_mask=mask, do_sample=True, num_return_sequences=4,
                      pad_token_id=tok.pad_token_id, **gen)
    generated = seqs[:, ids.shape[1]:]
    is_eos = generated == stop
    counted = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # through the first EOS
    assert is_eos.any(-1).any() and not is_eos.any(-1).all()
    texts = [tok.decode(row[keep], skip_special_tokens=True)
             for row, keep in zip(generated, counted)]
    assert [c for row in got.candidates for c in row] == texts
    full_mask = torch.cat([mask.repeat_interleave(4, 0), torch.ones_like(generated)], 1)
    with torch.no_grad():
        logits = m(seqs, attention_mask=full_mask,
                   position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    logp = torch.log_softmax(logits[:, ids.shape[1] - 1:-1].double(), -1)
    token = logp.gather(-1, generated[..., None])[..., 0]
    want = (token * counted).sum(-1).view(2, 4)
    assert got.scores.shape == (2, 4) and got.scores.dtype == torch.float32
    torch.testing.assert_close(got.scores.double(), want, atol=1e-4, rtol=1e-5)
    assert got.best.tolist() == want.argmax(-1).tolist()
    assert got.best_candidates == [got.candidates[b][int(got.best[b])] for b in range(2)]


def _naive_self_eval(m, evaluator, prompts, responses):
    """Per candidate and per option order: the model's last logits, a full softmax, the option
    columns renormalised, the value of each option; the mean over the orders."""
    tok = evaluator.tokenizer
    option_ids = [tok.convert_tokens_to_ids(o) for o in evaluator.options]
    passes = []
    for texts, values in zip(evaluator.texts(prompts, responses),
                             ([1.0, -1.0], [-1.0, 1.0])):  # the swapped listing flips meanings
        row = []
        for text in texts:
            with torch.no_grad():
                logits = m(torch.tensor([tok(text).input_ids])).logits[0, -1].double()
            p = torch.softmax(logits, -1)[option_ids]
            row.append(float((p / p.sum() * torch.tensor(values, dtype=torch.float64)).sum()))
        passes.append(row)
    return torch.tensor(passes, dtype=torch.float64).mean(0)


def test_best_of_n_self_eval_is_one_generate_and_one_batched_scoring_forward(monkeypatch):
    m, tok = model(), tokenizer()
    evaluator = harmlessness_evaluator(m, tok)
    calls = []
    original = m.generate

    def spy(*args, **kwargs):
        cache = kwargs.get("cache")
        calls.append((kwargs.get("num_return_sequences"), type(cache).__name__,
                      getattr(cache, "rows", None), kwargs["input_ids"].shape[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(m, "generate", spy)
    torch.manual_seed(0)
    got = best_of_n(m, tok, PROMPTS, n=3, evaluator=evaluator,
                    generation_kwargs={"max_new_tokens": 5})
    # one generate of the 2 x 3 rows, the prompts' KV held once for their 3 samples each
    assert calls == [(None, "SharedPrefixCache", 6, 6)]
    assert evaluator.forwards == 2  # the judge's prefix once, then all 2 x 3 candidates x 2 orders
    flat = [c for row in got.candidates for c in row]
    want = _naive_self_eval(m, evaluator, [p for p in PROMPTS for _ in range(3)], flat)
    torch.testing.assert_close(got.scores.reshape(-1).double(), want, atol=1e-5, rtol=0)
    assert got.best.tolist() == got.scores.argmax(-1).tolist()


def test_best_of_n_breaks_ties_to_the_lowest_index_and_passes_a_callable_the_flat_lists():
    m, tok = model(), tokenizer()
    seen = {}

    def scorer(prompts, candidates):
        seen["prompts"], seen["candidates"] = prompts, candidates
        return [3.0, 1.0, 3.0, 0.0, float("nan"), 2.0, float("nan"), 2.0]

    got = best_of_n(m, tok, PROMPTS, n=4, score=scorer, generation_kwargs={"max_new_tokens": 2})
    assert got.best.tolist() == [0, 1]  # the first of the tied maxima; NaN is never the best
    assert seen["prompts"] == [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4
    assert seen["candidates"] == got.candidates[0] + got.candidates[1]


def test_best_of_n_rejects_bad_arguments():
    m, tok = model(), tokenizer()
    evaluator = harmlessness_evaluator(m, tok)
    cases = [
        (dict(n=0), ValueError, "best_of_n: n must be at least 1"),
        (dict(n=2.5), TypeError, "best_of_n: n must be an integer"),
        (dict(prompts=[]), ValueError, "best_of_n: prompts must hold at least one text"),
        (dict(prompts=[1]), TypeError, r"best_of_n: prompts\[0\] must be a str"),
        (dict(score="judge"), ValueError, "best_of_n: score must be"),
        (dict(evaluator=None), ValueError, "score='self_eval' needs an evaluator"),
        (dict(evaluator=MultiTokenOptions()), ValueError,
         "evaluator option 'harmless answer' is not a single token"),
        (dict(generation_kwargs={"num_return_sequences": 2}), ValueError,
         "generation_kwargs may not set num_return_sequences"),
        (dict(score="likelihood", generation_kwargs=[1]), TypeError,
         "generation_kwargs must be a dict"),
        (dict(score=lambda p, c: [0.0]), ValueError, "the scorer returned 1 scores for 2"),
    ]
    for overrides, error, message in cases:
        kwargs = dict(prompts=PROMPTS[:1], n=2, evaluator=evaluator,
                      generation_kwargs={"max_new_tokens": 2}, **{})
        kwargs.update(overrides)
        prompts = kwargs.pop("prompts")
        with pytest.raises(error, match=message):
            best_of_n(m, tok, prompts, **kwargs)


# ----------------------------------------------------------------------------- rain_generate


def _rain(evaluator, **kwargs):
    options = dict(token_set_lengths=(1,), expand=3, max_new_tokens=3)
    options.update(kwargs)
    torch.manual_seed(0)
    return rain_generate(model(), tokenizer(), PROMPT, evaluator, **options)


def test_rain_stops_at_max_iters_while_the_value_stays_below_the_threshold():
    evaluator = Scripted(constant=0.0)
    result = _rain(evaluator, max_iters=4, min_iters=2)
    assert [step.iterations for step in result.steps] == [4] * len(result.steps)
    assert result.iterations == 4 * len(result.steps) and len(result.steps) == 3
    assert [t for step in result.steps for t in step.tokens] == result.token_ids
    assert result.text == tokenizer().decode(result.token_ids, skip_special_tokens=True)
    # every expansion is one evaluator call with all its new leaves
    assert all(1 <= len(call) <= 3 for call in evaluator.calls)
    assert sum(map(len, evaluator.calls)) == result.evaluations
    assert all(prompts == [PROMPT] * len(prompts) for prompts in evaluator.prompts)


@pytest.mark.parametrize("min_iters", [1, 3])
def test_rain_stops_at_the_threshold_after_min_iters(min_iters):
    result = _rain(Scripted(constant=0.9), max_iters=10, min_iters=min_iters, value_threshold=0.8)
    assert [step.iterations for step in result.steps] == [min_iters] * 3
    below = _rain(Scripted(constant=0.79), max_iters=5, min_iters=min_iters, value_threshold=0.8)
    assert [step.iterations for step in below.steps] == [5] * 3


def _crc_value(text: str) -> float:
    return (zlib.crc32(text.encode()) % 2001 - 1000) / 1000.0


def test_rain_commits_the_most_visited_set_and_makes_it_the_root():
    result = _rain(Scripted(by_text=_crc_value), token_set_lengths=(1, 2), expand=4,
                   max_iters=6, min_iters=6, max_new_tokens=5)
    answer = []
    for step in result.steps:
        most = max(step.children, key=lambda c: (c.visits, c.value))
        assert step.tokens == most.tokens
        assert most.visits == max(c.visits for c in step.children)
        assert abs(sum(c.prior for c in step.children) - 1.0) < 1e-9
        answer.extend(step.tokens)
    assert answer == result.token_ids
    assert [len(step.tokens) for step in result.steps][:2] == [1, 2]
    # the committed node keeps its subtree: the next search starts below it, not re-expanding
    first_choice = max(result.steps[0].children, key=lambda c: (c.visits, c.value))
    assert first_choice.visits > 1 and result.steps[1].paths[0] != ()


def _top_two(prompt=PROMPT):
    tok = tokenizer()
    with torch.no_grad():
        logits = model()(torch.tensor([tok(prompt).input_ids])).logits[0, -1]
    return [(int(t),) for t in logits.topk(2).indices]


def test_rain_rewinds_to_the_other_branch_when_the_chosen_one_turns_out_badly():
    x1, x2 = _top_two()
    script = [[0.5, 0.4], [-0.9, -0.9], [0.45, 0.45]]  # root's children; x1's; x2's
    result = _rain(Scripted(script), expand=2, c_puct=1e-6, max_iters=3, min_iters=3,
                   max_new_tokens=4)
    first = result.steps[0]
    assert [c.tokens for c in first.children] == [x1, x2]
    assert first.paths == [(), (x1,), (x2,)]  # after x1's children come back bad: rewind to x2
    # both have 3 visits; x2's mean (0.4 + 0.45 + 0.45) / 3 beats x1's: x2 is committed
    assert [c.visits for c in first.children] == [3, 3]
    assert first.tokens == x2
    assert first.children[0].value == pytest.approx((0.5 - 0.9 - 0.9) / 3)


def test_rain_commits_the_most_visited_set_even_when_another_has_the_higher_value():
    x1, x2 = _top_two()
    script = [[0.5, 0.4], [0.2, 0.2]]  # root's children; then x1's (x1 falls to 0.3 < x2's 0.4)
    result = _rain(Scripted(script), expand=2, c_puct=1e-6, max_iters=2, min_iters=2,
                   max_new_tokens=4)
    first = result.steps[0]
    assert first.paths == [(), (x1,)]
    assert [c.visits for c in first.children] == [3, 1]
    assert [c.value for c in first.children] == pytest.approx([0.3, 0.4])
    assert first.tokens == x1 and result.token_ids[:1] == list(x1)


def test_rain_goes_deeper_while_the_chosen_branch_stays_good():
    x1, x2 = _top_two()
    script = [[0.5, 0.4], [0.6, 0.6]]
    result = _rain(Scripted(script), expand=2, c_puct=1e-6, max_iters=3, min_iters=3,
                   max_new_tokens=4)
    paths = result.steps[0].paths
    assert paths[:2] == [(), (x1,)] and len(paths[2]) == 2 and paths[2][0] == x1
    assert result.steps[0].tokens == x1


def test_rain_exploration_term_visits_the_other_child():
    """With the default c_puct and equal values, PUCT spreads visits over the children."""
    result = _rain(Scripted(constant=0.0), expand=2, max_iters=4, min_iters=4, max_new_tokens=2)
    first_level = {path[0] for path in result.steps[0].paths if path}
    assert len(first_level) == 2


def test_rain_similarity_update_credits_similar_siblings():
    script = [[0.5, -0.5]]
    kwargs = dict(expand=2, max_iters=1, min_iters=1, max_new_tokens=1)
    plain = _rain(Scripted(script), **kwargs).steps[0].children
    assert [(c.visits, c.value) for c in plain] == [(1, 0.5), (1, -0.5)]
    same = _rain(Scripted(script), embed=lambda texts: torch.ones(len(texts), 4),
                 **kwargs).steps[0].children
    # the second child's backup credits the first (its embedding is set): 0.2 visits of -0.5
    assert same[0].visits == pytest.approx(1.2) and same[1].visits == 1
    assert same[0].value == pytest.approx((0.5 - 0.2 * 0.5) / 1.2)

    apart = _rain(Scripted(script), embed=lambda texts: torch.eye(len(texts)),
                  **kwargs).steps[0].children
    assert [c.visits for c in apart] == [1, 1]
    with pytest.raises(ValueError, match=r"embed must return a \(2, d\) tensor"):
        _rain(Scripted(script), embed=lambda texts: torch.ones(1, 4), **kwargs)


def test_rain_reuses_the_committed_prefix_cache(monkeypatch):
    with cost.count(model()) as reused:
        with_cache = _rain(Scripted(by_text=_crc_value), max_iters=2, min_iters=2)
    monkeypatch.setattr(_common, "copyable", lambda cache: False)
    with cost.count(model()) as recomputed:
        without = _rain(Scripted(by_text=_crc_value), max_iters=2, min_iters=2)
    assert with_cache.token_ids == without.token_ids
    assert reused.positions < recomputed.positions


def test_rain_with_a_self_evaluator_and_sampled_token_sets():
    m, tok = model(), tokenizer()
    evaluator = harmlessness_evaluator(m, tok)
    torch.manual_seed(0)
    result = rain_generate(m, tok, PROMPT, evaluator, max_iters=2, min_iters=1,
                           token_set_lengths=(1, 3), expand=4, max_new_tokens=4)
    assert [len(s.tokens) for s in result.steps] == [1, 3] and len(result.token_ids) == 4
    assert result.evaluations > 0 and result.forwards > result.iterations
    assert all(-1.0 <= c.value <= 1.0 for s in result.steps for c in s.children)
    second = result.steps[1].children
    assert len({c.tokens for c in second}) == len(second) <= 4  # duplicates dropped


def test_rain_rejects_bad_arguments():
    cases = [
        (dict(max_iters=0), ValueError, "rain_generate: max_iters must be at least 1"),
        (dict(min_iters=7, max_iters=6), ValueError, "min_iters .7. must not exceed max_iters"),
        (dict(expand=0), ValueError, "expand must be at least 1"),
        (dict(token_set_lengths=()), TypeError, "token_set_lengths must be a non-empty"),
        (dict(token_set_lengths=(1, 0)), ValueError, r"token_set_lengths\[1\] must be at least 1"),
        (dict(temperature=0.0), ValueError, "temperature must be positive"),
        (dict(c_puct=-1.0), ValueError, "c_puct must be positive"),
        (dict(sim_threshold=2.0), ValueError, "sim_threshold must be at most 1"),
        (dict(embed="minilm"), TypeError, "embed must be None or a callable"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens must be at least 1"),
        (dict(generation_kwargs={"do_sample": False}), ValueError, "may not set do_sample"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            _rain(Scripted(), **kwargs)
    with pytest.raises(ValueError, match="evaluator option 'harmless answer' is not a single"):
        _rain(MultiTokenOptions())
    with pytest.raises(TypeError, match="evaluator must have a score"):
        _rain(object())
    with pytest.raises(TypeError, match="prompt must be a str"):
        rain_generate(model(), tokenizer(), ["a"], Scripted())
