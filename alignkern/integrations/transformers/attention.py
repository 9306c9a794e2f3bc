"""``alignkern.reward_attention`` as a transformers attention backend.

    from alignkern.integrations.transformers import attention_bias, register

    register()                                   # once; returns "alignkern"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="alignkern")
    # or: model.set_attn_implementation("alignkern")

    logits = model(ids, attention_mask=mask, alignkern_key_bias=bias).logits      # bias (B, L)
    with attention_bias(key_bias=bias):                                            # bias (B, P)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=16)

``register`` puts two functions behind one name: ``reward_attention_mask`` in transformers'
``AttentionMaskInterface`` (called once per forward by ``create_causal_mask``; it returns the 2-D
padding mask of the keys, ``(B, Lk)`` bool, or None) and ``reward_attention_forward`` in its
``AttentionInterface`` (called by every attention layer; it turns that padding mask into a ``-inf``
key bias, adds the caller's reward bias, takes the ranks, and runs ``alignkern.reward_attention``
with ``causal=module.is_causal``, bottom-right aligned, so that a one-token query at a decode step
sees the whole KV cache).

Where the bias and ranks come from, in every layer:
  * forward keyword arguments ``alignkern_key_bias``, ``alignkern_key_rank``,
    ``alignkern_query_rank``, each ``(B, L)`` over the tokens the keys cover (cached and new, like a
    2-D ``attention_mask``); transformers hands unknown forward kwargs down to the attention
    function;
  * or, for ``generate`` (which rejects unknown model kwargs), the ``attention_bias`` context.

What ``reward_attention`` cannot express raises ``ValueError`` naming the setting, never a fallback:
a 4-D (or other prepared) ``attention_mask``, sliding windows, chunked or block-wise attention,
packed sequences, custom ``or``/``and`` mask functions, attention dropout while training, softcapped
scores, attention sinks, position biases, and caches whose queries are not the last keys (static
caches). Packed sequences are what transformers detects (position_ids that restart, in a forward
with neither cache nor attention_mask); under ``torch.compile`` it cannot check, so it always
builds the packed mask there: pass an ``attention_mask`` when compiling. ``output_attentions=True``
changes no number, so it is treated as SDPA treats it: a warning (once), the same outputs, and no
attention weights (``outputs.attentions == ()``).

Importing this module imports transformers; ``import alignkern`` does not.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
)
from transformers.utils import logging as transformers_logging

import alignkern

from .shared_prefix import SharedPrefixLayer, shared_prefix_of

DEFAULT_NAME = "alignkern"
# A child of transformers' library logger: its handler, format and verbosity, like SDPA's warnings.
_LOGGER = transformers_logging.get_logger(f"transformers.{__name__}")
KEY_BIAS_KWARG = "alignkern_key_bias"
KEY_RANK_KWARG = "alignkern_key_rank"
QUERY_RANK_KWARG = "alignkern_query_rank"

# Keyword arguments that models hand to the attention function and that reward_attention cannot
# honour when set (not None): the argument and the setting it comes from.
_UNSUPPORTED_KWARGS = {
    "softcap": "softcapping of attention scores (config.attn_logit_softcapping, Gemma 2)",
    "sliding_window": "a sliding window (config.sliding_window)",
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
    "position_bias": "a per-layer position_bias",
}

# Parts of transformers' mask functions (masking_utils) that reward_attention cannot express,
# found by name in a mask function and its closures: what the setting is called.
_MASK_PARTS = (
    ("packed_sequence", "packed sequences (position_ids that restart within a row)"),
    ("sliding_window", "a sliding window (config.sliding_window)"),
    ("chunked", "chunked attention (config.attention_chunk_size)"),
    ("blockwise", "block-wise attention (block_sequence_ids)"),
)


class _Extras(NamedTuple):
    """The bias and ranks for one layer call: ``key_bias (B, Lk)`` float, ``key_rank (B, Lk)``,
    ``query_rank (B, Lq)``; any may be None (the ranks together)."""

    key_bias: torch.Tensor | None
    key_rank: torch.Tensor | None
    query_rank: torch.Tensor | None


class _PromptBias:
    """What an ``attention_bias`` context holds: the prompt's ``(B, P)`` tensors, the thread that
    entered it, and ``seen``: how many tokens of the sequence (the prompt, then the generated
    ones) the forwards since the last prefill covered; a decode step may not start past them."""

    def __init__(self, extras: _Extras, prompt_length: int):
        self.extras = extras
        self.prompt_length = prompt_length
        self.thread = threading.get_ident()
        self.seen = 0

    @property
    def argument(self) -> str:
        """The name of what the context was given, for error messages."""
        return "key_bias" if self.extras.key_bias is not None else "key_rank/query_rank"


class _Active:
    """The innermost ``attention_bias`` context. A plain attribute, not a ContextVar: dynamo cannot
    trace ``ContextVar.get`` under ``fullgraph=True``; the owning thread is checked instead."""

    prompt: _PromptBias | None = None


_ACTIVE = _Active()


# ----------------------------------------------------------------------------- registration


def register(name: str = DEFAULT_NAME) -> str:
    """Register ``reward_attention_forward`` with ``transformers.AttentionInterface`` and
    ``reward_attention_mask`` with ``AttentionMaskInterface`` under ``name``, so that
    ``attn_implementation=name`` (``from_pretrained``, ``from_config``, ``set_attn_implementation``)
    runs every attention layer on ``alignkern.reward_attention``, in training and in ``generate``.

    Both are needed: with only an attention function, transformers builds no mask and passes
    ``attention_mask=None``, which would drop the padding. Idempotent.

    Args:
        name: the ``attn_implementation`` to register, default ``"alignkern"``.

    Returns:
        ``name``.

    Raises:
        TypeError: ``name`` is not a non-empty string.
        ValueError: ``name`` is already taken by another attention implementation (``"sdpa"``,
            ``"eager"``, ``"flash_attention_2"``, ... or someone else's).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register: name must be a non-empty string, got {name!r}")
    for interface, function in ((AttentionInterface, reward_attention_forward),
                                (AttentionMaskInterface, reward_attention_mask)):
        taken = interface._global_mapping.get(name)
        if name == "eager" or (taken is not None and not _is_ours(taken, function)):
            raise ValueError(f"register: the attention implementation {name!r} is taken by "
                             f"{getattr(taken, '__qualname__', taken)!r}; choose another name")
    for interface, function in ((AttentionInterface, reward_attention_forward),
                                (AttentionMaskInterface, reward_attention_mask)):
        interface.register(name, function)
    return name


def _is_ours(registered: Callable, function: Callable) -> bool:
    """Whether ``registered`` is ``function`` (or the same function from a reloaded module)."""
    return registered is function or (
        getattr(registered, "__module__", None) == function.__module__
        and getattr(registered, "__qualname__", None) == function.__qualname__)


# ----------------------------------------------------------------------------- bias for generate


@contextlib.contextmanager
def attention_bias(*, key_bias: torch.Tensor | None = None, key_rank: torch.Tensor | None = None,
                   query_rank: torch.Tensor | None = None) -> Iterator[None]:
    """Give every alignkern attention layer a reward bias and Plackett–Luce ranks for the prompt,
    for ``model.generate`` (which rejects unknown model kwargs).

    The tensors cover the prompt as passed to ``generate``: ``(B, P)`` with ``P =
    input_ids.shape[1]``, left padding included (padding is masked anyway). Tokens generated
    later get bias 0 and, when ranks are given, the key rank and query rank of the last prompt
    token (column ``P - 1``). At each decode step the keys are the prompt plus the tokens generated
    so far, so layer calls see ``key_bias`` extended with zeros to ``(B, P + t)``. A batch that
    ``generate`` expanded (``num_beams``, ``num_return_sequences``: each row repeated n times)
    gets each row's tensors repeated n times.

    Every forward inside the context is checked against P, not only the first, so that a second
    ``generate`` in the same context cannot run with the first one's bias:

      * a forward whose queries include prompt tokens (a prefill: ``generate``'s first forward,
        with or without a cached prefix of the prompt) must cover exactly the P prompt tokens
        (so ``prefill_chunk_size`` is not supported);
      * a forward whose queries all come after the prompt (a decode step, or candidate tokens
        being verified) may not start past the tokens the forwards since the last prefill
        covered: keys this context never saw come from a cache made elsewhere, for a prompt
        the bias does not describe.

    So ``generate`` may run several times in one context on prompts of P tokens (each as in a
    fresh context); a prompt of another length raises ``ValueError``. A ``generate`` that
    continues an earlier one of the same context from its cache (``cache=`` its
    ``past_key_values``, the sequences so far plus new tokens as ``input_ids``) continues the
    sequence: the tokens after the prompt, new ones included, get bias 0 and the last prompt
    token's ranks, as generated tokens do. Assisted generation works with prompt lookup
    (``prompt_lookup_num_tokens``), not with an ``assistant_model``: the main model's first
    forward then reads the prompt and the assistant's candidate tokens at once, which no length
    check can tell from a longer prompt, so it raises.

    The context is process-wide and belongs to the thread that entered it: a layer running in
    another thread while it is active raises. Nested contexts: the inner one wins until it exits.

    Args:
        key_bias: ``(B, P)`` float, added to the scores of each key (e.g. ``beta * reward``).
        key_rank, query_rank: ``(B, P)`` real numbers, together: key j is visible to query i only
            if ``key_rank_j <= query_rank_i`` (the reward-ordering mask).

    Raises:
        TypeError: an argument that is not a tensor.
        ValueError: a tensor that is not 2-D, tensors whose shapes differ, only one of the ranks,
            another thread's context still active. (dtypes are checked by ``reward_attention``.)
            Raised by the model's forward inside the context: a forward over a prompt that is not
            P tokens long (see above), naming the argument, P and the length received.

    Example:
        >>> with attention_bias(key_bias=alignkern.segment_bias(rewards, segment_ids, beta=2.0)):
        ...     out = model.generate(ids, attention_mask=mask, max_new_tokens=32)
    """
    extras = _Extras(key_bias, key_rank, query_rank)
    prompt_length = _check_prompt_tensors(extras)
    outer = _ACTIVE.prompt
    if outer is not None and outer.thread != threading.get_ident():
        raise ValueError("attention_bias: another thread's attention_bias context is active; the "
                         "context is process-wide, so one thread at a time may use it")
    _ACTIVE.prompt = _PromptBias(extras, prompt_length)
    try:
        yield
    finally:
        _ACTIVE.prompt = outer


def _check_prompt_tensors(extras: _Extras) -> int:
    """Each given tensor 2-D, all of one shape ``(B, P)``, the ranks together. Returns P (0 when
    nothing is given)."""
    given = {arg: value for arg, value in zip(("key_bias", "key_rank", "query_rank"), extras)
             if value is not None}
    for arg, value in given.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"attention_bias: {arg} must be a tensor, got {type(value).__name__}")
        if value.dim() != 2:
            raise ValueError(f"attention_bias: {arg} must be 2-D (B, P), one value per prompt "
                             f"token, got shape {tuple(value.shape)}")
    if len({tuple(value.shape) for value in given.values()}) > 1:
        raise ValueError("attention_bias: key_bias, key_rank and query_rank must have one shape "
                         f"(B, P), got {({a: tuple(v.shape) for a, v in given.items()})}")
    if (extras.key_rank is None) != (extras.query_rank is None):
        raise ValueError("attention_bias: key_rank and query_rank go together: got only "
                         f"{'key_rank' if extras.query_rank is None else 'query_rank'}")
    return next(iter(given.values())).shape[1] if given else 0


