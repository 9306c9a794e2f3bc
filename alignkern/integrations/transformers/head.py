"""The LM head of a transformers causal LM, read once: ``model_head(model) -> LMHead``.

A causal LM's logits are ``lm_head(hidden)`` followed by whatever its ``forward`` does to them:
Cohere multiplies by ``logit_scale``, Granite divides by ``logits_scaling``, Gemma 2 soft-caps,
MiniCPM3 divides the hidden states before the head. alignkern's scoring computes all of that
from the hidden states as ``softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)``,
so the head must be read faithfully or every score is silently wrong. This module is the one place
that knows each family's quirk.

"Handled" is decided by an explicit table of the ``forward`` implementations that were read
(transformers 5.24) and are tested against the model's own logits (tests/test_hf_scoring.py):
the class that defines the model's ``forward`` (the first one in its MRO) must be a transformers
class listed in ``_FAMILIES``, and the output embedding must be a plain ``nn.Linear`` (its
``forward`` not overridden: quantised or otherwise wrapped heads are refused). Everything else
raises ``NotImplementedError`` naming the class, instead of guessing a scale.
"""

from __future__ import annotations

import contextlib
import operator
from typing import NamedTuple

import torch
from torch import nn


class LMHead(NamedTuple):
    """What ``model_head`` returns.

    ``weight (V, H)`` and ``bias (V,)`` or ``None`` are the model's own parameters (not copies:
    gradients flow into them, tied embeddings included); the model's logits are
    ``softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)`` (no tanh when
    ``softcap`` is ``None``).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float
    softcap: float | None

    def scoring_kwargs(self, temperature: float = 1.0) -> dict:
        """The keyword arguments of ``alignkern.linear_logprobs`` and the scoring functions built
        on it (``option_logprobs``, ``self_eval_scores``, ``sequence_logprobs``) that reproduce
        this head's logits, divided by ``temperature``."""
        return {"bias": self.bias, "temperature": temperature, "softcap": self.softcap,
                "logit_scale": self.logit_scale}

    def linear_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
        """``log p(targets (N,))`` ``(N,)`` fp32 from hidden rows ``(N, H)`` through this head:
        ``alignkern.linear_logprobs``, or its vocabulary-parallel form on the local shard when
        the head is an FSDP2 DTensor (then a collective over the head's mesh: see
        ``alignkern.distributed.sharded_head``)."""
        from alignkern.distributed import sharded_head

        if sharded_head.is_dtensor(self.weight):
            shard = sharded_head.head_shard("linear_logprobs", self.weight, self.bias)
            return sharded_head.linear_logprobs(shard, hidden, targets, temperature=temperature,
                                                softcap=self.softcap,
                                                logit_scale=self.logit_scale)
        import alignkern

        with _gathered(self) as head:
            return alignkern.linear_logprobs(hidden, head.weight, targets,
                                             **head.scoring_kwargs(temperature))

    def self_eval_scores(self, hidden: torch.Tensor, options: torch.Tensor,
                         values: torch.Tensor | None = None, temperature: float = 1.0):
        """``alignkern.self_eval_scores`` of hidden rows ``(N, H)`` through this head (on the
        local shard when the head is an FSDP2 DTensor, as ``linear_logprobs``)."""
        from alignkern.distributed import sharded_head

        if sharded_head.is_dtensor(self.weight):
            shard = sharded_head.head_shard("self_eval_scores", self.weight, self.bias)
            return sharded_head.self_eval_scores(shard, hidden, options, values,
                                                 temperature=temperature, softcap=self.softcap,
                                                 logit_scale=self.logit_scale)
        import alignkern

        with _gathered(self) as head:
            return alignkern.self_eval_scores(hidden, head.weight, options, values,
                                              **head.scoring_kwargs(temperature))


