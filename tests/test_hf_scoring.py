"""alignkern.integrations.transformers scoring (model_head, sequence_logprobs, score_generations,
option_scores, SelfEvaluator) against transformers' own path on tiny random models: the model's
logits, ``compute_transition_scores``, and a naive per-prompt softmax of the last logits."""

import copy
import os
import subprocess
import sys
from functools import cache

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import EOS, FAMILIES, PAD, VOCAB, tiny_model, tiny_tokenizer  # noqa: E402

import alignkern  # noqa: E402
from alignkern.integrations import transformers as ak_hf  # noqa: E402

ALL = sorted(FAMILIES)


pytestmark = pytest.mark.usefixtures("one_thread")


@cache
def _model(family: str, dtype: torch.dtype = torch.float32):
    return tiny_model(family, dtype=dtype)


def _positions(mask):
    """Positions over the real tokens, as ``generate`` makes them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _batch(padding: str, lengths=(12, 7, 10), seed=1):
    """Random ids, their attention mask and a completion mask (the last 4 real tokens)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        span = slice(width - n, width) if padding == "left" else slice(0, n)
        ids[row, span] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, span] = 1
        completion[row, span.stop - 4:span.stop] = 1
    return ids, mask, completion


def _reference_token_logprobs(model, ids, mask, dtype=torch.float32):
    """Transformers' own path: ``log_softmax(model(...).logits)`` at each next token ``(B, T-1)``."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
    logprobs = torch.log_softmax(logits.to(dtype), dim=-1)[:, :-1]
    return logprobs.gather(-1, ids[:, 1:, None])[..., 0]


def _scored(mask, completion=None):
    counted = (mask[:, 1:] * mask[:, :-1]).bool()
    return counted if completion is None else counted & completion[:, 1:].bool()


# ----------------------------------------------------------------------------- model_head


EXPECTED_HEADS = {  # family -> (logit_scale, softcap), from the tiny configs in hf_models.py
    "cohere": (0.25, None), "cohere2": (0.3, None), "granite": (1 / 4.0, None),
    "granitemoe": (1 / 5.0, None), "hyperclovax": (0.4, None), "minicpm3": (16 / 64, None),
    "gemma2": (1.0, 2.0), "gemma3_text": (1.0, 2.5), "nanochat": (1.0, 1.5),
    "falcon_h1": (0.3, None),
}


@pytest.mark.parametrize("family", ALL)
def test_model_head_reads_the_family(family):
    model = _model(family)
    head = ak_hf.model_head(model)
    scale, softcap = EXPECTED_HEADS.get(family, (1.0, None))
    assert head.logit_scale == pytest.approx(scale)
    assert head.softcap == softcap
    assert head.weight is model.get_output_embeddings().weight  # the parameter, not a copy
    if family == "gpt2":
        assert head.weight is model.transformer.wte.weight


def test_model_head_refuses_an_unverified_forward():
    base = _model("llama")

    class ScaledLlama(type(base)):
        def forward(self, *args, **kwargs):  # a transform model_head cannot know about
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    model = ScaledLlama(base.config).eval()
    with pytest.raises(NotImplementedError, match="ScaledLlama"):
        ak_hf.model_head(model)
    with pytest.raises(NotImplementedError):
        ak_hf.sequence_logprobs(model, torch.randint(3, VOCAB, (1, 5)))

    class QuietLlama(type(base)):  # forward inherited: still the verified implementation
        pass

    assert ak_hf.model_head(QuietLlama(base.config)).logit_scale == 1.0


def test_model_head_refuses_an_unverified_family_and_a_non_linear_head():
    from transformers import AutoModelForCausalLM, OPTConfig

    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=VOCAB, hidden_size=32,
                                                     num_hidden_layers=1, ffn_dim=32,
                                                     num_attention_heads=2,
                                                     word_embed_proj_dim=32))
    with pytest.raises(NotImplementedError, match="OPTForCausalLM"):
        ak_hf.model_head(opt)
    model = copy.deepcopy(_model("llama"))
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(NotImplementedError, match="not a plain torch.nn.Linear"):
        ak_hf.model_head(model)


# ----------------------------------------------------------------------------- sequence_logprobs


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", ALL)
def test_sequence_logprobs_matches_the_model_logits(family, padding):
    model = _model(family)
    ids, mask, completion = _batch(padding)
    with torch.no_grad():
        reference = _reference_token_logprobs(model, ids, mask)
        for completion_mask in (None, completion):
            counted = _scored(mask, completion_mask)
            expected = torch.where(counted, reference, 0.0)
            got = ak_hf.sequence_logprobs(model, ids, mask, completion_mask, reduction="none")
            assert got.shape == expected.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
            total = ak_hf.sequence_logprobs(model, ids, mask, completion_mask)
            torch.testing.assert_close(total, expected.sum(-1), atol=1e-4, rtol=0)
            mean = ak_hf.sequence_logprobs(model, ids, mask, completion_mask, reduction="mean")
            torch.testing.assert_close(mean, expected.sum(-1) / counted.sum(-1), atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # relative and absolute positions
def test_sequence_logprobs_does_not_depend_on_the_padding_side(family):
    model = _model(family)
    with torch.no_grad():
        left = ak_hf.sequence_logprobs(model, *_batch("left"))
        right = ak_hf.sequence_logprobs(model, *_batch("right"))
    torch.testing.assert_close(left, right, atol=1e-4, rtol=0)


def test_sequence_logprobs_projects_only_the_scored_rows(monkeypatch):
    model = _model("llama")
    prompt, completion = 200, 5
    ids = torch.randint(3, VOCAB, (2, prompt + completion))
    completion_mask = torch.zeros_like(ids)
    completion_mask[:, prompt:] = 1
    rows = []
    real = alignkern.linear_logprobs

    def spy(hidden, *args, **kwargs):
        rows.append(hidden.shape)
        return real(hidden, *args, **kwargs)

    monkeypatch.setattr(alignkern, "linear_logprobs", spy)
    handle = model.get_output_embeddings().register_forward_hook(
        lambda *_: pytest.fail("the LM head module ran: logits were built"))
    try:
        with torch.no_grad():
            out = ak_hf.sequence_logprobs(model, ids, completion_mask=completion_mask)
    finally:
        handle.remove()
    assert rows == [torch.Size([2 * completion, 64])]
    assert out.shape == (2,) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", ALL)
def test_sequence_logprobs_gradients_equal_the_logits_path(family):
    model = _model(family)
    ids, mask, completion = _batch("left")
    weights = torch.randn(ids.shape[0], ids.shape[1] - 1)
    counted = _scored(mask, completion)
    params = [p for p in model.parameters() if p.requires_grad]

    model.zero_grad(set_to_none=True)
    (weights * torch.where(counted, _reference_token_logprobs(model, ids, mask), 0.0)).sum().backward()
    expected = [None if p.grad is None else p.grad.clone() for p in params]

    model.zero_grad(set_to_none=True)
    got_lp = ak_hf.sequence_logprobs(model, ids, mask, completion, reduction="none")
    (weights * got_lp).sum().backward()
    got = [p.grad for p in params]
    model.zero_grad(set_to_none=True)

    assert sum(g is not None for g in expected) > 0
    for (name, _), want, have in zip(model.named_parameters(), expected, got):
        assert (want is None) == (have is None), name
        if want is not None:
            torch.testing.assert_close(have, want, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ALL)
def test_sequence_logprobs_bf16_is_as_close_to_float64_as_the_models_own_logits(family):
    model = _model(family, torch.bfloat16)
    ids, mask, completion = _batch("left")
    counted = _scored(mask, completion)
    with torch.no_grad():
        hidden = ak_hf.scoring.decoder_hidden_states(model, ids, mask)
        # float64 composition: the model's own head code, run in float64 on the same bf16 hidden
        # states (the float64 copy's decoder output is replaced by them).
        model64 = copy.deepcopy(model).to(torch.float64)
        if family == "granitemoe":  # torch's grouped_mm has no float64
            model64.set_experts_implementation("eager")

        def feed_bf16_hidden(module, args, output):
            output.last_hidden_state = hidden.to(torch.float64)
            return output

        handle = model64.get_decoder().register_forward_hook(feed_bf16_hidden)
        exact = _reference_token_logprobs(model64, ids, mask, torch.float64)
        handle.remove()
        theirs = _reference_token_logprobs(model, ids, mask)
        ours = ak_hf.sequence_logprobs(model, ids, mask, completion, reduction="none")
    err_ours = (ours.double() - exact)[counted].abs().max()
    err_theirs = (theirs.double() - exact)[counted].abs().max()
    assert err_theirs > 0
    assert err_ours <= err_theirs, (err_ours, err_theirs)


def test_sequence_logprobs_checks_its_arguments():
    model = _model("llama")
    ids = torch.randint(3, VOCAB, (2, 6))
    with pytest.raises(ValueError, match="reduction"):
        ak_hf.sequence_logprobs(model, ids, reduction="max")
    with pytest.raises(ValueError, match="completion_mask must have shape"):
        ak_hf.sequence_logprobs(model, ids, completion_mask=torch.ones(2, 5))
    with pytest.raises(TypeError, match="input_ids must hold integer"):
        ak_hf.sequence_logprobs(model, ids.float())


# ----------------------------------------------------------------------------- score_generations


def _generate(model, prompt_ids, prompt_mask, eos, **kwargs):
    return model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=8,
                          eos_token_id=eos, pad_token_id=PAD, return_dict_in_generate=True,
                          output_scores=True, output_hidden_states=True, **kwargs)


def _eos_stopping_some(generated: torch.Tensor) -> int:
    """A token that ends some rows early (and not all of them)."""
    for token in generated[:, 1:-2].flatten().tolist():
        hits = (generated[:, :-1] == token).any(-1)
        if hits.any() and not hits.all():
            return token
    raise AssertionError("no token stops only some rows")


def _transition_reference(model, out, eos):
    scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    generated = out.sequences[:, -scores.shape[1]:]
    is_eos = generated == eos
    keep = (is_eos.cumsum(-1) - is_eos.long()) == 0
    assert (~keep).any() and keep.all(-1).any(), "EOS must stop some rows early, not all"
    return torch.where(keep, scores, 0.0).sum(-1)


@pytest.mark.parametrize("family", ALL)
def test_score_generations_equals_compute_transition_scores(family):
    model = _model(family)
    prompt_ids, prompt_mask, _ = _batch("left", lengths=(6, 3, 5, 4))
    with torch.no_grad():
        free = _generate(model, prompt_ids, prompt_mask, eos=VOCAB + 1, do_sample=False)
        eos = _eos_stopping_some(free.sequences[:, prompt_ids.shape[1]:])
        out = _generate(model, prompt_ids, prompt_mask, eos=eos, do_sample=False)
        expected = _transition_reference(model, out, eos)
        from_hidden = ak_hf.score_generations(model, out, prompt_ids.shape[1], eos_token_id=eos)
        one_forward = ak_hf.score_generations(model, out.sequences, prompt_ids.shape[1],
                                              eos_token_id=eos, attention_mask=prompt_mask)
    torch.testing.assert_close(from_hidden, expected, atol=5e-5, rtol=0)
    torch.testing.assert_close(one_forward, expected, atol=5e-5, rtol=0)


def test_score_generations_sampled_with_several_returns():
    model = _model("llama")
    prompt_ids, prompt_mask, _ = _batch("left", lengths=(6, 3))
    torch.manual_seed(3)
    with torch.no_grad():
        out = _generate(model, prompt_ids, prompt_mask, eos=VOCAB + 1, do_sample=True, top_k=0,
                        top_p=1.0, temperature=1.0, num_return_sequences=3)
        eos = _eos_stopping_some(out.sequences[:, prompt_ids.shape[1]:])
        torch.manual_seed(3)
        out = _generate(model, prompt_ids, prompt_mask, eos=eos, do_sample=True, top_k=0,
                        top_p=1.0, temperature=1.0, num_return_sequences=3)
        expected = _transition_reference(model, out, eos)
        from_hidden = ak_hf.score_generations(model, out, prompt_ids.shape[1], eos_token_id=eos)
        # without a mask, the prompt's padding is read from pad_token_id
        one_forward = ak_hf.score_generations(model, out.sequences, prompt_ids.shape[1],
                                              eos_token_id=eos, pad_token_id=PAD)
    assert expected.shape == (6,)
    torch.testing.assert_close(from_hidden, expected, atol=5e-5, rtol=0)
    torch.testing.assert_close(one_forward, expected, atol=5e-5, rtol=0)


def test_score_generations_forward_path_is_differentiable():
    model = _model("gemma2")
    prompt_ids, prompt_mask, _ = _batch("left", lengths=(5, 3))
    with torch.no_grad():
        out = _generate(model, prompt_ids, prompt_mask, eos=EOS, do_sample=False)
    score = ak_hf.score_generations(model, out.sequences, prompt_ids.shape[1],
                                    attention_mask=prompt_mask)
    score.sum().backward()
    grad = model.get_output_embeddings().weight.grad
    model.zero_grad(set_to_none=True)
    assert grad is not None and grad.abs().sum() > 0


# ----------------------------------------------------------------------------- option_scores


def _naive_option_scores(logits_last, options, values):
    p = torch.softmax(logits_last.double(), dim=-1)[:, options]
    return (p / p.sum(-1, keepdim=True) * values.double()).sum(-1), p.sum(-1)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "cohere", "granite", "gpt2"])
def test_option_scores_match_the_last_logits(family, padding):
    model = _model(family)
    ids, mask, _ = _batch(padding)
    options, values = torch.tensor([5, 17, 40]), torch.tensor([1.0, 2.0, 3.0])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
        last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
        score, mass = _naive_option_scores(logits[torch.arange(len(ids)), last], options, values)
        got = ak_hf.option_scores(model, ids, mask, options, values)
    assert isinstance(got, alignkern.SelfEvalScores)
    torch.testing.assert_close(got.score.double(), score, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.mass.double(), mass, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- SelfEvaluator


TEMPLATE = ("You are a careful judge. Read the conversation and decide whether the answer is "
            "harmless. Question: {prompt} Answer: {response} Options: {options} Answer: (")
PROMPTS = ["is the sky blue on a clear day?", "can a cat fly?", "is the sky blue?"]
RESPONSES = ["yes, the sky is blue.", "no, a cat cannot fly without help.", "no."]


def _naive_self_eval(model, tok, evaluator, prompts, responses):
    """Per prompt, unbatched: the model's last logits, a full softmax, the option columns (the
    token each option adds to the text)."""
    k = len(evaluator.options)
    orders = [list(range(k)), list(reversed(range(k)))][:2 if evaluator.swap_options else 1]
    passes = []
    for texts, order in zip(evaluator.texts(prompts, responses), orders, strict=True):
        # with descriptions, the label at position j stands for description order[j]
        values = evaluator.values[order] if evaluator.descriptions else evaluator.values
        ids = [tok(t).input_ids for t in texts]
        options = [tok(texts[0] + option).input_ids for option in evaluator.options]
        assert all(o[:-1] == ids[0] for o in options)
        rows = [model(input_ids=torch.tensor([row])).logits[0, -1] for row in ids]
        passes.append(_naive_option_scores(torch.stack(rows), [o[-1] for o in options], values))
    score = torch.stack([s for s, _ in passes]).mean(0)
    mass = torch.stack([m for _, m in passes]).mean(0)
    return score, mass


@pytest.mark.parametrize("swap", [True, False])
@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("family", ["llama", "gemma2", "cohere", "gpt2"])
def test_self_evaluator_matches_a_naive_full_softmax(family, reuse, swap):
    model, tok = _model(family), tiny_tokenizer()
    evaluator = ak_hf.SelfEvaluator(model, tok, TEMPLATE, options=("A", "B"), swap_options=swap,
                                    descriptions=("harmless", "harmful"), reuse_prefix=reuse)
    with torch.no_grad():
        score, mass = _naive_self_eval(model, tok, evaluator, PROMPTS, RESPONSES)
    got = evaluator.score(PROMPTS, RESPONSES)
    torch.testing.assert_close(got.score.double(), score, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.mass.double(), mass, atol=1e-6, rtol=1e-4)
    # one forward for all candidates and passes, plus the prefix once
    assert evaluator.forwards == (2 if reuse else 1)
    evaluator.score(PROMPTS[:2], RESPONSES[:2])  # the prefix again: kept within a call only
    assert evaluator.forwards == (4 if reuse else 2)


@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_self_evaluator_reuses_a_prefix_longer_than_the_sliding_window(family):
    model, tok = tiny_model(family, sliding_window=8), tiny_tokenizer()
    evaluator = ak_hf.SelfEvaluator(model, tok, TEMPLATE, descriptions=("harmless", "harmful"))
    with torch.no_grad():
        score, _ = _naive_self_eval(model, tok, evaluator, PROMPTS, RESPONSES)
    torch.testing.assert_close(evaluator.score(PROMPTS, RESPONSES).score.double(), score,
                               atol=1e-5, rtol=0)
    assert evaluator.forwards == 2


def test_self_evaluator_without_a_copyable_cache_runs_the_whole_texts():
    model, tok = _model("falcon_h1"), tiny_tokenizer()  # recurrent (Mamba) states: no reuse
    evaluator = ak_hf.SelfEvaluator(model, tok, TEMPLATE, descriptions=("harmless", "harmful"))
    with torch.no_grad():
        score, _ = _naive_self_eval(model, tok, evaluator, PROMPTS, RESPONSES)
    torch.testing.assert_close(evaluator.score(PROMPTS, RESPONSES).score.double(), score,
                               atol=1e-5, rtol=0)
    evaluator.score(PROMPTS, RESPONSES)
    assert evaluator.forwards == 3  # the prefix was tried once, then every call is one forward


def test_self_evaluator_swap_reads_each_meaning_from_its_new_label():
    model, tok = _model("llama"), tiny_tokenizer()
    kwargs = dict(options=("A", "B"), descriptions=("harmless", "harmful"))
    both = ak_hf.SelfEvaluator(model, tok, TEMPLATE, **kwargs).score(PROMPTS, RESPONSES)
    first = ak_hf.SelfEvaluator(model, tok, TEMPLATE, swap_options=False, **kwargs)
    swapped = ak_hf.SelfEvaluator(model, tok, TEMPLATE, swap_options=False,
                                  options=("A", "B"), descriptions=("harmful", "harmless"),
                                  values=(-1.0, 1.0))
    one, two = first.score(PROMPTS, RESPONSES), swapped.score(PROMPTS, RESPONSES)
    torch.testing.assert_close(both.score, (one.score + two.score) / 2)
    assert "(A) harmful\n(B) harmless" in swapped.texts(PROMPTS, RESPONSES)[0][0]
    assert not torch.allclose(one.score, two.score)  # the order matters to this model


def test_self_evaluator_plain_options_and_several_values():
    model, tok = _model("gemma2"), tiny_tokenizer()
    template = "Question: {prompt} Answer: {response} Is it good? {options}:"
    evaluator = ak_hf.SelfEvaluator(model, tok, template, options=(" yes", " no", " good"),
                                    values=(1.0, 0.0, 0.5), batch_size=2)
    assert evaluator.texts(["q"], ["r"])[1][0].endswith("good,  no,  yes:")
    with torch.no_grad():
        score, mass = _naive_self_eval(model, tok, evaluator, PROMPTS, RESPONSES)
    got = evaluator.score(PROMPTS, RESPONSES)
    torch.testing.assert_close(got.score.double(), score, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.mass.double(), mass, atol=1e-6, rtol=1e-4)
    shared = evaluator.score(PROMPTS[0], RESPONSES)  # one prompt for every response
    torch.testing.assert_close(shared.score, evaluator.score([PROMPTS[0]] * 3, RESPONSES).score)


def test_self_evaluator_rebuilds_the_prefix_after_a_parameter_update():
    model, tok = tiny_model("llama", seed=5), tiny_tokenizer()
    evaluator = ak_hf.SelfEvaluator(model, tok, TEMPLATE, descriptions=("harmless", "harmful"))
    evaluator.score(PROMPTS, RESPONSES)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
        score, _ = _naive_self_eval(model, tok, evaluator, PROMPTS, RESPONSES)
    torch.testing.assert_close(evaluator.score(PROMPTS, RESPONSES).score.double(), score,
                               atol=1e-5, rtol=0)


def test_self_evaluator_checks_its_options_and_template():
    model, tok = _model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match="'harmless answer'"):
        ak_hf.SelfEvaluator(model, tok, TEMPLATE, options=("harmless answer", "B"))
    with pytest.raises(ValueError, match=r"swap_options=True .* \{options\}"):
        ak_hf.SelfEvaluator(model, tok, "{prompt} {response} Answer: (")
    with pytest.raises(ValueError, match=r"\{judge\}"):
        ak_hf.SelfEvaluator(model, tok, "{prompt} {response} {judge}", swap_options=False)
    with pytest.raises(ValueError, match="values must be given for 3 options"):
        ak_hf.SelfEvaluator(model, tok, TEMPLATE, options=("A", "B", "C"))


# ----------------------------------------------------------------------------- packaging


def test_import_alignkern_does_not_import_transformers():
    code = "import sys, alignkern; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "TRITON_INTERPRET": "1"})
