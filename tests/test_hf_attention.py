"""alignkern.integrations.transformers.attention: reward_attention as a transformers attention
backend, checked against transformers' own SDPA path on tiny random models built from configs.

References: SDPA with transformers' own masks (padding), and SDPA with a 4-D float mask that
carries the key bias and the rank/causal/padding visibility (``_float_mask``): a mask transformers
hands to SDPA as is, so the reference is transformers' SDPA attention on the same weights."""

import copy
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

import alignkern  # noqa: E402
from alignkern.integrations.transformers import attention as ak_attention  # noqa: E402
from alignkern.integrations.transformers import (  # noqa: E402
    attention_bias,
    register,
    reward_attention_forward,
    reward_attention_mask,
)

VOCAB = 97
NEW_TOKENS = 16


def _llama_config(**overrides) -> LlamaConfig:
    # GQA (4 query heads on 2 key/value heads); initializer_range 0.1 keeps the greedy top-2
    # logit gaps (>= 1e-2 here) far above the kernels' fp32 differences (~1e-6).
    settings = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, initializer_range=0.1,
                    pad_token_id=0)
    return LlamaConfig(**{**settings, **overrides})


def _model(config, attn_implementation: str, state=None):
    """A model on its own copy of ``config`` (from_config writes the implementation into it)."""
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                             attn_implementation=attn_implementation)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    """The same GQA Llama on alignkern and on SDPA."""
    register()
    torch.manual_seed(0)
    ours = _model(_llama_config(), "alignkern")
    return ours, _model(_llama_config(), "sdpa", ours.state_dict())


@pytest.fixture
def batch():
    """Left-padded ``input_ids (3, 9)`` and ``attention_mask (3, 9)``."""
    ids = torch.randint(1, VOCAB, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture
def layer_calls(monkeypatch):
    """Counts the calls to ``alignkern.reward_attention`` (the integration's only kernel entry)."""
    calls = []
    original = alignkern.reward_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(alignkern, "reward_attention", spy)
    return calls


def _float_mask(mask, key_bias=None, key_rank=None, query_rank=None):
    """The SDPA reference's ``(B, 1, L, L)`` float mask: ``key_bias_j`` where key j is visible to
    query i (``j <= i``, not padding, ``key_rank_j <= query_rank_i``), the dtype's minimum
    elsewhere (transformers' own convention: padded query rows stay finite)."""
    batch, length = mask.shape
    visible = torch.ones(length, length, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
    if key_rank is not None:
        visible = visible & (key_rank[:, None, :] <= query_rank[:, :, None])
    bias = torch.zeros(batch, length) if key_bias is None else key_bias
    return torch.where(visible, bias[:, None, :], torch.finfo(torch.float32).min)[:, None]


def _random_extras(mask, kind: str):
    """Key bias and/or per-token ranks (B, L) for ``kind`` in bias | ranks | bias+ranks. Each token
    ranks itself equally as key and query, so every real query sees at least itself."""
    key_bias = 2.0 * torch.randn(mask.shape) if "bias" in kind else None
    ranks = torch.randint(0, 3, mask.shape) if "ranks" in kind else None
    return key_bias, ranks, ranks


def _real(mask):
    return mask.bool()


# ----------------------------------------------------------------------------- registration


def test_register_is_idempotent_and_puts_both_functions_behind_the_name():
    assert register() == "alignkern"
    assert register() == "alignkern"
    assert register("alignkern_other") == "alignkern_other"
    for name in ("alignkern", "alignkern_other"):
        assert AttentionInterface._global_mapping[name] is reward_attention_forward
        assert AttentionMaskInterface._global_mapping[name] is reward_attention_mask
    for taken in ("sdpa", "eager", "flash_attention_2"):
        with pytest.raises(ValueError, match="taken"):
            register(taken)
    assert AttentionInterface._global_mapping["sdpa"] is not reward_attention_forward


def test_set_attn_implementation_runs_every_layer_on_reward_attention(models, batch, layer_calls):
    ours, sdpa = models
    ids, mask = batch
    model = _model(_llama_config(), "sdpa", sdpa.state_dict())
    model.set_attn_implementation("alignkern")
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        want = sdpa(ids, attention_mask=mask).logits
    assert len(layer_calls) == model.config.num_hidden_layers
    assert (got - want)[_real(mask)].abs().max() <= 1e-5


# ----------------------------------------------------------------------------- forward


def test_left_padded_logits_match_sdpa(models, batch, layer_calls):
    ours, sdpa = models
    ids, mask = batch
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
        want = sdpa(ids, attention_mask=mask).logits
        unpadded = ours(ids).logits
    assert len(layer_calls) == 2 * ours.config.num_hidden_layers
    real = _real(mask)
    assert (got - want)[real].abs().max() <= 1e-5
    assert torch.isfinite(got).all()  # padded query rows see no key: zeros, never NaN
    # The padding matters here: logits that ignored it would be far off.
    assert (unpadded - want)[real].abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["bias", "ranks", "bias+ranks"])
def test_key_bias_and_ranks_as_forward_kwargs_match_sdpa_with_a_float_mask(models, batch, kind):
    ours, sdpa = models
    ids, mask = batch
    key_bias, key_rank, query_rank = _random_extras(mask, kind)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, alignkern_key_bias=key_bias,
                   alignkern_key_rank=key_rank, alignkern_query_rank=query_rank).logits
        want = sdpa(ids, attention_mask=_float_mask(mask, key_bias, key_rank, query_rank)).logits
        plain = sdpa(ids, attention_mask=mask).logits
    real = _real(mask)
    assert (got - want)[real].abs().max() <= 1e-5
    assert (plain - want)[real].abs().max() > 1e-2  # the bias / ranks change the answer