# ----------------------------------------------------------------------------- the mask function


def reward_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The ``AttentionMaskInterface`` function: what ``create_causal_mask`` (and
    ``create_bidirectional_mask``, ``create_sliding_window_causal_mask``, ...) build for
    ``reward_attention_forward``.

    Causality is not materialised (the attention function passes ``causal=module.is_causal`` to
    the kernel); only padding is returned, aligned with the layer's keys.

    Args:
        batch_size, q_length, kv_length, q_offset, kv_offset: the sizes transformers computed from
            the inputs and the cache (keys cover sequence positions
            ``[kv_offset, kv_offset + kv_length)``, queries start at ``q_offset``).
        mask_function: transformers' mask pattern; only the plain causal and bidirectional ones
            can be expressed.
        attention_mask: the 2-D padding mask ``(B, >= kv_offset + kv_length)`` as bool (True =
            attend), or None.
        local_size: set by sliding-window and chunked masks.

    Returns:
        ``(B, kv_length)`` bool, True where a key may be attended, or None (no padding).

    Raises:
        ValueError: a pattern that cannot be expressed, named (sliding window, chunked,
            block-wise, packed sequences, custom mask functions), or a causal mask whose queries
            are not the last keys (a static cache). Raised when the mask is built, before any
            layer runs; so a model that builds a sliding-window mask is refused even if none of
            its layers slides (Gemma 2 always builds one).
    """
    unsupported = _unsupported_pattern(mask_function, local_size)
    if unsupported is not None:
        raise ValueError(f"alignkern attention: {unsupported}")
    if mask_function is causal_mask_function and not _queries_are_last_keys(
            q_length, kv_length, q_offset, kv_offset):
        raise ValueError("alignkern attention: "
                         f"{_static_cache_message(q_length, kv_length, q_offset, kv_offset)}")
    return _key_padding(attention_mask, kv_length, kv_offset)


def _unsupported_pattern(mask_function: Callable, local_size: int | None) -> str | None:
    """None for the plain causal and bidirectional masks, else why the mask cannot be used."""
    if local_size is None and mask_function in (causal_mask_function, bidirectional_mask_function):
        return None
    return (f"{_describe_mask_pattern(mask_function, local_size)} cannot be expressed by "
            "reward_attention (only causal or bidirectional attention with a 2-D padding mask); "
            "use another attn_implementation")


def _describe_mask_pattern(mask_function: Callable, local_size: int | None) -> str:
    """The setting behind a mask function transformers composed (masking_utils names its parts)."""
    if torch.compiler.is_compiling():  # closures cannot be inspected while tracing
        return ("a mask other than plain causal/bidirectional (sliding window, packed sequences: "
                "under torch.compile with attention_mask=None transformers assumes position_ids "
                "may restart, so pass an attention_mask, or block-wise/custom masks)")
    names = _function_names(mask_function)
    for part, setting in _MASK_PARTS:
        if any(part in name for name in names):
            return f"{setting}{'' if local_size is None else f' of size {local_size}'}"
    if local_size is not None:
        return f"a local attention window of size {local_size} (config.sliding_window)"
    return (f"a custom mask function ({getattr(mask_function, '__qualname__', mask_function)}; "
            "or_mask_function / and_mask_function, e.g. image-token or bidirectional overlays)")


def _function_names(function: Callable, depth: int = 0) -> set[str]:
    """Qualified names of ``function`` and of the functions in its closure, recursively."""
    names = {getattr(function, "__qualname__", "")}
    for cell in getattr(function, "__closure__", None) or ():
        contents = cell.cell_contents
        for content in contents if isinstance(contents, (tuple, list)) else (contents,):
            if callable(content) and depth < 8:  # and_masks / or_masks keep a tuple of functions
                names |= _function_names(content, depth + 1)
    return names


def _queries_are_last_keys(q_length: int, kv_length: int, q_offset: int | torch.Tensor,
                           kv_offset: int) -> bool:
    """reward_attention's causal mask is bottom-right aligned: query i sees key j iff
    ``j <= i + Lk - Lq``. That is the model's causal mask only when the queries are the last
    ``Lq`` keys (DynamicCache, or no cache); a static cache holds empty slots after them (and may
    give its offset as a tensor)."""
    return not isinstance(q_offset, torch.Tensor) and q_offset + q_length == kv_offset + kv_length


def _static_cache_message(q_length: int, kv_length: int, q_offset: int | torch.Tensor,
                          kv_offset: int) -> str:
    return (f"the queries are not the last keys of the layer (queries at offset {q_offset} + "
            f"{q_length}, keys at offset {kv_offset} + {kv_length}), as with a static cache "
            "(cache_implementation='static', StaticCache, or a compiled generate); "
            "reward_attention's causal mask is bottom-right aligned: use the default DynamicCache")


def _key_padding(attention_mask: torch.Tensor | None, kv_length: int,
                 kv_offset: int) -> torch.Tensor | None:
    """The 2-D padding mask cut to the layer's keys: ``(B, kv_length)`` bool, keys past the end of
    the mask masked (as transformers' ``prepare_padding_mask`` does); None stays None."""
    if attention_mask is None:
        return None
    missing = kv_offset + kv_length - attention_mask.shape[-1]
    if missing > 0:
        attention_mask = torch.nn.functional.pad(attention_mask, (0, missing), value=False)
    return attention_mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)


