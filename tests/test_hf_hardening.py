"""Hardening of the transformers integration (issue 26, items 3, 4 and 8), each against
transformers' own path on tiny random models:

* ``attention_bias`` checks every forward, not only the first: a later ``generate`` in the same
  context with a prompt of another length raises instead of running with a cut or zero-padded bias;
* ``option_scores`` never reads a score at a padding position (a row with no real token raises,
  or is NaN with ``ALIGNKERN_VALIDATE=0``); ``sequence_logprobs`` of zero tokens is 0;
* ``output_attentions=True`` on the ``"alignkern"`` attention backend does what SDPA does: the same
  logits, no attention weights, one warning.
"""

import copy
import logging

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402
from hf_models import PAD, VOCAB, tiny_model  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from alignkern.integrations import transformers as ak_hf  # noqa: E402
from alignkern.integrations.transformers import attention as ak_attention  # noqa: E402
from alignkern.integrations.transformers import attention_bias, register  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, initializer_range=0.1, pad_token_id=PAD)


@pytest.fixture(scope="module")
def models():
    """The same GQA Llama on alignkern and on SDPA."""
    register()
    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA),
                                            attn_implementation="alignkern").eval()
    sdpa = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), attn_implementation="sdpa")
    sdpa.load_state_dict(ours.state_dict())
    return ours, sdpa.eval()


def _prompt(length: int, batch: int = 2, seed: int = 0):
    """Random ``input_ids (batch, length)`` with row 1 left-padded by 2, and its mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :2] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def _greedy(model, ids, mask, new_tokens=3, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=PAD, **kwargs)


# ----------------------------------------------------------------------------- item 3: attention_bias


@pytest.mark.parametrize("second_length", [7, 12])
def test_attention_bias_refuses_a_later_prompt_of_another_length(models, second_length):
    ours, _ = models
    ids, mask = _prompt(9)
    other_ids, other_mask = _prompt(second_length, seed=1)
    bias = 2.0 * torch.randn(ids.shape)
    with attention_bias(key_bias=bias):
        _greedy(ours, ids, mask)
        with pytest.raises(ValueError, match=rf"key_bias.*P = 9 .*{second_length}"):
            _greedy(ours, other_ids, other_mask)
    assert ak_attention._ACTIVE.prompt is None


def test_attention_bias_names_the_ranks_when_no_bias_is_given(models):
    ours, _ = models
    ids, mask = _prompt(9)
    ranks = torch.zeros(ids.shape)
    with attention_bias(key_rank=ranks, query_rank=ranks):
        _greedy(ours, ids, mask)
        with pytest.raises(ValueError, match=r"key_rank/query_rank.*P = 9 .*7"):
            _greedy(ours, *_prompt(7, seed=1))


@pytest.mark.parametrize("first_length", [8, 10])
def test_attention_bias_first_forward_must_still_cover_the_prompt(models, first_length):
    ours, _ = models
    with attention_bias(key_bias=torch.zeros(2, 9)):
        with pytest.raises(ValueError, match=rf"key_bias.*P = 9 .*{first_length}"):
            _greedy(ours, *_prompt(first_length))


def test_attention_bias_reused_on_a_prompt_of_its_length_equals_a_fresh_context(models):
    ours, _ = models
    ids, mask = _prompt(9)
    other_ids, other_mask = _prompt(9, seed=1)
    bias, ranks = 2.0 * torch.randn(ids.shape), torch.randint(0, 3, ids.shape)
    extras = dict(key_bias=bias, key_rank=ranks, query_rank=ranks)
    with attention_bias(**extras):
        first = _greedy(ours, ids, mask, new_tokens=4)
        second = _greedy(ours, other_ids, other_mask, new_tokens=4)
    with attention_bias(**extras):
        fresh = _greedy(ours, other_ids, other_mask, new_tokens=4)
    with attention_bias(**extras):
        assert torch.equal(first, _greedy(ours, ids, mask, new_tokens=4))
    assert torch.equal(second, fresh)
    assert not torch.equal(second, _greedy(ours, other_ids, other_mask, new_tokens=4))  # bias used


def _prefix_cache(model, ids, mask, key_bias=None):
    """A DynamicCache of ``ids``, computed outside any ``attention_bias`` context (the bias, if
    any, as a forward keyword argument)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions, use_cache=True,
                     alignkern_key_bias=key_bias).past_key_values


