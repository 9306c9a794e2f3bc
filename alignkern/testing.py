"""Stand-ins for a real model and tokenizer, for examples, tests and first experiments: a tiny
random Llama built from a config and a small byte-level BPE tokenizer trained on this machine in a
fraction of a second. Nothing is downloaded.

    from alignkern.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()                    # ids < 512: <pad> 0, <s> 1, </s> 2
    model = tiny_model()                      # LlamaForCausalLM, V = 512, H = 64, 2 layers
    batch = tok(["Can a cat fly?"], return_tensors="pt")
    logits = model(**batch).logits            # (1, T, 512)

Every example in alignkern's documentation uses these two where a real checkpoint would go:
replace them with ``AutoModelForCausalLM.from_pretrained(...)`` and
``AutoTokenizer.from_pretrained(...)`` and the example runs unchanged. What the tiny model
writes is gibberish (its weights are random); it exercises every code path of the real thing in
milliseconds on a CPU.

Calling these functions imports ``transformers`` and ``tokenizers`` (``pip install
"alignkern[hf]"``); importing this module does not.
"""

from __future__ import annotations

import copy

import torch

#: The model's default vocabulary size; every id of the tokenizer is below it.
VOCAB_SIZE = 512
#: The ids of ``<pad>``, ``<s>`` and ``</s>``, in the tokenizer and in the model's config.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

_ATTENTIONS = ("sdpa", "eager", "alignkern")

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "VOCAB_SIZE", "tiny_model", "tiny_tokenizer"]


def tiny_tokenizer():
    """A small byte-level BPE tokenizer, ``transformers.PreTrainedTokenizerFast``.

    Its vocabulary holds at most ``VOCAB_SIZE`` (512) ids, so every id fits ``tiny_model()``'s
    LM head: ``<pad>`` (0, the padding token), ``<s>`` (1, prepended to every encoded text) and
    ``</s>`` (2, the EOS token), the 256 bytes, then the merges that BPE learns from a few
    sentences of question answering and self-evaluation (506 ids in all). Any text encodes
    (unknown words fall back to bytes) and decodes back to itself. It pads on the right, as most
    tokenizers do; set ``tok.padding_side = "left"`` before batching prompts for ``generate``.

    Returns:
        A new tokenizer object at each call (a copy of one trained once per process), so
        changing ``padding_side`` or adding tokens on it changes no other caller's.

    Raises:
        ImportError: ``transformers`` or ``tokenizers`` is not installed.

    Example:
        >>> tok = tiny_tokenizer()
        >>> tok("Can a cat fly?").input_ids[0] == BOS_ID
        True
    """
    from .loops import tiny

    return copy.deepcopy(tiny.tiny_tokenizer())


def tiny_model(*, attn_implementation: str = "sdpa", vocab_size: int = VOCAB_SIZE, hidden_size: int = 64,
               num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
               intermediate_size: int = 128, dtype: torch.dtype = torch.float32, seed: int = 0,
               device: str | torch.device = "cpu"):
    """A random ``transformers.LlamaForCausalLM`` in eval mode, built from a ``LlamaConfig``.

    Grouped-query attention (``num_heads`` query heads over ``num_kv_heads`` key/value heads), an
    LM head not tied to the embeddings, ``<pad>``/``<s>``/``</s>`` ids as in ``tiny_tokenizer``
    and weights drawn from N(0, 0.2), so that its next-token distributions are far from uniform
    (a model initialised as for training is nearly uniform, which hides mistakes in scoring
    code). The same arguments give the same weights; the global random state is left as it was.

    Args:
        attn_implementation: as in ``from_config``: ``"sdpa"`` (transformers' default),
            ``"eager"``, or ``"alignkern"``, which calls
            ``alignkern.integrations.transformers.register()`` first and so runs every attention
            layer on ``alignkern.reward_attention``.
        vocab_size: rows of the LM head; may exceed the tokenizer's 512 (ids past it decode to
            nothing) to give the head a realistic size.
        hidden_size: H, the width of the hidden states and of the LM head's rows.
        num_layers: decoder layers.
        num_heads: query heads; ``hidden_size`` must be a multiple of it.
        num_kv_heads: key/value heads; ``num_heads`` must be a multiple of it.
        intermediate_size: width of each MLP.
        dtype: the parameters' dtype.
        seed: the seed the weights are drawn from.
        device: where the model is put.

    Returns:
        The model, in eval mode (call ``model.train()`` to train it).

    Raises:
        ValueError: an ``attn_implementation`` other than the three above, or sizes that do not divide
            (``hidden_size % num_heads``, ``num_heads % num_kv_heads``), or a size below 1.
        TypeError: a size that is not an int.
        ImportError: ``transformers`` is not installed.

    Example:
        >>> model = tiny_model(attn_implementation="alignkern")
        >>> model.config._attn_implementation
        'alignkern'
    """
    _check_model_arguments(attn_implementation, vocab_size=vocab_size, hidden_size=hidden_size,
                           num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                           intermediate_size=intermediate_size)
    from .loops import tiny

    if attn_implementation == "alignkern":
        from .integrations.transformers import register

        register()
    with torch.random.fork_rng(devices=[]):
        return tiny.tiny_model(vocab_size=vocab_size, hidden_size=hidden_size,
                               num_layers=num_layers, num_heads=num_heads,
                               num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                               seed=seed, dtype=dtype, attn_implementation=attn_implementation,
                               device=device)


def _check_model_arguments(attn_implementation, **sizes) -> None:
    """``tiny_model``'s arguments, each named in the error."""
    if attn_implementation not in _ATTENTIONS:
        raise ValueError("tiny_model: attn_implementation must be one of "
                         f"{', '.join(map(repr, _ATTENTIONS))}, got {attn_implementation!r}")
    for arg, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"tiny_model: {arg} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"tiny_model: {arg} must be at least 1, got {value}")
    if sizes["hidden_size"] % sizes["num_heads"]:
        raise ValueError(f"tiny_model: hidden_size ({sizes['hidden_size']}) must be a multiple of "
                         f"num_heads ({sizes['num_heads']})")
    if sizes["num_heads"] % sizes["num_kv_heads"]:
        raise ValueError(f"tiny_model: num_heads ({sizes['num_heads']}) must be a multiple of "
                         f"num_kv_heads ({sizes['num_kv_heads']})")