def is_zero3_partitioned(param: torch.Tensor | None) -> bool:
    """A DeepSpeed ZeRO-3 parameter that is not gathered now (``ds_id`` set, ``ds_status`` not
    AVAILABLE): it holds no data outside its module's forward."""
    status = getattr(getattr(param, "ds_status", None), "name", None)
    return param is not None and hasattr(param, "ds_id") and status != "AVAILABLE"


@contextlib.contextmanager
def _gathered(head: LMHead):
    """``head``, or, when ZeRO-3 has partitioned it, ``head`` gathered for the call (deepspeed's
    ``GatheredParameters``) with copies of the gathered weight and bias that the backward keeps
    (the parameters are partitioned again when the call returns; the copies' gradients reach
    them as any module's do). Costs one head of memory until the backward."""
    if not any(is_zero3_partitioned(p) for p in (head.weight, head.bias)):
        yield head
        return
    import deepspeed

    params = [p for p in (head.weight, head.bias) if p is not None]
    with deepspeed.zero.GatheredParameters(params):
        kept = [None if p is None else p.clone() if p.requires_grad and torch.is_grad_enabled()
                else p.detach().clone() for p in (head.weight, head.bias)]
        yield head._replace(weight=kept[0], bias=kept[1])


class _Rule(NamedTuple):
    """How one family's ``forward`` turns ``lm_head(hidden)`` into its logits. Attribute paths
    are read from the model, exactly where its ``forward`` reads them."""

    scale: str | None = None  # e.g. "config.logits_scaling", "logit_scale"
    scale_divides: bool = False  # logits / scale (Granite) rather than logits * scale (Cohere)
    softcap: str | None = None  # e.g. "config.final_logit_softcapping"; None in the config: no cap


_PLAIN = _Rule()
_GEMMA_CAP = _Rule(softcap="config.final_logit_softcapping")
_GRANITE = _Rule(scale="config.logits_scaling", scale_divides=True)

# Class that defines ``forward`` -> rule. Each entry was read in transformers 5.24's source and
# is tested (fp32, bf16, gradients, generation) in tests/test_hf_scoring.py.
_FAMILIES: dict[str, _Rule] = {
    # logits = lm_head(hidden)
    "LlamaForCausalLM": _PLAIN,
    "MistralForCausalLM": _PLAIN,
    "Qwen2ForCausalLM": _PLAIN,
    "Qwen3ForCausalLM": _PLAIN,
    "GemmaForCausalLM": _PLAIN,
    "Phi3ForCausalLM": _PLAIN,
    "Olmo2ForCausalLM": _PLAIN,
    "GPT2LMHeadModel": _PLAIN,  # tied to transformer.wte
    # logits = softcap * tanh(lm_head(hidden) / softcap) when config.final_logit_softcapping
    "Gemma2ForCausalLM": _GEMMA_CAP,
    "Gemma3ForCausalLM": _GEMMA_CAP,
    "NanoChatForCausalLM": _GEMMA_CAP,
    # logits = lm_head(hidden) * self.logit_scale (set from config.logit_scale)
    "CohereForCausalLM": _Rule(scale="logit_scale"),
    "Cohere2ForCausalLM": _Rule(scale="logit_scale"),
    # logits = lm_head(hidden) / config.logits_scaling
    "GraniteForCausalLM": _GRANITE,
    "GraniteMoeForCausalLM": _GRANITE,
    # logits = lm_head(hidden) * config.logits_scaling: the same name as Granite's, the inverse use
    "HyperCLOVAXForCausalLM": _Rule(scale="config.logits_scaling"),
    # logits = lm_head(hidden / config.logits_scaling); the head has no bias (checked), so this is
    # lm_head(hidden) / logits_scaling
    "MiniCPM3ForCausalLM": _GRANITE,
    # logits = lm_head(hidden) * self.model.lm_head_multiplier
    "FalconH1ForCausalLM": _Rule(scale="model.lm_head_multiplier"),
}

# Rules whose scale is applied to the hidden states, before the head: only exact without a bias.
_SCALES_HIDDEN = {"MiniCPM3ForCausalLM"}


