"""alignkern.loops.check_and_correct: the documented context, the reward bias and the rank mask
reaching the attention of a tiny random Llama, prefix reuse, argument errors."""

import pytest
import torch

pytest.importorskip("transformers")

from test_loops_helpers import MultiTokenOptions, Scripted, model, tokenizer  # noqa: E402

from alignkern.integrations import transformers as ak_hf  # noqa: E402
from alignkern.loops import (  # noqa: E402
    DEFAULT_TEMPLATE,
    ContextTemplate,
    attention_inputs,
    build_context,
    check_and_correct,
    cost,
)

QUERY = "Can a cat fly?"
HEADER = ("Below are earlier answers to the question with the reward each one received. Write a "
          "better answer.\n\n")
GEN = {"max_new_tokens": 4}


pytestmark = pytest.mark.usefixtures("one_thread")


def _ours():
    """The tiny model on alignkern's attention backend (same weights as ``model()``)."""
    return model(attn_implementation=ak_hf.register())


def test_the_documented_default_context():
    evaluator = Scripted([[0.25], [-0.5], [0.75]])
    result = check_and_correct(model(), tokenizer(), QUERY, evaluator, rounds=3,
                               generation_kwargs=GEN)
    r = result.responses
    assert result.contexts[0] == HEADER + "Question: Can a cat fly?\nAnswer:"
    assert result.contexts[2] == (
        HEADER
        + f"Question: Can a cat fly?\nAnswer: {r[0]}\nReward: +0.25\n\n"
        + f"Question: Can a cat fly?\nAnswer: {r[1]}\nReward: -0.50\n\n"
        + "Question: Can a cat fly?\nAnswer:")
    assert result.rewards.tolist() == [0.25, -0.5, 0.75] and result.final == r[2]
    assert evaluator.calls == [[x] for x in r] and evaluator.prompts == [[QUERY]] * 3
    assert all(x == x.strip() for x in r)


def test_the_final_answer_is_the_first_with_the_highest_reward():
    result = check_and_correct(model(), tokenizer(), QUERY, Scripted([[0.5], [0.9], [0.9]]),
                               rounds=3, generation_kwargs=GEN)
    assert result.final == result.responses[1]


def test_build_context_concatenates_the_pieces_and_labels_each_example():
    tok = tokenizer()
    template = ContextTemplate(header="Judge: ", example="[{response}|{reward:.1f}] ",
                               question="Q: {query} A:")
    context = build_context(tok, QUERY, ["yes", "no, never"], [0.5, -1.0], template)
    pieces = ["Judge: ", "[yes|0.5] ", "[no, never|-1.0] ", "Q: Can a cat fly? A:"]
    want = tok(pieces[0]).input_ids + [t for p in pieces[1:] for t in
                                       tok(p, add_special_tokens=False).input_ids]
    assert context.input_ids == want and context.text == "".join(pieces)
    for segment, piece in ((0, pieces[1]), (1, pieces[2])):
        tokens = [t for t, s in zip(context.input_ids, context.segment_ids) if s == segment]
        assert tok.decode(tokens) == piece
    assert context.prefix_length == len(want) - len(tok(pieces[3], add_special_tokens=False)
                                                    .input_ids)
    assert context.segment_ids[context.prefix_length:] == [-1] * (len(want) -
                                                                  context.prefix_length)


def _head_outputs(m, run):
    """The LM head's outputs (generate's logits) during ``run()``."""
    outputs = []
    handle = m.get_output_embeddings().register_forward_hook(
        lambda module, args, out: outputs.append(out.detach().clone()))
    try:
        result = run()
    finally:
        handle.remove()
    return outputs, result


def _logits(m, **kwargs):
    def run():
        return check_and_correct(m, tokenizer(), QUERY, Scripted([[0.8], [-0.6], [0.3]]),
                                 rounds=2, generation_kwargs=GEN, **kwargs)
    return _head_outputs(m, run)


def test_reward_bias_reaches_the_attention_and_zero_is_the_unbiased_run_bit_for_bit():
    m = _ours()
    plain, plain_result = _logits(m)
    zero, zero_result = _logits(m, reward_bias=0.0)
    biased, _ = _logits(m, reward_bias=3.0)
    steps = GEN["max_new_tokens"]
    assert len(plain) == len(zero) == len(biased) == 2 * steps
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))
    assert plain_result.responses == zero_result.responses
    # round 0 has no example to bias; in round 1 the example's reward moves the logits
    assert all(torch.equal(a, b) for a, b in zip(plain[:steps], biased[:steps]))
    assert (plain[steps] - biased[steps]).abs().max() > 1e-3


def test_reward_bias_switches_the_attention_backend_for_the_loop_only():
    m = model()
    assert m.config._attn_implementation == "sdpa"
    plain, _ = _logits(m)
    zero, _ = _logits(m, reward_bias=0.0)  # on alignkern's backend: the same model to rounding
    assert m.config._attn_implementation == "sdpa"
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(plain, zero))


def _example_hidden_states(m, responses, rewards, rank_mask):
    tok = tokenizer()
    context = build_context(tok, QUERY, responses, rewards)
    extras = attention_inputs(context, rewards, None, rank_mask, torch.device("cpu"))
    forward = {name: value for name, value in zip(
        ("alignkern_key_rank", "alignkern_query_rank"), extras[1:]) if value is not None}
    with torch.no_grad():
        hidden = m.get_decoder()(input_ids=torch.tensor([context.input_ids]),
                                 **forward).last_hidden_state[0]
    segments = torch.tensor(context.segment_ids)
    return hidden[segments == 1], hidden[context.prefix_length:], hidden[segments == -1]


