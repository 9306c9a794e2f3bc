"""TRL on alignkern: TRL's fused LM head runs on ``alignkern.linear_logprobs``.

TRL (tested: 1.16) patches the models of its trainers with ``add_fused_lm_head``, so that
``model(..., labels=labels, fused_lm_head=True)`` runs the backbone and then
``ChunkedLogProbFunction``: per-token log-probabilities and, as each trainer asks, the entropy,
``log_sum_sq_probs``, ``mean_logits`` and ``is_top1``. DPO, GRPO, RLOO, KTO, SFT (and the
experimental async GRPO) all go through it. ``use_alignkern`` makes that call run on
``alignkern.linear_logprobs(..., stats=...)`` instead: the same outputs, the entropy's gradient in
the same backward, TRL's temperature, softcap and logit scale, every mix of hidden, head and
autocast dtypes TRL's kernel takes (``projection_operands``: TRL's dtype rule, except that
hidden states of lower precision than the head are cast up rather than the head down), and
nothing else of the trainer changed (configs, logs, losses)::

    from alignkern.integrations.trl import use_alignkern

    use_alignkern()                      # every TRL fused head in this process, before or after
    trainer = DPOTrainer(model=model, ...)  # the trainers are built
    # or, scoped to one trainer (its model and reference model) once it is built:
    use_alignkern(trainer)

Each call returns a handle; handles nest in any order (a model runs on alignkern while any global
handle or any handle scoped to it is open) and the last ``undo()`` puts back exactly what the
first call replaced.

Importing this module imports ``trl`` (``pip install "alignkern[trl]"``).
"""

from __future__ import annotations

import contextvars
import copy
import functools
import threading
import weakref
from collections.abc import Callable

import torch
import trl.trainer.utils as _trl_utils
from trl.kernels import chunked_logprob as _trl_kernel

from .. import _autocast
from ..ops.linear_logprobs import linear_logprobs

TESTED_TRL = ">=1.16,<1.17"
# The per-token fields of TRL's FusedCausalLMOutput besides log_probs, in its order; alignkern's
# statistics have the same names.
OPTIONAL_OUTPUTS = _trl_kernel.OPTIONAL_OUTPUTS

_TRL_FUNCTION = _trl_utils._ChunkedLogProbFunction
# Reference counts, under _LOCK: every open handle (alignkern's function is installed in TRL's
# module while there is one) and the open global handles. Each scoped model counts its own
# handles (``_ScopedForward.handles``).
_LOCK = threading.RLock()
_open_handles = 0
_global_handles = 0
# What ``trl.trainer.utils._ChunkedLogProbFunction`` was before the first open handle: it runs the
# heads alignkern is off for, and the last undo puts it back.
_replaced = _TRL_FUNCTION
_scoped = contextvars.ContextVar("alignkern_trl_scoped", default=False)


class AlignkernFusedHead:
    """Drop-in for TRL's ``ChunkedLogProbFunction``: ``apply`` takes its arguments and returns
    its five outputs, computed by alignkern where alignkern is switched on (``use_alignkern``)
    and by the function it replaced (TRL's own) elsewhere."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size,
              final_logit_softcapping=None, logit_scale=1.0, outputs=OPTIONAL_OUTPUTS):
        if not (_global_handles or _scoped.get()):
            return _replaced.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                   final_logit_softcapping, logit_scale, outputs)
        return fused_head(hidden, weight, bias, targets, temperature, final_logit_softcapping,
                          logit_scale, outputs)


def fused_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               targets: torch.Tensor, temperature: float, softcap: float | None,
               logit_scale: float, outputs: tuple[str, ...]) -> tuple:
    """TRL's fused-head contract on alignkern: ``hidden (N, H)``, ``weight (V, H)``, ``bias (V,)``
    or None, ``targets (N,)`` token ids → ``(log_probs, entropy, log_sum_sq_probs, mean_logits,
    is_top1)``, each ``(N,)`` (float32; ``is_top1`` bool), None where not in ``outputs``.

    ``hidden``, ``weight`` and ``bias`` may have any floating dtypes, as with TRL's kernel; the
    projection's dtype is ``projection_operands``'. Gradients come back in each input's dtype."""
    cast_hidden, cast_weight, cast_bias = projection_operands(hidden, weight, bias)
    if hasattr(weight, "ds_id"):
        # A DeepSpeed ZeRO-3 parameter, gathered by TRL's context for this call only: the
        # backward must not find it partitioned again, so it keeps a gathered copy (a cast is one).
        cast_weight = cast_weight.clone() if cast_weight is weight else cast_weight
        cast_bias = cast_bias.clone() if cast_bias is bias and bias is not None else cast_bias
    stats = tuple(name for name in OPTIONAL_OUTPUTS if name in outputs)
    result = linear_logprobs(cast_hidden, cast_weight, targets, bias=cast_bias,
                             temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                             stats=stats)
    # TRL's outputs are float32 whatever the projection's dtype (float64 included).
    return (*(None if x is None else x.float() for x in (result.logprobs, result.entropy,
                                                          result.log_sum_sq_probs,
                                                          result.mean_logits)), result.is_top1)