# ----------------------------------------------------------------------------- the attention function


def reward_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function: one attention layer on ``alignkern.reward_attention``.

    Args:
        module: the attention layer (``module.is_causal`` gives causality unless ``is_causal`` is
            passed).
        query: ``(B, Hq, Lq, D)``; key, value: ``(B, Hkv, Lk, D)``, ``Hq % Hkv == 0`` (GQA, no
            ``repeat_kv``). With a KV cache, ``Lk`` counts the cached keys too and the queries are
            the last ``Lq`` of them.
        attention_mask: ``(B, Lk)`` bool from ``reward_attention_mask`` (True = attend), or None;
            any other mask (4-D, float, BlockMask) raises.
        dropout: must be 0 (attention dropout is refused). scaling: ``scale``, default
            ``D ** -0.5``. is_causal: overrides ``module.is_causal``.
        **kwargs: ``alignkern_key_bias (B, Lk)`` float, ``alignkern_key_rank (B, Lk)``,
            ``alignkern_query_rank (B, Lk)`` (the last ``Lq`` columns rank the queries) from the
            model's forward; everything else transformers passes (``position_ids``, ...).

    Returns:
        ``(attn_output (B, Lq, Hq, D), None)``: no attention weights are ever materialised; with
        ``output_attentions=True`` a warning says so, once, as SDPA's does.

    Raises:
        ValueError: a setting reward_attention cannot express (named in the message), bias or
            ranks of the wrong shape, both forward kwargs and an ``attention_bias`` context, a
            forward in the context over a prompt of another length than its tensors.
    """
    _check_supported(module, attention_mask, dropout, kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    shared = shared_prefix_of(key)
    if shared is not None:
        out = _attend_shared_prefix(shared, query, attention_mask, bool(causal), scaling, kwargs)
        return out.transpose(1, 2).contiguous(), None
    extras = _layer_extras(kwargs, query.shape[0], query.shape[2], key.shape[2], query.device)
    key_bias = _fold_padding(extras.key_bias, attention_mask, key.shape[2])
    out = alignkern.reward_attention(query, key, value, key_bias=key_bias, key_rank=extras.key_rank,
                                     query_rank=extras.query_rank, causal=bool(causal),
                                     scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _attend_shared_prefix(shared: SharedPrefixLayer, query, attention_mask, causal: bool,
                          scaling, kwargs: dict) -> torch.Tensor:
    """A layer whose keys are a ``SharedPrefixCache``'s suffix: ``shared_prefix_attention`` over
    the layer's prefix and suffix. The bias, ranks and padding cover prefix and suffix
    (``(N, Lp + Ls)``, as without sharing); over the prefix they must be the same for the rows of
    one prefix."""
    key, value = shared.keys, shared.values
    len_p, len_s = shared.prefix_length, key.shape[2]
    if attention_mask is not None and not torch.compiler.is_compiling() \
            and bool(attention_mask.all()):
        attention_mask = None  # no padding: no bias to build, nothing to compare across rows
    extras = _layer_extras(kwargs, query.shape[0], query.shape[2], len_p + len_s, query.device)
    bias = _fold_padding(extras.key_bias, attention_mask, len_p + len_s)
    groups = shared.prefix_keys.shape[0]
    prefix_bias = suffix_bias = prefix_rank = suffix_rank = None
    if bias is not None:
        prefix_bias, suffix_bias = _per_prefix(bias[:, :len_p], groups, "the key bias or padding"), \
            bias[:, len_p:]
    if extras.key_rank is not None:
        prefix_rank = _per_prefix(extras.key_rank[:, :len_p], groups, "key_rank")
        suffix_rank = extras.key_rank[:, len_p:]
    return alignkern.shared_prefix_attention(
        query, shared.prefix_keys, shared.prefix_values, key, value, prefix_key_bias=prefix_bias,
        suffix_key_bias=suffix_bias, prefix_key_rank=prefix_rank, suffix_key_rank=suffix_rank,
        query_rank=extras.query_rank, causal=causal, scale=scaling)


def _per_prefix(x: torch.Tensor, groups: int, what: str) -> torch.Tensor:
    """``(N, Lp)`` → ``(G, Lp)``: the first row of each prefix's rows, which all must equal it."""
    rows = x.shape[0]
    grouped = x.reshape(groups, rows // groups, *x.shape[1:])
    first = grouped[:, :1]
    if not torch.compiler.is_compiling() and not torch.equal(grouped, first.expand_as(grouped)):
        raise ValueError(f"alignkern attention: with a SharedPrefixCache, {what} over the shared "
                         "prefix must be the same for all rows of a prefix (they read one copy of "
                         "its keys)")
    return first[:, 0]


def _check_supported(module: torch.nn.Module, attention_mask: Any, dropout: float,
                     kwargs: dict) -> None:
    """Refuse, naming the setting, what reward_attention cannot compute exactly."""
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor)
                                           and attention_mask.dim() == 2
                                           and attention_mask.dtype == torch.bool):
        raise ValueError(
            "alignkern attention: got a prepared attention_mask "
            f"({_describe_tensor(attention_mask)}), e.g. a custom 4-D float mask passed to the "
            "model; reward_attention takes only a 2-D padding mask (B, L) and a key bias: pass "
            f"attention_mask of shape (B, L) and the bias as {KEY_BIAS_KWARG}=(B, L)")
    if dropout:
        raise ValueError(f"alignkern attention: attention dropout (config.attention_dropout = "
                         f"{dropout} while training) is not supported by reward_attention; set "
                         "config.attention_dropout = 0 or call model.eval()")
    for arg, setting in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(arg) is not None:
            raise ValueError(f"alignkern attention: {setting} ({arg}={kwargs[arg]!r}) is not "
                             "supported by reward_attention; use another attn_implementation")
    if kwargs.get("output_attentions", False):
        _warn_no_attention_weights()


