"""SharedPrefixCache: N rows continuing one prefix (or G prefixes) with the prefix's KV held once,
read by the alignkern attention backend through shared_prefix_attention. Compared with stock
transformers on the same weights: SDPA attention over a copied, repeated cache (or no cache at
all), greedy and sampled generate, beam search, a scoring forward's logits."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer  # noqa: E402

from alignkern.integrations import transformers as ak_hf  # noqa: E402
from alignkern.integrations.transformers import shared_prefix  # noqa: E402
from alignkern.loops.tiny import tiny_model, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Human: Can a cat fly?\nAssistant:", "Human: How do I bake bread today?\nAssistant:"]


@pytest.fixture(scope="module")
def models():
    """The same random weights on alignkern's attention and on SDPA."""
    ak_hf.register()
    return tiny_model(attn_implementation="alignkern"), tiny_model(attn_implementation="sdpa")


def _ids(text: str) -> torch.Tensor:
    return torch.tensor([tiny_tokenizer()(text).input_ids])


def _left_padded(texts):
    rows = [tiny_tokenizer()(t).input_ids for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _copied(prefix: DynamicCache, repeats: int) -> DynamicCache:
    """The copy path the cache replaces: a deep copy, each row repeated."""
    out = copy.deepcopy(prefix)
    out.batch_repeat_interleave(repeats)
    return out


def _stock_prefix(model, ids, mask=None) -> DynamicCache:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values


GEN = dict(max_new_tokens=10, pad_token_id=0, eos_token_id=None)


# ----------------------------------------------------------------------------- generate


def test_greedy_tokens_equal_stock_generate_on_the_copied_cache(models):
    ours, stock = models
    ids, rows = _ids(PROMPTS[0]), 5
    prefix = ak_hf.prefix_cache(ours, ids[:, :-1])
    before = [layer.keys.clone() for layer in prefix.layers]
    got = ours.generate(ids.repeat(rows, 1), cache=ak_hf.SharedPrefixCache(prefix, rows),
                        do_sample=False, **GEN)
    want = stock.generate(ids.repeat(rows, 1), cache=_copied(_stock_prefix(stock, ids[:, :-1]),
                                                             rows), do_sample=False, **GEN)
    assert got.shape == (rows, ids.shape[1] + 10)
    assert torch.equal(got, want)
    # the prefix cache it was built from is untouched (and could serve another SharedPrefixCache)
    assert all(torch.equal(layer.keys, b) for layer, b in zip(prefix.layers, before))
    assert prefix.get_seq_length() == ids.shape[1] - 1


def test_sampled_tokens_equal_stock_num_return_sequences_under_one_seed(models):
    ours, stock = models
    ids, rows = _ids(PROMPTS[1]), 6
    prefix = ak_hf.prefix_cache(ours, ids[:, :-1])
    torch.manual_seed(11)
    got = ours.generate(ids, cache=ak_hf.SharedPrefixCache(prefix, rows),
                        num_return_sequences=rows, do_sample=True, top_k=0, **GEN)
    torch.manual_seed(11)
    want = stock.generate(ids, num_return_sequences=rows, do_sample=True, top_k=0, **GEN)
    assert torch.equal(got, want)
    assert len({tuple(r) for r in got[:, ids.shape[1]:].tolist()}) > 1  # really sampled


def test_left_padded_prompts_in_groups_equal_stock_generate(models):
    """G = 2 prompts of different lengths, each continued by 3 rows: rows [3g, 3g + 3) read
    prefix g; padding over the prefix is per group."""
    ours, stock = models
    ids, mask = _left_padded(PROMPTS)
    assert not mask.all()
    prefix = ak_hf.prefix_cache(ours, ids[:, :-1], mask[:, :-1])
    cache = ak_hf.SharedPrefixCache(prefix, 6)
    assert cache.rows == 6 and cache.prefix_length == ids.shape[1] - 1
    got = ours.generate(ids.repeat_interleave(3, 0), attention_mask=mask.repeat_interleave(3, 0),
                        cache=cache, do_sample=False, **GEN)
    want = stock.generate(ids.repeat_interleave(3, 0), attention_mask=mask.repeat_interleave(3, 0),
                          do_sample=False, **GEN)
    assert torch.equal(got, want)


def test_beam_search_reorders_rows_within_the_prefix(models):
    ours, stock = models
    ids = _ids(PROMPTS[0])
    prefix = ak_hf.prefix_cache(ours, ids[:, :-1])
    got = ours.generate(ids, cache=ak_hf.SharedPrefixCache(prefix, 3), num_beams=3,
                        do_sample=False, **GEN)
    want = stock.generate(ids, num_beams=3, do_sample=False, **GEN)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- scoring


def test_a_scoring_forward_over_candidates_equals_the_full_forward(models):
    """Right-padded candidates after one prefix: logits at every real position equal SDPA's over
    the concatenated sequences, fp32 within 1e-5."""
    ours, stock = models
    prefix_ids = _ids(PROMPTS[1])
    torch.manual_seed(0)
    lengths = [7, 3, 5, 1]
    cand = torch.randint(3, 500, (len(lengths), max(lengths)))
    cand_mask = torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths])
    cand = cand.masked_fill(cand_mask == 0, 0)
    prefix = ak_hf.prefix_cache(ours, prefix_ids)
    mask = torch.cat([torch.ones(len(lengths), prefix_ids.shape[1], dtype=torch.long), cand_mask],
                     1)
    with torch.no_grad():
        got = ours(input_ids=cand, attention_mask=mask,
                   cache=ak_hf.SharedPrefixCache(prefix, len(lengths))).logits
        full = torch.cat([prefix_ids.repeat(len(lengths), 1), cand], 1)
        want = stock(input_ids=full, attention_mask=mask).logits[:, prefix_ids.shape[1]:]
    real = cand_mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)