# Which float dtypes hold which exactly: a higher rank holds every lower one (float16 and bfloat16
# hold neither the other).
_RANK = {torch.float16: 0, torch.bfloat16: 0, torch.float32: 1, torch.float64: 2}


def projection_operands(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``hidden (N, H)``, ``weight (V, H)``, ``bias (V,)`` or None as ``linear_logprobs`` takes
    them, cast the way autograd records (gradients reach each input in its own dtype):

    * under autocast, the autocast dtype: alignkern's autocast policy (``alignkern._autocast``:
      float64 is left as it is); TRL's kernel casts each of its tiles to the same dtype;
    * otherwise the projection runs at ``hidden``'s precision (TRL's rule: with
      ``cast_lm_head_to_fp32`` TRL passes float32 hidden states and a head of the model's dtype).
      A head of lower precision is passed as it is (``linear_logprobs`` converts each tile in the
      kernel: the head is never copied); hidden states of lower precision than the head are cast
      up to the head's dtype instead of the head down: exact, and a copy of N x H elements rather
      than V x H (TRL would round the head to the hidden states' dtype, so alignkern is the more
      exact there); float16 against bfloat16 (neither holds the other) casts the head.
    """
    hidden, weight, bias = _autocast.cast_operands(hidden, weight, bias)
    if _RANK[hidden.dtype] < _RANK[weight.dtype]:
        hidden = hidden.to(weight.dtype)
    elif _RANK[hidden.dtype] == _RANK[weight.dtype] and weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    if bias is not None and bias.dtype not in (hidden.dtype, weight.dtype):
        bias = bias.to(weight.dtype)
    return hidden, weight, bias


class TRLHook:
    """What ``use_alignkern`` returns: ``undo()`` (or leaving a ``with`` block) releases what this
    call switched on. Handles nest in any order; what another handle keeps on stays on, and the
    last open handle's undo puts back the very objects the first call replaced. A second
    ``undo()`` of the same handle does nothing."""

    def __init__(self, release: Callable[[], None]):
        self._release = release

    def undo(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

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
        A ``TRLHook`` whose ``undo()`` releases this call. Handles nest in any order: a model's
        head runs on alignkern while any global handle or any handle scoped to that model is
        open. The last undo puts back exactly what the first call replaced (the same objects:
        ``trl.trainer.utils._ChunkedLogProbFunction``, each model's ``forward``). A
        ``copy.deepcopy`` of a scoped model is a stock model (TRL's kernel, the copy's own
        weights): pass the copy to ``use_alignkern`` for it.

    Raises:
        ValueError: ``target`` has no TRL fused LM head (``add_fused_lm_head`` has not run on it:
            pass the trainer once it is built, or call ``use_alignkern()`` with no argument).
    """
    if target is None:
        return _open_global()
    modules = list({id(module): module for model in _models_of(target)
                    for module in model.modules()}.values())
    with _LOCK:
        scoped = [_scope(module) for module in modules]
        scoped = [forward for forward in scoped if forward is not None]
        if not scoped:
            raise ValueError(
                f"use_alignkern: {type(target).__name__} has no TRL fused LM head (TRL's "
                "add_fused_lm_head has not patched it); pass the trainer once it is built, or "
                "call use_alignkern() with no argument to switch on every fused head, present or "
                "future")
        for forward in scoped:
            forward.handles += 1
        _acquire()
    return TRLHook(functools.partial(_release_scoped, scoped))