def _warn_no_attention_weights() -> None:
    """What transformers' ``sdpa_attention_forward`` does with ``output_attentions=True``: warn
    once and return no weights (the model's ``attentions`` is then an empty tuple). Through a
    logger under transformers' own, so its verbosity settings silence both alike."""
    _LOGGER.warning_once(
        "`alignkern` attention does not support `output_attentions=True`: reward_attention never "
        "materialises the attention weights, so none are returned. Please set your attention to "
        "`eager` if you want them.")


def _describe_tensor(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dim()}-D {str(x.dtype).removeprefix('torch.')} of shape {tuple(x.shape)}"
    return type(x).__name__


def _layer_extras(kwargs: dict, batch: int, len_q: int, len_k: int,
                  device: torch.device) -> _Extras:
    """The bias and ranks for this layer call, from the forward kwargs or the active
    ``attention_bias`` context (not both), on ``device``."""
    from_kwargs = _Extras(*(kwargs.get(arg) for arg in (KEY_BIAS_KWARG, KEY_RANK_KWARG,
                                                          QUERY_RANK_KWARG)))
    prompt = _ACTIVE.prompt
    if prompt is not None and not torch.compiler.is_compiling() \
            and prompt.thread != threading.get_ident():
        raise ValueError("alignkern attention: an attention_bias context entered by another "
                         "thread is active; the context is process-wide, one thread at a time")
    if any(x is not None for x in from_kwargs):
        if prompt is not None:
            raise ValueError(f"alignkern attention: got both {KEY_BIAS_KWARG}/{KEY_RANK_KWARG}/"
                             f"{QUERY_RANK_KWARG} and an attention_bias context; give one")
        extras = _extras_from_kwargs(from_kwargs, batch, len_q, len_k)
    elif prompt is not None:
        extras = _extras_from_prompt(prompt, batch, len_q, len_k)
    else:
        return from_kwargs
    return _Extras(*(None if x is None else x.to(device) for x in extras))


