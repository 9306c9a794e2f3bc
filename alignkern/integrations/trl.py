"""TRL on alignkern: TRL's fused LM head runs on ``alignkern.linear_logprobs``.

TRL (tested: 1.16) patches the models of its trainers with ``add_fused_lm_head``, so that
``model(..., labels=labels, fused_lm_head=True)`` runs the backbone and then
``ChunkedLogProbFunction``: per-token log-probabilities and, as each trainer asks, the entropy,
``log_sum_sq_probs``, ``mean_logits`` and ``is_top1``. DPO, GRPO, RLOO, KTO, SFT (and the
experimental async GRPO) all go through it. ``use_alignkern`` makes that call run on
``alignkern.linear_logprobs(..., stats=...)`` instead: the same outputs, the entropy's gradient in
the same backward, TRL's temperature, softcap and logit scale, TRL's autocast rule for the
projection's dtype, and nothing else of the trainer changed (configs, logs, losses)::

    from alignkern.integrations.trl import use_alignkern

    use_alignkern()                      # every TRL fused head in this process, before or after
    trainer = DPOTrainer(model=model, ...)  # the trainers are built
    # or, scoped to one trainer (its model and reference model) once it is built:
    use_alignkern(trainer)

Importing this module imports ``trl`` (``pip install "alignkern[trl]"``).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable

import torch
import trl.trainer.utils as _trl_utils
from trl.kernels import chunked_logprob as _trl_kernel

from ..ops.linear_logprobs import linear_logprobs

TESTED_TRL = ">=1.16,<1.17"
# The per-token fields of TRL's FusedCausalLMOutput besides log_probs, in its order; alignkern's
# statistics have the same names.
OPTIONAL_OUTPUTS = _trl_kernel.OPTIONAL_OUTPUTS

_TRL_FUNCTION = _trl_utils._ChunkedLogProbFunction
_everywhere = False
_scoped = contextvars.ContextVar("alignkern_trl_scoped", default=False)


class AlignkernFusedHead:
    """Drop-in for TRL's ``ChunkedLogProbFunction``: ``apply`` takes its arguments and returns
    its five outputs, computed by alignkern where alignkern is switched on (``use_alignkern``)
    and by TRL's own function elsewhere."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size,
              final_logit_softcapping=None, logit_scale=1.0, outputs=OPTIONAL_OUTPUTS):
        if not (_everywhere or _scoped.get()):
            return _TRL_FUNCTION.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                       final_logit_softcapping, logit_scale, outputs)
        return fused_head(hidden, weight, bias, targets, temperature, final_logit_softcapping,
                          logit_scale, outputs)


def fused_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               targets: torch.Tensor, temperature: float, softcap: float | None,
               logit_scale: float, outputs: tuple[str, ...]) -> tuple:
    """TRL's fused-head contract on alignkern: ``hidden (N, H)``, ``weight (V, H)``, ``bias (V,)``
    or None, ``targets (N,)`` token ids → ``(log_probs, entropy, log_sum_sq_probs, mean_logits,
    is_top1)``, each ``(N,)`` (float32; ``is_top1`` bool), None where not in ``outputs``.

    The projection runs in the autocast dtype under autocast, else in ``hidden``'s dtype (TRL's
    rule: with ``cast_lm_head_to_fp32`` TRL passes float32 hidden states and a head of the
    model's dtype, which is cast here as TRL casts each of its tiles)."""
    if not torch.is_autocast_enabled(hidden.device.type):
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
    if hasattr(weight, "ds_id"):
        # A DeepSpeed ZeRO-3 parameter, gathered by TRL's context for this call only: the
        # backward must not find it partitioned again, so it keeps a gathered copy.
        weight = weight.clone()
        bias = None if bias is None else bias.clone()
    stats = tuple(name for name in OPTIONAL_OUTPUTS if name in outputs)
    result = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                             softcap=softcap, logit_scale=logit_scale, stats=stats)
    return (result.logprobs, result.entropy, result.log_sum_sq_probs, result.mean_logits,
            result.is_top1)


