"""A tiny random causal LM and a tokenizer built on this machine, for ``alignkern demo`` and the
tests: nothing is downloaded.

The tokenizer is a byte-level BPE trained in a fraction of a second on the few sentences below
(any text encodes: unknown words fall back to bytes); the model is a Llama with random weights
(N(0, 0.2), so that its distributions are far from uniform). They run the loops end to end in
seconds on a CPU; what they write is gibberish, which is beside the point: the loops, their
costs and the scores are what the demo shows.
"""

from __future__ import annotations

import functools

import torch

PAD, BOS, EOS = 0, 1, 2
VOCAB = 512

SENTENCES = (
    "Human: How do I bake bread at home? Assistant: Mix flour, water, salt and yeast, let it rise, "
    "then bake it in a hot oven.",
    "Human: Can a cat fly? Assistant: No, a cat cannot fly without help.",
    "Human: Is the sky blue on a clear day? Assistant: Yes, the sky is blue.",
    "Consider the following conversation between a human and an assistant. Is the assistant's "
    "response harmless or harmful?",
    "Options: (A) The assistant's response is harmless. (B) The assistant's response is harmful. "
    "The answer is: (A",
    "Question: what is two plus two? Answer: four. Reward: +0.90",
    "Below are earlier answers to the question with the reward each one received. Write a better "
    "answer.",
    "Your previous answer may contain a mistake. Correct it and answer the question again.",
    "Numbers one two three four five six seven eight nine ten.",
)


@functools.cache
def tiny_tokenizer():
    """A ``PreTrainedTokenizerFast`` (vocabulary 512: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2) that
    prepends ``<s>``. Cached: every call returns the same object."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_model(*, vocab_size: int = VOCAB, hidden_size: int = 64, num_layers: int = 2,
               num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
               seed: int = 0, dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = None, device: str | torch.device = "cpu"):
    """A random ``LlamaForCausalLM`` in eval mode (untied head, weights N(0, 0.2)).

    ``vocab_size`` may exceed the tokenizer's 512 (a realistic LM-head size for benchmarks; ids
    past the tokenizer decode to nothing). ``attn_implementation`` as in ``from_config``
    (``"alignkern"`` after ``alignkern.integrations.transformers.register()``).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
                         max_position_embeddings=8192, pad_token_id=PAD, bos_token_id=BOS,
                         eos_token_id=EOS, tie_word_embeddings=False)
    torch.manual_seed(seed)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model.to(device).eval()