def test_parameter_and_key_bias_gradients_match_sdpa(models, batch):
    ours, sdpa = models
    ids, mask = batch
    ours, sdpa = copy.deepcopy(ours).train(), copy.deepcopy(sdpa).train()
    key_bias = 2.0 * torch.randn(mask.shape)
    weights = torch.randn(*mask.shape, VOCAB) * _real(mask)[..., None]  # real positions only
    grads = []
    for model, kwargs in ((ours, lambda b: dict(attention_mask=mask, alignkern_key_bias=b)),
                          (sdpa, lambda b: dict(attention_mask=_float_mask(mask, b)))):
        bias = key_bias.clone().requires_grad_()
        (model(ids, **kwargs(bias)).logits * weights).sum().backward()
        grads.append({"key_bias": bias.grad,
                      **{name: p.grad for name, p in model.named_parameters()}})
    got, want = grads
    assert got.keys() == want.keys()
    for name in want:  # fp32 rounding relative to each gradient's scale (grads reach ~1e2)
        assert (got[name] - want[name]).abs().max() <= 1e-5 * want[name].abs().max(), name
    assert want["key_bias"][_real(mask)].abs().min() > 0  # every real key's bias matters
    assert (got["key_bias"][~_real(mask)] == 0).all()  # padded keys take no gradient


def test_torch_compile_fullgraph_forward(models, batch):
    ours, _ = models
    ids, mask = batch
    key_bias = torch.randn(mask.shape)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(ids, attention_mask=mask, alignkern_key_bias=key_bias).logits
        want = ours(ids, attention_mask=mask, alignkern_key_bias=key_bias).logits
    torch._dynamo.reset()
    assert (got - want)[_real(mask)].abs().max() <= 1e-5


# ----------------------------------------------------------------------------- generate


def test_greedy_generate_matches_sdpa(models, batch, layer_calls):
    ours, sdpa = models
    ids, mask = batch
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    got = ours.generate(ids, **kwargs)
    assert got.shape[1] == ids.shape[1] + NEW_TOKENS
    assert torch.equal(got, sdpa.generate(ids, **kwargs))
    # Every layer at every step: one prefill, then one-token queries against the KV cache.
    layers = ours.config.num_hidden_layers
    assert len(layer_calls) == NEW_TOKENS * layers


def _grow(x, grown: int, *, zero: bool):
    """``(B, P)`` → ``(B, P + grown)``: zeros (bias) or the last column repeated (ranks)."""
    if x is None:
        return None
    tail = x.new_zeros(x.shape[0], grown) if zero else x[:, -1:].expand(-1, grown)
    return torch.cat([x, tail], 1)


def _greedy_full_forwards(sdpa, ids, mask, key_bias, key_rank, query_rank):
    """Greedy decoding by full forwards (no cache) through SDPA with the float mask, the prompt's
    bias/ranks extended by the documented rule: generated tokens get bias 0 and the last prompt
    token's ranks. Independent of the KV cache and of the integration's extension code."""
    seq = ids
    for _ in range(NEW_TOKENS):
        grown = seq.shape[1] - ids.shape[1]
        full_mask = torch.cat([mask, torch.ones(mask.shape[0], grown, dtype=mask.dtype)], 1)
        float_mask = _float_mask(full_mask, _grow(key_bias, grown, zero=True),
                                 _grow(key_rank, grown, zero=False),
                                 _grow(query_rank, grown, zero=False))
        positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)  # as generate does
        with torch.no_grad():
            logits = sdpa(seq, attention_mask=float_mask, position_ids=positions).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq


@pytest.mark.parametrize("kind", ["bias", "bias+ranks"])
def test_greedy_generate_with_attention_bias_matches_full_forwards(models, batch, kind):
    ours, sdpa = models
    ids, mask = batch
    key_bias, key_rank, query_rank = _random_extras(mask, kind)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    with attention_bias(key_bias=key_bias, key_rank=key_rank, query_rank=query_rank):
        got = ours.generate(ids, **kwargs)
    assert torch.equal(got, _greedy_full_forwards(sdpa, ids, mask, key_bias, key_rank,
                                                  query_rank))
    assert not torch.equal(got, ours.generate(ids, **kwargs))  # the bias changed the tokens
    assert ak_attention._ACTIVE.prompt is None  # the context is gone after the block


