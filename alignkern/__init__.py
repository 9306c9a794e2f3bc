"""alignkern: fused kernels for LLM self-correction and in-context alignment loops.

Importing the package registers the ``torch.ops.alignkern.*`` ops.
"""

from . import losses
from ._backend import BACKENDS, backend_status, use_backend
from ._version import __version__ as __version__
from .ops.linear_logprobs import LinearLogprobs, LinearLogprobsStats, linear_logprobs
from .ops.reward_attention import RewardAttention, reward_attention, segment_bias
from .ops.scoring import SelfEvalScores, option_logprobs, self_eval_scores, sequence_logprobs
from .ops.shared_prefix_attention import MergedAttention, merge_attention, shared_prefix_attention
from .ops.token_logprobs import TokenLogprobs, token_logprobs

__all__ = [
    "BACKENDS",
    "LinearLogprobs",
    "LinearLogprobsStats",
    "MergedAttention",
    "RewardAttention",
    "SelfEvalScores",
    "TokenLogprobs",
    "backend_status",
    "losses",
    "linear_logprobs",
    "merge_attention",
    "option_logprobs",
    "reward_attention",
    "segment_bias",
    "self_eval_scores",
    "sequence_logprobs",
    "shared_prefix_attention",
    "token_logprobs",
    "use_backend",
]