class TRLHook:
    """What ``use_alignkern`` returns: ``undo()`` (or leaving a ``with`` block) switches back to
    TRL's own kernel for what this call switched on."""

    def __init__(self, undo: Callable[[], None]):
        self._undo = undo

    def undo(self) -> None:
        self._undo()
        self._undo = lambda: None

    def __enter__(self) -> TRLHook:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def use_alignkern(target=None) -> TRLHook:
    """Run TRL's fused LM head on alignkern.

    Args:
        target: None for every model in this process (the way for a training script: call it
            before or after building the trainers); a TRL trainer, for its ``model`` and
            ``ref_model`` once it is built; or a model that ``add_fused_lm_head`` has patched.

    Returns:
        A ``TRLHook`` whose ``undo()`` switches back.

    Raises:
        ValueError: ``target`` has no TRL fused LM head (``add_fused_lm_head`` has not run on it:
            pass the trainer once it is built, or call ``use_alignkern()`` with no argument).
    """
    _install()
    if target is None:
        return _switch_on_everywhere()
    modules = [module for model in _models_of(target) for module in model.modules()]
    fused = [module for module in modules if _has_fused_forward(module)]
    if not fused and not any(_is_scoped(module) for module in modules):
        raise ValueError(
            f"use_alignkern: {type(target).__name__} has no TRL fused LM head (TRL's "
            "add_fused_lm_head has not patched it); pass the trainer once it is built, or call "
            "use_alignkern() with no argument to switch on every fused head, present or future")
    for module in fused:
        module.forward = _in_scope(module.forward)
    return TRLHook(functools.partial(_restore_forwards, fused))


def _install() -> None:
    # TRL's fused forward looks the function up in its module at every call, so replacing it there
    # reaches every trainer, built or not.
    _trl_utils._ChunkedLogProbFunction = AlignkernFusedHead


def _switch_on_everywhere() -> TRLHook:
    global _everywhere
    before, _everywhere = _everywhere, True

    def undo():
        global _everywhere
        _everywhere = before

    return TRLHook(undo)


def _models_of(target) -> list[torch.nn.Module]:
    if isinstance(target, torch.nn.Module):
        return [target]
    models = [getattr(target, "model", None), getattr(target, "ref_model", None)]
    models = [model for model in models if isinstance(model, torch.nn.Module)]
    if not models:
        raise ValueError(f"use_alignkern: target must be a TRL trainer, a model or None, got "
                         f"{type(target).__name__}")
    return models


def _has_fused_forward(module: torch.nn.Module) -> bool:
    """Whether ``module.forward`` is the instance forward TRL's ``add_fused_lm_head`` set (its
    ``functools.wraps`` keeps the model's name, not its code), or wraps it: under mixed precision
    accelerate replaces the forward by an autocasting one and keeps TRL's as
    ``_original_forward``."""
    if _is_scoped(module):
        return False
    return any(_is_trl_fused(vars(module).get(name)) for name in ("forward", "_original_forward"))


def _is_trl_fused(forward) -> bool:
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    return code is not None and code.co_name == "_fused_forward"


def _is_scoped(module: torch.nn.Module) -> bool:
    return hasattr(vars(module).get("forward"), "alignkern_original")


def _in_scope(forward):
    @functools.wraps(forward)
    def scoped(*args, **kwargs):
        token = _scoped.set(True)
        try:
            return forward(*args, **kwargs)
        finally:
            _scoped.reset(token)

    scoped.alignkern_original = forward
    return scoped


def _restore_forwards(modules: list[torch.nn.Module]) -> None:
    for module in modules:
        forward = vars(module).get("forward")
        if hasattr(forward, "alignkern_original"):
            module.forward = forward.alignkern_original