def _extras_from_kwargs(extras: _Extras, batch: int, len_q: int, len_k: int) -> _Extras:
    """Forward kwargs, each ``(B, Lk)`` over the keys; the query ranks are the last ``Lq``."""
    for arg, value in zip((KEY_BIAS_KWARG, KEY_RANK_KWARG, QUERY_RANK_KWARG), extras):
        if value is not None and (not isinstance(value, torch.Tensor)
                                  or tuple(value.shape) != (batch, len_k)):
            raise ValueError(
                f"alignkern attention: {arg} must be a tensor of shape (B, L) = {(batch, len_k)} "
                "over the tokens the keys cover (cached and new, like a 2-D attention_mask), got "
                f"{_describe_tensor(value)}")
    query_rank = None if extras.query_rank is None else extras.query_rank[:, len_k - len_q:]
    return _Extras(extras.key_bias, extras.key_rank, query_rank)


def _extras_from_prompt(prompt: _PromptBias, batch: int, len_q: int, len_k: int) -> _Extras:
    """The context's ``(B0, P)`` tensors for a layer whose keys are the first ``Lk`` tokens of the
    sequence (prompt, then generated ones) and whose queries are the last ``Lq`` of them."""
    if all(x is None for x in prompt.extras):  # an empty context: nothing to extend or check
        return prompt.extras
    _check_prompt_forward(prompt, len_q, len_k)
    key_bias, key_rank, query_rank = prompt.extras
    if key_bias is not None:
        key_bias = _extend(_expand_batch(key_bias, batch), len_k, zero=True)
    if key_rank is not None:
        key_rank = _extend(_expand_batch(key_rank, batch), len_k, zero=False)
        query_rank = _extend(_expand_batch(query_rank, batch), len_k, zero=False)[:, len_k - len_q:]
    return _Extras(key_bias, key_rank, query_rank)


