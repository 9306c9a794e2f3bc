"""alignkern inside Hugging Face transformers: an attention backend for ``attn_implementation``,
the model's LM head read once, scoring without ``[B, T, V]`` logits, and RAIN / P(True) / G-Eval
self-evaluation.

    from alignkern.integrations import transformers as ak_hf

Importing this module imports ``transformers`` (``pip install "alignkern[hf]"``).
"""

from .attention import attention_bias, register, reward_attention_forward, reward_attention_mask
from .head import LMHead, model_head
from .scoring import option_scores, score_generations, sequence_logprobs
from .self_eval import SelfEvaluator
from .shared_prefix import SharedPrefixCache, prefix_cache

__all__ = [
    "LMHead",
    "SelfEvaluator",
    "SharedPrefixCache",
    "attention_bias",
    "model_head",
    "option_scores",
    "prefix_cache",
    "register",
    "reward_attention_forward",
    "reward_attention_mask",
    "score_generations",
    "sequence_logprobs",
]