def test_attention_bias_refuses_a_longer_prompt_behind_a_foreign_cache(models):
    # After a generate of 2 tokens over the 9-token prompt, the context has seen 10 keys. A
    # 13-token prompt whose first 11 tokens come from a cache made elsewhere looks like a decode
    # step by its shapes alone (queries after the prompt): it must raise, not take bias 0.
    ours, _ = models
    ids, mask = _prompt(9)
    long_ids, long_mask = _prompt(13, seed=1)
    cache = _prefix_cache(ours, long_ids[:, :11], long_mask[:, :11])
    with attention_bias(key_bias=2.0 * torch.randn(ids.shape)):
        _greedy(ours, ids, mask, new_tokens=2)
        with pytest.raises(ValueError, match=r"key_bias.*P = 9 .*13"):
            _greedy(ours, long_ids, long_mask, new_tokens=2, cache=cache)


def test_attention_bias_accepts_a_prompt_prefix_from_a_cache(models):
    # Prefix caching: the prompt's first tokens come from a cache (made with the same bias), the
    # prefill covers the rest of the P tokens; the same tokens as without the cache.
    ours, _ = models
    ids, mask = _prompt(9)
    bias = 2.0 * torch.randn(ids.shape)
    cache = _prefix_cache(ours, ids[:, :5], mask[:, :5], bias[:, :5])
    with attention_bias(key_bias=bias):
        plain = _greedy(ours, ids, mask)
        cached = _greedy(ours, ids, mask, cache=cache)
    assert torch.equal(cached, plain)


def test_attention_bias_continues_a_generation_from_its_cache_with_bias_0(models):
    # generate(..., cache=<the cache of a generate in the same context>) continues the
    # sequence: tokens after the prompt take bias 0, as generated ones. Reference: SDPA with a
    # float mask carrying the bias extended with zeros (one forward, no cache).
    ours, sdpa = models
    ids, mask = _prompt(9)
    bias = 2.0 * torch.randn(ids.shape)
    with attention_bias(key_bias=bias):
        out = _greedy(ours, ids, mask, new_tokens=3, return_dict_in_generate=True)
        more = torch.randint(3, VOCAB, (2, 2), generator=torch.Generator().manual_seed(5))
        sequence = torch.cat([out.sequences, more], 1)
        full_mask = torch.cat([mask, torch.ones_like(sequence[:, 9:])], 1)
        got = _greedy(ours, sequence, full_mask, new_tokens=1,
                      cache=out.past_key_values)
    key_bias = torch.cat([bias, torch.zeros_like(sequence[:, 9:], dtype=bias.dtype)], 1)
    visible = torch.ones(sequence.shape[1], sequence.shape[1], dtype=torch.bool).tril()[None] \
        & full_mask.bool()[:, None, :]
    float_mask = torch.where(visible, key_bias[:, None, :], torch.finfo(torch.float32).min)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = sdpa(sequence, attention_mask=float_mask[:, None],
                      position_ids=positions).logits[:, -1]
    assert torch.equal(got[:, -1], logits.argmax(-1))


def test_attention_bias_in_assisted_generation(models):
    # Prompt lookup verifies several candidate tokens after the prompt per forward: they pass the
    # check, and greedy decoding's tokens come out. An assistant_model's candidates are verified
    # together with the prompt in the main model's first forward, which looks like a longer
    # prompt: refused, whatever the assistant's attention (it was by accident accepted before
    # with an alignkern assistant, whose own prefill was the only forward checked).
    ours, sdpa = models
    ids, mask = _prompt(9)
    ids, mask = ids[:1], mask[:1]  # assisted generation takes one row
    with attention_bias(key_bias=2.0 * torch.randn(ids.shape)):
        greedy = _greedy(ours, ids, mask, new_tokens=8)
        assert torch.equal(_greedy(ours, ids, mask, new_tokens=8, prompt_lookup_num_tokens=3),
                           greedy)
        for assistant in (sdpa, copy.deepcopy(ours)):
            with pytest.raises(ValueError, match=r"P = 9 .*assistant_model is not supported"):
                _greedy(ours, ids, mask, new_tokens=8, assistant_model=assistant)


# ----------------------------------------------------------------------------- item 4: empty rows


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_option_scores_refuses_a_row_with_no_real_token(llama):
    ids, mask = _prompt(6, batch=3)
    mask[0] = 0
    with pytest.raises(ValueError, match=r"option_scores: attention_mask.*row 0 .*no real token"):
        ak_hf.option_scores(llama, ids, mask, [5, 17])


def test_option_scores_gives_nan_for_an_empty_row_without_validation(llama, monkeypatch):
    monkeypatch.setenv("ALIGNKERN_VALIDATE", "0")
    ids, mask = _prompt(6, batch=3)
    mask[0] = 0
    with torch.no_grad():
        got = ak_hf.option_scores(llama, ids, mask, [5, 17])
        rest = ak_hf.option_scores(llama, ids[1:], mask[1:], [5, 17])
    assert torch.isnan(got.score[0]) and torch.isnan(got.mass[0])
    torch.testing.assert_close(got.score[1:], rest.score, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.mass[1:], rest.mass, atol=1e-7, rtol=1e-5)


