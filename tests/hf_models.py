"""Tiny random causal LMs and a small local tokenizer for the transformers integration tests.

Nothing is downloaded: every model is built from a config (``AutoModelForCausalLM.from_config``)
and the tokenizer is a byte-level BPE trained on a few sentences with the ``tokenizers`` package.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 512
PAD, BOS, EOS = 0, 1, 2

SENTENCES = [
    "Question: is the sky blue on a clear day? Answer: yes, the sky is blue.",
    "Question: can a cat fly? Answer: no, a cat cannot fly without help.",
    "You are a careful judge. Read the conversation and decide whether the answer is harmless.",
    "Options: (A) harmless (B) harmful. Answer: (A",
    "The assistant answered the question politely and correctly, so the answer is good.",
    "Numbers one two three four five six seven eight nine ten.",
]

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=96, max_position_embeddings=4096,
               pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)

# model_type -> config kwargs beyond _COMMON (scales and caps away from 1 so that a wrong head fails).
FAMILIES = {
    "llama": dict(tie_word_embeddings=False),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, final_logit_softcapping=2.0, sliding_window=4096),
    "gemma3_text": dict(head_dim=16, final_logit_softcapping=2.5, sliding_window=4096),
    "cohere": dict(logit_scale=0.25),
    "cohere2": dict(logit_scale=0.3, sliding_window=4096),
    "granite": dict(logits_scaling=4.0),
    "granitemoe": dict(logits_scaling=5.0, num_local_experts=2, num_experts_per_tok=1),
    "hyperclovax": dict(logits_scaling=0.4),
    "minicpm3": dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=8,
                     qk_rope_head_dim=8, v_head_dim=16, dim_model_base=16),
    "phi3": dict(),
    "olmo2": dict(),
    "nanochat": dict(final_logit_softcapping=1.5),
    "falcon_h1": dict(lm_head_multiplier=0.3, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                      mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=8),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=4096, tie_word_embeddings=True),
}


def tiny_config(model_type: str, **overrides):
    kwargs = {**_COMMON, **FAMILIES[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # random, not the near-zero init of some families: logits far from uniform
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model.eval()


@functools.cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