def _acquire() -> None:
    # TRL's fused forward looks the function up in its module at every call, so replacing it there
    # reaches every trainer, built or not.
    global _open_handles, _replaced
    with _LOCK:
        if _open_handles == 0:
            _replaced = _trl_utils._ChunkedLogProbFunction
            _trl_utils._ChunkedLogProbFunction = AlignkernFusedHead
        _open_handles += 1


def _release() -> None:
    global _open_handles
    with _LOCK:
        _open_handles -= 1
        # Put back what was there, unless someone has replaced alignkern's function since.
        if _open_handles == 0 and _trl_utils._ChunkedLogProbFunction is AlignkernFusedHead:
            _trl_utils._ChunkedLogProbFunction = _replaced


def _open_global() -> TRLHook:
    global _global_handles
    with _LOCK:
        _global_handles += 1
        _acquire()
    return TRLHook(_release_global)


def _release_global() -> None:
    global _global_handles
    with _LOCK:
        _global_handles -= 1
        _release()


def _release_scoped(scoped: list[_ScopedForward]) -> None:
    with _LOCK:
        for forward in scoped:
            forward.release()
        _release()


def _models_of(target) -> list[torch.nn.Module]:
    if isinstance(target, torch.nn.Module):
        return [target]
    models = [getattr(target, "model", None), getattr(target, "ref_model", None)]
    models = [model for model in models if isinstance(model, torch.nn.Module)]
    if not models:
        raise ValueError(f"use_alignkern: target must be a TRL trainer, a model or None, got "
                         f"{type(target).__name__}")
    return models


# The instance attributes a fused forward can sit in: ``forward``, or, once accelerate has wrapped
# it in an autocasting forward under mixed precision, ``_original_forward``.
_FORWARD_NAMES = ("forward", "_original_forward")


def _scope(module: torch.nn.Module) -> _ScopedForward | None:
    """The module's ``_ScopedForward``, put in place of its forward if it has TRL's fused forward
    and none yet; None for a module without a fused head."""
    for name in _FORWARD_NAMES:
        if isinstance(vars(module).get(name), _ScopedForward):
            return vars(module)[name]
    if not any(_is_trl_fused(vars(module).get(name)) for name in _FORWARD_NAMES):
        return None
    module.forward = _ScopedForward(module, module.forward)
    return module.forward


def _is_trl_fused(forward) -> bool:
    """Whether ``forward`` is the instance forward TRL's ``add_fused_lm_head`` set (its
    ``functools.wraps`` keeps the model's name, not its code)."""
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    return code is not None and code.co_name == "_fused_forward"


class _ScopedForward:
    """A model's forward while ``use_alignkern(model)`` handles are open: ``original`` (TRL's
    fused forward, or accelerate's wrapper around it) run with alignkern switched on. One per
    module, counting its open handles; when the last is released it puts ``original`` back (and
    passes calls straight through if something has wrapped it meanwhile, so it cannot be taken
    out). A deepcopy of the module gets ``original``'s copy, bound to the copy: not scoped."""

    def __init__(self, module: torch.nn.Module, original):
        functools.update_wrapper(self, original)  # name, docs, signature (generate reads it)
        self.original = original
        self.handles = 0
        self._module = weakref.ref(module)

    def __call__(self, *args, **kwargs):
        if not self.handles:
            return self.original(*args, **kwargs)
        token = _scoped.set(True)
        try:
            return self.original(*args, **kwargs)
        finally:
            _scoped.reset(token)

    def release(self) -> None:
        self.handles -= 1
        module = self._module()
        if self.handles or module is None:
            return
        for name in _FORWARD_NAMES:
            if vars(module).get(name) is self:
                setattr(module, name, self.original)

    def __deepcopy__(self, memo):
        return copy.deepcopy(self.original, memo)
