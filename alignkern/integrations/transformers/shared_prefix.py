"""A KV cache that holds a shared prefix once for N rows: ``SharedPrefixCache``.

Self-correction loops sample or score N continuations of one text (a prompt, a judge template, a
committed answer). Repeating that text's KV cache per row (``batch_repeat_interleave``) costs N
copies and N reads at every step; ``SharedPrefixCache`` keeps the prefix's keys and values once,
appends each row's own tokens to a per-row suffix, and the alignkern attention backend runs
``alignkern.shared_prefix_attention`` over the two (the prefix part as one problem for all rows):

    from alignkern.integrations import transformers as ak_hf

    ak_hf.register()
    model.set_attn_implementation("alignkern")
    prefix = ak_hf.prefix_cache(model, prompt_ids[:, :-1])      # batch 1 (or G prompts)
    shared = ak_hf.SharedPrefixCache(prefix, rows=8)            # 8 rows, no copy
    out = model.generate(prompt_ids.repeat(8, 1), cache=shared, do_sample=True)

What it supports: decoder-only models whose every layer is full (global) causal attention, run
with the alignkern attention implementation; a prefix cache that is a ``DynamicCache`` of plain
``DynamicLayer`` layers (what the model returns with ``use_cache=True``), of batch G (one prefix
per group of ``rows / G`` consecutive rows). What it refuses, naming the setting: another attention
implementation (the suffix alone would be attended), sliding-window, quantized, offloaded, static
or recurrent caches, and cache operations that would break the sharing (``batch_select_indices``,
a ``reorder_cache`` across prefixes, a ``crop`` into the prefix). ``generate``'s beam search and
``num_return_sequences`` work (they repeat rows within a prefix); the prefix cache it was built
from is never modified and may be shared by several ``SharedPrefixCache`` at once.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from alignkern import _checks

_NAME = "SharedPrefixCache"


class SuffixOnly(torch.Tensor):
    """The suffix keys or values a ``SharedPrefixLayer`` hands the attention (no copy: a view of
    the layer's tensor). They cover only the tokens after the shared prefix, so an attention that
    does not know the prefix would silently attend too little: every torch operation on them
    raises, except reading their shape, dtype and device. alignkern's backend takes the layer from
    ``shared_prefix_of`` and reads its plain tensors instead."""

    layer: SharedPrefixLayer

    @staticmethod
    def wrap(tensor: torch.Tensor, layer: SharedPrefixLayer) -> SuffixOnly:
        wrapped = tensor.as_subclass(SuffixOnly)
        wrapped.layer = layer
        return wrapped

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise RuntimeError(
            f"{_NAME}: the layer's attention ran {getattr(func, '__name__', func)} on the suffix "
            "keys alone, without the shared prefix: the model's attention implementation is not "
            "alignkern's. Run the model with attn_implementation='alignkern' (alignkern."
            "integrations.transformers.register(), then model.set_attn_implementation("
            "'alignkern'))")


_METADATA = {torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
             torch.Tensor.size, torch.Tensor.dim, torch.Tensor.ndim.__get__,
             torch.Tensor.is_cuda.__get__, torch.Tensor.requires_grad.__get__,
             torch.Tensor.__repr__, torch.Tensor.__format__}


class SharedPrefixLayer(CacheLayerMixin):
    """One layer of a ``SharedPrefixCache``: the prefix's keys and values ``(G, Hkv, Lp, D)``,
    read-only, and the rows' suffix ``(N, Hkv, Ls, D)``, grown by ``update``."""

    is_sliding = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, rows: int):
        super().__init__()
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        groups, heads, _, head_dim = prefix_keys.shape
        self.keys = prefix_keys.new_empty((rows, heads, 0, head_dim))
        self.values = prefix_values.new_empty((rows, heads, 0, prefix_values.shape[-1]))
        self.device = prefix_keys.device
        self.is_initialized = True

    @property
    def prefix_length(self) -> int:
        return self.prefix_keys.shape[-2]

    @property
    def rows(self) -> int:
        return self.keys.shape[0]

    def lazy_initialization(self, key_states, value_states) -> None:  # always initialized
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(N, Hkv, L, D)`` to the suffix; return the suffix's keys and values as
        ``SuffixOnly`` tensors, which only alignkern's attention backend reads."""
        if key_states.shape[0] != self.rows:
            raise ValueError(
                f"{_NAME}: the model runs {key_states.shape[0]} rows, the cache holds {self.rows} "
                "(rows=... when it was built; generate does not expand a cache it is given, so "
                "with num_return_sequences=n build it with rows = batch * n)")
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return SuffixOnly.wrap(self.keys, self), SuffixOnly.wrap(self.values, self)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.prefix_length + self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Drop the suffix (the prefix stays)."""
        self.keys, self.values = self.keys[..., :0, :], self.values[..., :0, :]

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens (a negative value: remove that many from the
        end), as ``DynamicLayer.crop``; only suffix tokens can be removed."""
        total = self.get_seq_length()
        keep = total + max_length if max_length < 0 else min(max_length, total)
        if keep < self.prefix_length:
            raise ValueError(f"{_NAME}.crop: cannot keep {keep} tokens: the first "
                             f"{self.prefix_length} are the shared prefix, which cannot be "
                             "cropped")
        keep -= self.prefix_length
        self.keys, self.values = self.keys[..., :keep, :], self.values[..., :keep, :]

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row ``repeats`` times, in place (``num_return_sequences``, beams): the rows of a
        prefix stay together, so the prefix is not copied."""
        self.keys = self.keys.repeat_interleave(repeats, dim=0)
        self.values = self.values.repeat_interleave(repeats, dim=0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search's reordering, allowed within each prefix's rows."""
        beam_idx = beam_idx.to(self.keys.device)
        groups = self.prefix_keys.shape[0]
        per_group = self.rows // groups
        group_of = torch.arange(self.rows, device=beam_idx.device) // per_group
        if beam_idx.shape != (self.rows,) or not torch.equal(beam_idx // per_group, group_of):
            raise ValueError(f"{_NAME}.reorder_cache: each row may only take a row of its own "
                             "prefix")
        self.keys = self.keys.index_select(0, beam_idx)
        self.values = self.values.index_select(0, beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ValueError(f"{_NAME}: batch_select_indices (contrastive search, a batch that drops "
                         "rows) is not supported: it would break which rows share a prefix")

    def offload(self):
        raise ValueError(f"{_NAME}: offloading is not supported")


class SharedPrefixCache(Cache):
    """A transformers ``Cache`` for N rows that continue one prefix (or G prefixes, each shared by
    ``N / G`` consecutive rows), holding the prefix's KV once.

    Args:
        prefix: the prefix's cache, a ``DynamicCache`` of batch G >= 1 (e.g. from
            ``prefix_cache``); not modified, not copied.
        rows: N, the rows that continue it (a multiple of G); row r continues prefix ``r // (N /
            G)``.

    The cache's sequence length counts the prefix: pass ``generate`` the full sequences (prefix
    tokens and at least one more, e.g. the prompt's last token), repeated per row, as with any
    cache that already covers the first tokens. With left-padded prompts, build the prefix from
    the padded batch and pass the padded ids and mask (each prefix's rows must share its mask).

    Raises:
        TypeError: ``prefix`` is not a transformers ``DynamicCache``, ``rows`` not an int.
        ValueError: a layer that is not a plain full-attention ``DynamicLayer`` (sliding window,
            quantized, recurrent), an empty prefix cache, layers of different lengths or batch
            sizes, ``rows`` not a positive multiple of G.

    Example:
        >>> prefix = ak_hf.prefix_cache(model, ids[:, :-1])
        >>> out = model.generate(ids.repeat(8, 1), cache=ak_hf.SharedPrefixCache(prefix, 8),
        ...                      do_sample=True, max_new_tokens=16)
    """

    def __init__(self, prefix: DynamicCache, rows: int):
        rows = _checks.integer(_NAME, "rows", rows)
        layers = _prefix_layers(prefix)
        groups = layers[0].keys.shape[0]
        if rows < 1 or rows % groups:
            raise ValueError(f"{_NAME}: rows must be a positive multiple of the prefix cache's "
                             f"batch G = {groups} (rows [g*m, (g+1)*m) share prefix g), got "
                             f"{rows}")
        super().__init__(layers=[SharedPrefixLayer(layer.keys, layer.values, rows)
                                 for layer in layers])

    @property
    def prefix_length(self) -> int:
        """The tokens of the shared prefix."""
        return self.layers[0].prefix_length

    @property
    def rows(self) -> int:
        return self.layers[0].rows


def _prefix_layers(prefix) -> list[DynamicLayer]:
    """The prefix cache's layers, checked: plain ``DynamicLayer``s of one batch and length."""
    if not isinstance(prefix, DynamicCache):
        raise TypeError(f"{_NAME}: prefix must be a transformers DynamicCache (the cache of a "
                        f"forward with use_cache=True), got {_checks.describe(prefix)}")
    if getattr(prefix, "offloading", False):
        raise ValueError(f"{_NAME}: an offloaded prefix cache is not supported")
    layers = list(prefix.layers)
    if not layers:
        raise ValueError(f"{_NAME}: the prefix cache has no layers (run the prefix through the "
                         "model first)")
    for index, layer in enumerate(layers):
        if type(layer) is not DynamicLayer:
            raise ValueError(
                f"{_NAME}: layer {index} of the prefix cache is a {type(layer).__name__}; only "
                "full-attention DynamicLayer layers can share a prefix (no sliding-window, "
                "quantized, static or recurrent layers)")
        if not layer.is_initialized or layer.keys is None or layer.keys.dim() != 4:
            raise ValueError(f"{_NAME}: layer {index} of the prefix cache holds no keys")
    shapes = {(layer.keys.shape[0], layer.keys.shape[2]) for layer in layers}
    if len(shapes) != 1:
        raise ValueError(f"{_NAME}: the prefix cache's layers differ in batch or length: "
                         f"{sorted(shapes)}")
    return layers


def shared_prefix_of(key: torch.Tensor) -> SharedPrefixLayer | None:
    """The layer whose suffix ``key`` is, or None for ordinary keys (the attention backend
    asks)."""
    return key.layer if isinstance(key, SuffixOnly) else None


def prefix_cache(model: torch.nn.Module, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, **forward_kwargs) -> DynamicCache:
    """The KV cache of ``input_ids (G, P)`` (one prefix per row; left-padded with
    ``attention_mask``), from one decoder forward without the LM head, for ``SharedPrefixCache``.

    Positions follow the mask as ``generate`` counts them. ``forward_kwargs`` reach the decoder
    (e.g. ``alignkern_key_bias``).
    """
    from .scoring import positions_from_mask

    positions = None if attention_mask is None else positions_from_mask(attention_mask)
    decoder = model.get_decoder()
    with torch.no_grad():
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                      use_cache=True, **forward_kwargs)
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


@contextlib.contextmanager
def alignkern_attention(model: torch.nn.Module) -> Iterator[bool]:
    """Run ``model`` on alignkern attention inside the block (registered if needed), then put its
    attention implementation back. Yields whether the switch succeeded (False: the model cannot
    switch, e.g. it does not support attention backends; it runs unchanged)."""
    from .attention import register, reward_attention_forward

    config = model.config
    before = getattr(config, "_attn_implementation", None)
    if before is not None and AttentionInterface._global_mapping.get(before) \
            is reward_attention_forward:
        yield True
        return
    try:
        model.set_attn_implementation(register())
    except (ValueError, ImportError, AttributeError):
        yield False
        return
    try:
        yield True
    finally:
        model.set_attn_implementation(before)


def can_share(cache) -> bool:
    """Whether ``SharedPrefixCache`` accepts ``cache`` as its prefix."""
    try:
        _prefix_layers(cache)
    except (TypeError, ValueError):
        return False
    return True


def model_can_share(model: torch.nn.Module) -> bool:
    """Whether ``model``'s attention layers can all run alignkern's attention over a shared prefix:
    a decoder-only model with no attention softcapping, sliding window or attention dropout in
    training (the settings alignkern's attention refuses)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if any(getattr(config, name, None) is not None
           for name in ("attn_logit_softcapping", "sliding_window")):
        return False
    return not (model.training and getattr(config, "attention_dropout", 0.0))


@contextlib.contextmanager
def continuation_cache(model: torch.nn.Module, prefix, rows: int, *,
                       share: bool = True) -> Iterator[Cache]:
    """A cache for ``rows`` rows continuing ``prefix`` (batch G; ``rows`` a multiple of G), for
    the duration of the block. Where rows repeat a prefix and the model and the prefix allow it
    (``model_can_share``, ``can_share``), a ``SharedPrefixCache`` with the model on alignkern
    attention inside the block (one copy of the prefix, read once per step for all rows);
    otherwise a deep copy of the prefix with each of its rows repeated ``rows / G`` times (always
    with ``share=False``). With one row per prefix (``rows == G``) nothing is shared, and the
    copy is the faster of the two (measured on CPU: a decoding step after a 1,000-token prefix
    7.2 ms against 8.9 ms for the two-part attention). ``prefix`` is never modified."""
    repeats = rows // _batch_of(prefix)
    if share and repeats > 1 and model_can_share(model) and can_share(prefix):
        with alignkern_attention(model) as switched:
            if switched:
                yield SharedPrefixCache(prefix, rows)
                return
    copied = copy.deepcopy(prefix)
    if repeats > 1:
        copied.batch_repeat_interleave(repeats)
    yield copied


def _batch_of(cache) -> int:
    for layer in getattr(cache, "layers", ()):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() == 4:
            return keys.shape[0]
    return 1