def _check_prompt_forward(prompt: _PromptBias, len_q: int, len_k: int) -> None:
    """Whether a layer call may use the context's prompt tensors (see ``attention_bias``): a
    prefill covers exactly the P prompt tokens; a later step starts within the tokens seen since.
    Every layer of one forward sees the same lengths, so checking each layer call is idempotent."""
    length, first_query = prompt.prompt_length, len_k - len_q
    if first_query < length:  # the queries include prompt tokens: a (possibly cached) prefill
        if len_k != length:
            hint = "" if len_k < length else (
                " (or the prompt and an assistant model's candidate tokens at once: assisted "
                "generation with an assistant_model is not supported with attention_bias)")
            raise ValueError(_prompt_length_message(
                prompt, f"a forward in the context runs a prompt of {len_k} tokens{hint}"))
        prompt.seen = length
    elif first_query > prompt.seen:
        raise ValueError(_prompt_length_message(
            prompt, f"a forward in the context runs a prompt of {len_k} tokens whose first "
            f"{first_query} come from a cache; the context saw only {prompt.seen} tokens of its "
            "sequence (a cache made outside the context, for another prompt)"))
    else:  # a decode step (or candidates to verify) after the prompt
        prompt.seen = max(prompt.seen, len_k)


def _prompt_length_message(prompt: _PromptBias, received: str) -> str:
    return (f"alignkern attention: attention_bias's {prompt.argument} was given for P = "
            f"{prompt.prompt_length} prompt tokens, but {received}; give {prompt.argument} of "
            "shape (B, input_ids.shape[1]) for the prompt passed to generate, one attention_bias "
            "context per prompt length (prefill_chunk_size is not supported with "
            "attention_bias)")


