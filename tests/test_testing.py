"""alignkern.testing: the tiny model and tokenizer that the documentation's examples stand on."""

import pytest
import torch

pytest.importorskip("transformers")

from alignkern import testing  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tokenizer_encodes_any_text_and_decodes_it_back():
    tok = testing.tiny_tokenizer()
    text = "Can a cat fly? Zebras, 42 and ü are not in its training sentences."
    ids = tok(text).input_ids
    assert ids[0] == testing.BOS_ID
    assert max(ids) < testing.VOCAB_SIZE
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
        testing.PAD_ID, testing.BOS_ID, testing.EOS_ID)
    assert 256 < len(tok) <= testing.VOCAB_SIZE


def test_each_tokenizer_is_its_own_object():
    first = testing.tiny_tokenizer()
    first.padding_side = "left"
    assert testing.tiny_tokenizer().padding_side == "right"


def test_model_has_the_sizes_asked_for_and_is_in_eval_mode():
    model = testing.tiny_model(vocab_size=1000, hidden_size=32, num_layers=3, num_heads=4,
                               num_kv_heads=1, intermediate_size=48)
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.intermediate_size) == (1000, 32, 3, 4, 1, 48)
    assert not model.training
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[testing.BOS_ID, 5, 6, 7]])
    assert model(ids).logits.shape == (1, 4, 1000)


def test_same_seed_same_weights_and_global_random_state_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = testing.tiny_model(seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = testing.tiny_model(seed=3)
    c = testing.tiny_model(seed=4)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    # Far from transformers' training init (std 0.02): the distributions are far from uniform.
    assert 0.15 < a.lm_head.weight.std().item() < 0.25


def test_alignkern_attention_gives_the_logits_of_sdpa():
    tok = testing.tiny_tokenizer()
    batch = tok(["Can a cat fly?", "Is the sky blue on a clear day?"], return_tensors="pt",
                padding=True)
    sdpa = testing.tiny_model()
    ours = testing.tiny_model(attn_implementation="alignkern")
    assert ours.config._attn_implementation == "alignkern"
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = sdpa(**batch).logits[real]
        got = ours(**batch).logits[real]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"attn_implementation": "flash"}, ValueError, "attn_implementation must be one of"),
    ({"hidden_size": 30}, ValueError, "hidden_size (30) must be a multiple of num_heads (4)"),
    ({"num_kv_heads": 3}, ValueError, "num_heads (4) must be a multiple of num_kv_heads (3)"),
    ({"num_layers": 0}, ValueError, "num_layers must be at least 1, got 0"),
    ({"vocab_size": 512.0}, TypeError, "vocab_size must be an int, got float"),
])
def test_bad_model_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match="tiny_model: " + message.replace("(", r"\(").replace(")", r"\)")):
        testing.tiny_model(**kwargs)