def test_the_key_bias_over_the_prefix_reaches_the_shared_part(models):
    """alignkern_key_bias over (N, Lp + Ls), the same on the prefix for every row: equal to the
    same bias on the full forward without a cache."""
    ours, _ = models
    prefix_ids, rows = _ids(PROMPTS[0]), 3
    cand = torch.randint(3, 500, (rows, 4))
    length = prefix_ids.shape[1] + 4
    torch.manual_seed(1)
    bias = torch.cat([torch.randn(1, prefix_ids.shape[1]).expand(rows, -1),
                      torch.randn(rows, 4)], 1)
    prefix = ak_hf.prefix_cache(ours, prefix_ids,
                                alignkern_key_bias=bias[:1, :prefix_ids.shape[1]])
    with torch.no_grad():
        got = ours(input_ids=cand, cache=ak_hf.SharedPrefixCache(prefix, rows),
                   alignkern_key_bias=bias).logits
        full = torch.cat([prefix_ids.repeat(rows, 1), cand], 1)
        want = ours(input_ids=full, alignkern_key_bias=bias).logits[:, -4:]
    assert full.shape[1] == length
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    bad = bias.clone()
    bad[1, 0] += 1.0  # row 1 would need its own copy of the prefix
    with pytest.raises(ValueError, match="must be the same for all rows of a prefix"):
        ours(input_ids=cand, cache=ak_hf.SharedPrefixCache(prefix, rows), alignkern_key_bias=bad)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_another_attention_implementation_raises_instead_of_attending_the_suffix_alone(
        models, implementation):
    ours, _ = models
    ids = _ids(PROMPTS[0])
    prefix = ak_hf.prefix_cache(ours, ids[:, :-1])
    other = tiny_model(attn_implementation=implementation)
    with pytest.raises(RuntimeError, match="not alignkern's.*attn_implementation='alignkern'"):
        other(input_ids=ids[:, -1:].repeat(2, 1), cache=ak_hf.SharedPrefixCache(prefix, 2))


def test_bad_prefixes_and_row_counts_raise_clear_errors(models):
    ours, _ = models
    ids, mask = _left_padded(PROMPTS)
    prefix = ak_hf.prefix_cache(ours, ids, mask)  # G = 2
    with pytest.raises(TypeError, match="prefix must be a transformers DynamicCache"):
        ak_hf.SharedPrefixCache(prefix.layers[0], 2)
    with pytest.raises(ValueError, match="positive multiple of the prefix cache's batch G = 2"):
        ak_hf.SharedPrefixCache(prefix, 3)
    with pytest.raises(ValueError, match="no layers"):
        ak_hf.SharedPrefixCache(DynamicCache(), 2)
    sliding = DynamicCache()
    sliding.layers = [DynamicSlidingWindowLayer(sliding_window=4)]
    sliding.layers[0].update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))
    with pytest.raises(ValueError, match="DynamicSlidingWindowLayer; only full-attention"):
        ak_hf.SharedPrefixCache(sliding, 2)
    cache = ak_hf.SharedPrefixCache(prefix, 4)
    with pytest.raises(ValueError, match="runs 2 rows, the cache holds 4.*num_return_sequences"):
        ours(input_ids=ids[:, -1:], cache=cache)


def test_cache_operations_that_would_break_the_sharing_raise(models):
    ours, _ = models
    ids = _ids(PROMPTS[0])
    prefix = ak_hf.prefix_cache(ours, ids[:, :-1])
    cache = ak_hf.SharedPrefixCache(prefix, 2)
    ours(input_ids=ids[:, -1:].repeat(2, 1), cache=cache)
    assert cache.get_seq_length() == ids.shape[1]
    with pytest.raises(ValueError, match=f"cannot keep {ids.shape[1] - 2} tokens.*cannot be "
                                         "cropped"):
        cache.crop(ids.shape[1] - 2)
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-2)
    cache.crop(-1)  # back to the prefix alone
    assert cache.get_seq_length() == ids.shape[1] - 1
    with pytest.raises(ValueError, match="batch_select_indices"):
        cache.batch_select_indices(torch.tensor([0]))
    grouped = ak_hf.SharedPrefixCache(ak_hf.prefix_cache(ours, ids.repeat(2, 1)), 4)
    with pytest.raises(ValueError, match="only take a row of its own prefix"):
        grouped.reorder_cache(torch.tensor([0, 2, 2, 3]))
    grouped.reorder_cache(torch.tensor([1, 1, 3, 2]))


# ----------------------------------------------------------------------------- the loops' helper


def test_continuation_cache_shares_where_it_can_and_copies_elsewhere(models):
    ours, stock = models
    ids = _ids(PROMPTS[0])
    prefix = _stock_prefix(stock, ids[:, :-1])
    with shared_prefix.continuation_cache(stock, prefix, 3) as cache:
        assert isinstance(cache, ak_hf.SharedPrefixCache)
        assert stock.config._attn_implementation == "alignkern"  # switched inside the block
        with torch.no_grad():
            got = stock(input_ids=ids[:, -1:].repeat(3, 1), cache=cache).logits
    assert stock.config._attn_implementation == "sdpa"  # and back
    with torch.no_grad():
        want = stock(input_ids=ids.repeat(3, 1)).logits[:, -1:]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    windowed = copy.deepcopy(stock)
    windowed.config.sliding_window = 64  # a setting alignkern's attention refuses: copy path
    with shared_prefix.continuation_cache(windowed, prefix, 3) as cache:
        assert type(cache) is DynamicCache and cache.layers[0].keys.shape[0] == 3
        assert windowed.config._attn_implementation == "sdpa"
    assert prefix.layers[0].keys.shape[0] == 1  # never modified