def test_option_scores_refuses_zero_tokens_and_returns_empty_for_zero_rows(llama):
    with pytest.raises(ValueError, match=r"option_scores: input_ids .*at least one token"):
        ak_hf.option_scores(llama, torch.zeros(2, 0, dtype=torch.long), None, [5, 17])
    got = ak_hf.option_scores(llama, torch.zeros(0, 6, dtype=torch.long), None, [5, 17])
    assert got.score.shape == got.mass.shape == (0,)


@pytest.mark.parametrize("shape", [(2, 0), (0, 6), (0, 0)])
def test_sequence_logprobs_of_no_tokens_is_zero(llama, shape):
    ids = torch.zeros(shape, dtype=torch.long)
    total = ak_hf.sequence_logprobs(llama, ids)
    assert total.shape == (shape[0],) and (total == 0).all()
    assert ak_hf.sequence_logprobs(llama, ids, reduction="mean").shape == (shape[0],)
    per_token = ak_hf.sequence_logprobs(llama, ids, reduction="none")
    assert per_token.shape == (shape[0], max(shape[1] - 1, 0))
    total.sum().backward()  # as differentiable as a batch with tokens (a zero gradient)
    assert llama.get_output_embeddings().weight.grad.abs().sum() == 0
    llama.zero_grad(set_to_none=True)


def test_score_generations_refuses_empty_sequences(llama):
    with pytest.raises(ValueError, match=r"score_generations: output.sequences .*at least one"):
        ak_hf.score_generations(llama, torch.zeros(2, 0, dtype=torch.long), 1)


# ----------------------------------------------------------------------------- item 8: output_attentions


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    """The warnings transformers' loggers emit (library root: every ``transformers.*`` logger),
    with ``warning_once``'s memory cleared so that each backend's first warning is seen."""
    transformers.utils.logging.warning_once.cache_clear()
    records = _Records()
    root = logging.getLogger("transformers")
    level = root.level
    root.setLevel(logging.WARNING)  # transformers' default, whatever another test set
    root.addHandler(records)
    yield records.messages
    root.removeHandler(records)
    root.setLevel(level)


def _attention_warnings(messages):
    """SDPA's warning, and alignkern's: "`<backend>` attention does not support
    `output_attentions=True` ..." (not the generation config's note about the flag)."""
    return [m for m in messages if "does not support `output_attentions=True`" in m]


@pytest.mark.parametrize("return_dict", [True, False])
def test_output_attentions_behaves_as_on_sdpa(models, transformers_warnings, return_dict):
    ids, mask = _prompt(9)
    outputs = {}
    for model in models:
        backend = model.config._attn_implementation
        transformers_warnings.clear()
        with torch.no_grad():
            calls = [model(ids, attention_mask=mask, output_attentions=True,
                           return_dict=return_dict) for _ in range(2)]
        warned = _attention_warnings(transformers_warnings)
        assert len(warned) == 1, (backend, warned)  # once, not once per layer or per call
        assert warned[0].startswith(f"`{backend}` attention does not support")
        outputs[backend] = calls
    if return_dict:
        assert list(outputs["alignkern"][0].keys()) == list(outputs["sdpa"][0].keys())
        outputs = {backend: [out.to_tuple() for out in calls] for backend, calls in outputs.items()}
    (ours, ours_again), (sdpa, _) = outputs["alignkern"], outputs["sdpa"]
    assert [type(x) for x in ours] == [type(x) for x in sdpa]
    logits, attentions = 0, -1
    assert ours[attentions] == sdpa[attentions] == ()  # no weights, as SDPA: an empty tuple
    assert (ours[logits] - sdpa[logits])[mask.bool()].abs().max() <= 1e-5
    assert torch.equal(ours[logits], ours_again[logits])


def test_output_attentions_in_the_config_behaves_as_on_sdpa(transformers_warnings):
    register()
    ids, mask = _prompt(9)
    results = {}
    for backend in ("alignkern", "sdpa"):
        torch.manual_seed(0)
        config = LlamaConfig(**LLAMA, output_attentions=True)
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                                 attn_implementation=backend).eval()
        with torch.no_grad():
            results[backend] = model(ids, attention_mask=mask)
    ours, sdpa = results["alignkern"], results["sdpa"]
    assert ours.attentions == sdpa.attentions == ()
    assert (ours.logits - sdpa.logits)[mask.bool()].abs().max() <= 1e-5
    assert _attention_warnings(transformers_warnings) == []  # SDPA says nothing here either