def test_the_rank_mask_hides_the_better_examples_from_the_worse_ones():
    m, tok = _ours(), tokenizer()
    first, other = "the sky is blue", "a cat cannot fly"  # as many tokens in the example
    lengths = {len(build_context(tok, QUERY, [r, "fly"], [0.0, 0.0]).input_ids)
               for r in (first, other)}
    assert len(lengths) == 1
    rewards = [0.9, 0.1]  # example 0 outranks example 1
    a = _example_hidden_states(m, [first, "fly"], rewards, rank_mask=True)
    b = _example_hidden_states(m, [other, "fly"], rewards, rank_mask=True)
    assert torch.equal(a[0], b[0])  # example 1 cannot see example 0
    assert (a[1] - b[1]).abs().max() > 1e-3  # the question sees every example
    a_open = _example_hidden_states(m, [first, "fly"], rewards, rank_mask=False)
    b_open = _example_hidden_states(m, [other, "fly"], rewards, rank_mask=False)
    assert (a_open[0] - b_open[0]).abs().max() > 1e-3
    # in the other order example 1 outranks example 0 and sees it
    c = _example_hidden_states(m, [first, "fly"], [0.1, 0.9], rank_mask=True)
    d = _example_hidden_states(m, [other, "fly"], [0.1, 0.9], rank_mask=True)
    assert (c[0] - d[0]).abs().max() > 1e-3


def test_attention_inputs_ranks_and_bias():
    context = build_context(tokenizer(), QUERY, ["yes", "no"], [0.5, -0.25])
    bias, key_rank, query_rank = attention_inputs(context, [0.5, -0.25], 2.0, True,
                                                  torch.device("cpu"))
    segments = torch.tensor(context.segment_ids)
    header = torch.arange(len(segments)) < segments.tolist().index(0)
    assert torch.equal(bias[0], torch.where(segments == 0, 1.0, torch.where(segments == 1, -0.5,
                                                                            0.0)))
    assert torch.equal(key_rank, query_rank)
    assert (key_rank[0][header] == float("-inf")).all()
    assert (key_rank[0][segments == 0] == 0.5).all() and (key_rank[0][segments == 1] == -0.25).all()
    assert (key_rank[0][context.prefix_length:] == float("inf")).all()


def test_the_loop_passes_the_rank_mask():
    m = _ours()

    def run(rank_mask, script):
        def go():
            return check_and_correct(m, tokenizer(), QUERY, Scripted(script), rounds=3,
                                     generation_kwargs=GEN, rank_mask=rank_mask)
        return _head_outputs(m, go)[0]

    falling = [[0.9], [0.1], [0.0]]  # round 2's context: example 1 must not see example 0
    assert (run(False, falling)[-1] - run(True, falling)[-1]).abs().max() > 1e-3
    rising = [[0.1], [0.9], [0.0]]  # each example outranks the earlier one: nothing is hidden
    torch.testing.assert_close(run(False, rising), run(True, rising), atol=1e-5, rtol=0)


def test_prefix_reuse_gives_the_same_answers_with_fewer_positions():
    m, tok = model(), tokenizer()
    with cost.count(m) as reused:
        a = check_and_correct(m, tok, QUERY, Scripted([[0.3], [0.6], [0.1]]), rounds=3,
                              generation_kwargs=GEN)
    with cost.count(m) as recomputed:
        b = check_and_correct(m, tok, QUERY, Scripted([[0.3], [0.6], [0.1]]), rounds=3,
                              generation_kwargs=GEN, reuse_prefix=False)
    assert a.responses == b.responses and a.contexts == b.contexts
    assert reused.positions < recomputed.positions
    biased = [check_and_correct(_ours(), tok, QUERY, Scripted([[0.3], [0.6], [0.1]]), rounds=3,
                                generation_kwargs=GEN, reward_bias=2.0, rank_mask=True,
                                reuse_prefix=reuse).responses for reuse in (True, False)]
    assert biased[0] == biased[1]


def test_check_and_correct_rejects_bad_arguments():
    m, tok = model(), tokenizer()
    cases = [
        (dict(rounds=0), ValueError, "check_and_correct: rounds must be at least 1"),
        (dict(rounds="3"), TypeError, "rounds must be an integer"),
        (dict(template="{query}"), TypeError, "template must be an alignkern.loops.ContextTemplate"),
        (dict(template=DEFAULT_TEMPLATE._replace(question="")), ValueError,
         "template.question must give at least one token"),
        (dict(template=DEFAULT_TEMPLATE._replace(example="{answer}")), ValueError,
         "template.example may use"),
        (dict(reward_bias=float("nan")), ValueError, "reward_bias must be None or a finite"),
        (dict(reward_bias="2"), TypeError, "reward_bias must be None or a real number"),
        (dict(rank_mask="yes"), TypeError, "rank_mask must be True or False"),
        (dict(generation_kwargs={"num_return_sequences": 2}), ValueError,
         "may not set num_return_sequences"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            check_and_correct(m, tok, QUERY, Scripted(), **kwargs)
    with pytest.raises(ValueError, match="evaluator option 'harmless answer' is not a single"):
        check_and_correct(m, tok, QUERY, MultiTokenOptions())
    with pytest.raises(TypeError, match="query must be a str"):
        check_and_correct(m, tok, None, Scripted())