def test_attention_bias_follows_the_batch_that_beam_search_expands(models, batch):
    # generate repeats each row num_beams times; a zero bias must leave beam search as SDPA's.
    ours, sdpa = models
    ids, mask = batch
    kwargs = dict(attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False)
    with attention_bias(key_bias=torch.zeros(mask.shape), key_rank=torch.zeros(mask.shape),
                        query_rank=torch.zeros(mask.shape)):
        got = ours.generate(ids, **kwargs)
    assert torch.equal(got, sdpa.generate(ids, **kwargs))


# ----------------------------------------------------------------------------- refusals


def _forward(config, attn="alignkern", **kwargs):
    torch.manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, 6))
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model(ids, **kwargs)


def _refuse_4d_float_mask():
    _forward(_llama_config(), attention_mask=torch.zeros(2, 1, 6, 6))


def _refuse_sliding_window_mistral():
    _forward(transformers.MistralConfig(**{**_llama_config().to_dict(), "sliding_window": 4}))


def _refuse_sliding_window_qwen2():
    _forward(transformers.Qwen2Config(**{**_llama_config().to_dict(), "use_sliding_window": True,
                                         "sliding_window": 4, "max_window_layers": 0}))


def _refuse_packed_sequences():
    # transformers looks for packing only without a cache and without an attention_mask
    _forward(_llama_config(), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]] * 2), use_cache=False)


def _refuse_attention_dropout():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_llama_config(attention_dropout=0.1),
                                             attn_implementation="alignkern").train()
    model(torch.randint(1, VOCAB, (2, 6)))


def _refuse_softcapping():
    # Gemma 2 also builds a sliding-window mask (refused first, at mask creation), so its own
    # attention layer is called directly, as Gemma2Model calls it.
    torch.manual_seed(0)
    config = transformers.Gemma2Config(**{**_llama_config().to_dict(), "head_dim": 16,
                                          "attn_logit_softcapping": 50.0})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="alignkern").eval()
    hidden = torch.randn(2, 6, config.hidden_size)
    positions = model.model.rotary_emb(hidden, torch.arange(6)[None])
    full = config.layer_types.index("full_attention")  # a layer with no sliding window
    model.model.layers[full].self_attn(hidden, positions, attention_mask=None)


def _refuse_gemma2_sliding_window():
    config = transformers.Gemma2Config(**{**_llama_config().to_dict(), "head_dim": 16})
    _forward(config)


def _refuse_static_cache():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_llama_config(), attn_implementation="alignkern")
    model.generate(torch.randint(1, VOCAB, (2, 6)), max_new_tokens=2, do_sample=False,
                   cache_implementation="static")


@pytest.mark.parametrize("run, setting", [
    (_refuse_4d_float_mask, "4-D float"),
    (_refuse_sliding_window_mistral, "sliding_window"),
    (_refuse_sliding_window_qwen2, "sliding_window"),
    (_refuse_packed_sequences, "packed sequences"),
    (_refuse_attention_dropout, "attention_dropout"),
    (_refuse_softcapping, "attn_logit_softcapping"),
    (_refuse_gemma2_sliding_window, "sliding_window"),
    (_refuse_static_cache, "static cache"),
], ids=lambda x: getattr(x, "__name__", x))
def test_refused_settings_raise_naming_the_setting(run, setting):
    register()
    with pytest.raises(ValueError, match=setting):
        run()


def test_refused_settings_work_where_reward_attention_can_express_them():
    register()
    torch.manual_seed(0)
    dropout_in_eval = AutoModelForCausalLM.from_config(_llama_config(attention_dropout=0.1),
                                                       attn_implementation="alignkern").eval()
    assert torch.isfinite(dropout_in_eval(torch.randint(1, VOCAB, (2, 6))).logits).all()
    no_window = transformers.MistralConfig(**{**_llama_config().to_dict(), "sliding_window": None})
    assert torch.isfinite(_forward(no_window).logits).all()


def test_bias_arguments_are_checked(models, batch):
    ours, _ = models
    ids, mask = batch
    with pytest.raises(ValueError, match="alignkern_key_bias must be a tensor of shape"):
        ours(ids, attention_mask=mask, alignkern_key_bias=torch.zeros(3, 10))
    with pytest.raises(ValueError, match="key_rank and query_rank go together"):
        with attention_bias(key_rank=torch.zeros(3, 9)):
            pass
    with pytest.raises(ValueError, match="one shape"):
        with attention_bias(key_bias=torch.zeros(3, 9), key_rank=torch.zeros(3, 8),
                            query_rank=torch.zeros(3, 8)):
            pass
    with attention_bias(key_bias=torch.zeros(3, 9)):
        with pytest.raises(ValueError, match="both"):
            ours(ids, attention_mask=mask, alignkern_key_bias=torch.zeros(3, 9))
    with attention_bias(key_bias=torch.zeros(3, 8)):
        with pytest.raises(ValueError, match="P = 8 prompt tokens"):
            ours.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert ak_attention._ACTIVE.prompt is None


# ----------------------------------------------------------------------------- layering


def test_import_alignkern_does_not_import_transformers():
    code = "import sys, alignkern; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"
