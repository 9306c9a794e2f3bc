"""Self-correction loops on a transformers causal LM, built on alignkern's transformers
integration (scoring without logits, ``SelfEvaluator``, the reward-attention backend):

  best_of_n            sample N answers in one batched generate, score them with the model itself
  rain_generate        RAIN's rewindable search with batched self-evaluation and a reused KV cache
  check_and_correct    in-context alignment: answer, self-check, answer again with the
                       (query, response, reward) triplets in context; reward bias / rank mask
  two_attempt_rollout  SCoRe's two attempts with shaped rewards; score_stage2_loss its objective

Importing this package imports transformers (``pip install "alignkern[hf]"``). ``alignkern demo``
(``python -m alignkern.loops.demo``) runs each loop on a tiny local model.
"""

from .best_of_n import BestOfN, best_of_n
from .check_and_correct import (
    DEFAULT_TEMPLATE,
    AttentionInputs,
    CheckAndCorrect,
    Context,
    ContextTemplate,
    attention_inputs,
    build_context,
    check_and_correct,
)
from .judge import HARMLESS_DESCRIPTIONS, HARMLESS_TEMPLATE, harmlessness_evaluator
from .rain import RainChild, RainResult, RainStep, rain_generate
from .score import DEFAULT_CORRECTION, Attempt, SCoReRollout, score_stage2_loss, two_attempt_rollout

__all__ = [
    "DEFAULT_CORRECTION",
    "DEFAULT_TEMPLATE",
    "HARMLESS_DESCRIPTIONS",
    "HARMLESS_TEMPLATE",
    "Attempt",
    "AttentionInputs",
    "BestOfN",
    "CheckAndCorrect",
    "Context",
    "ContextTemplate",
    "RainChild",
    "RainResult",
    "RainStep",
    "SCoReRollout",
    "attention_inputs",
    "best_of_n",
    "build_context",
    "check_and_correct",
    "harmlessness_evaluator",
    "rain_generate",
    "score_stage2_loss",
    "two_attempt_rollout",
]