def _expand_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``(B0, P)`` → ``(batch, P)``: ``generate`` repeats each row n times for beams and
    ``num_return_sequences`` (``repeat_interleave``)."""
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0]:
        raise ValueError(f"alignkern attention: attention_bias has batch size {x.shape[0]}, the "
                         f"model runs batch size {batch}, which is not a multiple of it")
    return x.repeat_interleave(batch // x.shape[0], dim=0)


def _extend(x: torch.Tensor, length: int, *, zero: bool) -> torch.Tensor:
    """``(B, P)`` → ``(B, length)``, ``length >= P`` (``_check_prompt_forward``): extended with
    zeros (the bias of generated tokens) or with the last column (their ranks)."""
    missing = length - x.shape[1]
    if missing == 0:
        return x
    tail = x.new_zeros(x.shape[0], missing) if zero else x[:, -1:].expand(-1, missing)
    return torch.cat([x, tail], dim=1)


def _fold_padding(key_bias: torch.Tensor | None, padding: torch.Tensor | None,
                  len_k: int) -> torch.Tensor | None:
    """The key bias with ``-inf`` on padded keys: ``(B, Lk)`` float, or None (no bias, no
    padding). Differentiable in ``key_bias`` (padded keys take no gradient)."""
    if padding is None:
        return key_bias
    if padding.shape[-1] != len_k:
        raise ValueError(f"alignkern attention: the padding mask covers {padding.shape[-1]} keys, "
                         f"the layer has {len_k}")
    if key_bias is None:
        key_bias = torch.zeros(padding.shape, dtype=torch.float32, device=padding.device)
    return key_bias.masked_fill(~padding, float("-inf"))
