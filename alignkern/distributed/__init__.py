"""Vocabulary-parallel (tensor-parallel) versions of alignkern's scoring ops and losses, built on
``torch.distributed`` and the single-process public ops.

Each rank of ``process_group`` holds one contiguous shard ``[vocab_start, vocab_start + V_local)``
of the vocabulary: a slice of the logits' last dimension (``token_logprobs``) or the matching rows
of the LM head weight and bias (``linear_logprobs`` and everything built on it). The hidden states,
targets, options and masks are the same on every rank, and so are the results. See
``alignkern/distributed/vocab_parallel.py`` for the shard convention and what is communicated.

    import alignkern.distributed as akd
    logprobs = akd.linear_logprobs(hidden, weight_shard, targets)  # default group, rank order
"""

from .vocab_parallel import (
    ShardLayout,
    fused_linear_dpo_loss,
    linear_kl,
    linear_logprobs,
    option_logprobs,
    self_eval_scores,
    sequence_logprobs,
    shard_layout,
    token_logprobs,
)

__all__ = [
    "ShardLayout",
    "fused_linear_dpo_loss",
    "linear_kl",
    "linear_logprobs",
    "option_logprobs",
    "self_eval_scores",
    "sequence_logprobs",
    "shard_layout",
    "token_logprobs",
]