def forward_owner(model: nn.Module) -> type:
    """The class whose ``forward`` the model runs (the first in its MRO that defines one)."""
    return next(cls for cls in type(model).__mro__ if "forward" in vars(cls))


def _read(model: nn.Module, path: str, what: str, family: str) -> float | None:
    value = operator.attrgetter(path)(model)
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"model_head: {family}'s {what} `{path}` must be a number, got "
                         f"{value!r}") from None
    if not (value > 0.0 and value < float("inf")):
        raise ValueError(f"model_head: {family}'s {what} `{path}` must be positive and finite, "
                         f"got {value}")
    return value


def _family_rule(model: nn.Module) -> tuple[str, _Rule]:
    owner = forward_owner(model)
    rule = _FAMILIES.get(owner.__name__)
    if rule is None or not owner.__module__.startswith("transformers.models."):
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        where = (f"{owner.__module__}.{owner.__qualname__}"
                 if owner is not type(model) else type(model).__name__)
        raise NotImplementedError(
            f"model_head: cannot read the LM head of {type(model).__name__} (model_type "
            f"{model_type!r}, forward defined by {where}) faithfully: it is not one of the "
            f"verified families, whose forward is known to apply only a logit scale and/or a "
            f"soft-cap after a Linear head ({', '.join(sorted(_FAMILIES))}). Its logits may be "
            "transformed in a way alignkern does not reproduce; use model(...).logits instead."
        )
    return owner.__name__, rule


def _linear_head(model: nn.Module, family: str) -> nn.Linear:
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise NotImplementedError(
            f"model_head: {family}'s output embedding is {type(head).__name__}, not a plain "
            "torch.nn.Linear (a quantised, wrapped or custom head cannot be read as weight and bias)"
        )
    if not head.weight.is_floating_point():
        raise NotImplementedError(f"model_head: {family}'s LM head weight has dtype "
                                  f"{head.weight.dtype}, not a float dtype")
    return head


def model_head(model: nn.Module) -> LMHead:
    """The LM head of a transformers causal LM as alignkern's scoring functions take it.

    Args:
        model: a ``*ForCausalLM`` / ``GPT2LMHeadModel`` of one of the verified families (the
            keys of ``_FAMILIES``: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text,
            Phi-3, OLMo 2, GPT-2, NanoChat, Cohere, Cohere 2, Granite, Granite MoE, HyperCLOVA X,
            MiniCPM3, Falcon-H1), or a subclass that does not override ``forward``.

    Returns:
        ``LMHead(weight (V, H), bias (V,) | None, logit_scale: float, softcap: float | None)``
        with ``model(...).logits == softcap * tanh(logit_scale * (h @ weight.T + bias) / softcap)``
        for the final (post-norm) hidden states ``h``. Granite's divisor ``logits_scaling``
        becomes ``logit_scale = 1 / logits_scaling``.

    Raises:
        NotImplementedError: an unverified family (including a subclass that overrides
            ``forward`` and remote code), or an output embedding that is not a plain ``nn.Linear``.
        ValueError: a scale or cap in the config that is not a positive finite number.
    """
    family, rule = _family_rule(model)
    head = _linear_head(model, family)
    logit_scale = 1.0
    if rule.scale is not None:
        scale = _read(model, rule.scale, "logit scale", family)
        if scale is None:
            raise ValueError(f"model_head: {family}'s logit scale `{rule.scale}` is None (its "
                             "forward cannot run with it either)")
        logit_scale = 1.0 / scale if rule.scale_divides else scale
    if family in _SCALES_HIDDEN and head.bias is not None and logit_scale != 1.0:
        raise NotImplementedError(f"model_head: {family} scales the hidden states before a head "
                                  "with a bias; that is not a scale of the logits")
    softcap = None if rule.softcap is None else _read(model, rule.softcap, "soft-cap", family)
    return LMHead(head.weight, head.bias, logit_scale, softcap)
