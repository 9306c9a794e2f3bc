"""alignkern.integrations.trl: TRL's fused LM head (``add_fused_lm_head``) run by alignkern equals
TRL's own kernel on the same model and inputs, for the settings TRL passes it (temperature,
softcap, logit scale, ``cast_lm_head_to_fp32``, autocast, every subset of outputs), and with a
ZeRO-3 head that TRL gathers for the forward only. The trainers themselves are in
test_trl_trainers.py."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

pytest.importorskip("trl")

import trl.trainer.utils as trl_utils  # noqa: E402
from hf_models import tiny_model  # noqa: E402
from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: E402

import alignkern.integrations.trl as ak_trl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
FIELDS = ALL[1:]


@pytest.fixture
def alignkern_calls(monkeypatch):
    """How many times alignkern ran TRL's fused head."""
    calls = []
    original = ak_trl.fused_head
    monkeypatch.setattr(ak_trl, "fused_head", lambda *args: calls.append(1) or original(*args))
    return calls


def _batch(seed=0, rows=2, width=9):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (rows, width), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    return ids, labels


def _run(model, outputs, use_alignkern, dtype=None, prepare=None, **head):
    """One fused forward and backward (log-probs and, if asked, entropy in the loss) of a copy of
    ``model`` (given to ``prepare`` first); returns the output and every parameter's gradient."""
    model = copy.deepcopy(model)
    if prepare is not None:
        prepare(model)
    trl_utils.add_fused_lm_head(model, outputs=outputs, **head)
    hook = ak_trl.use_alignkern(model) if use_alignkern else contextlib.nullcontext()
    ids, labels = _batch()
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
    with hook, autocast:
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        loss = out.loss + (0.3 * out.entropy.sum() if out.entropy is not None else 0.0)
    loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, want, atol=2e-6, grad_rtol=1e-5):
    out, grads = got
    ref_out, ref_grads = want
    for field in ("loss", "log_probs", *FIELDS):
        a, b = getattr(out, field), getattr(ref_out, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, field
            torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=0,
                                       msg=lambda m, f=field: f"{f}: {m}")
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        ref = ref_grads[name]
        assert grad.dtype == ref.dtype, name
        err = (grad.double() - ref.double()).norm() / ref.double().norm()
        assert err <= grad_rtol, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("family", ["llama", "gemma2", "cohere", "granite"])
@pytest.mark.parametrize("outputs", [ALL, ("log_probs",), ("log_probs", "entropy"),
                                     ("log_probs", "is_top1", "mean_logits")])
def test_fused_head_equals_trl_kernel(family, outputs, alignkern_calls):
    """Softcap (gemma2), logit_scale (cohere), 1 / logits_scaling (granite) and a temperature."""
    model = tiny_model(family).train()
    want = _run(model, outputs, False, temperature=0.7)
    assert not alignkern_calls
    got = _run(model, outputs, True, temperature=0.7)
    assert alignkern_calls
    _assert_same(got, want)


def test_cast_lm_head_to_fp32_with_a_bfloat16_model():
    """TRL passes float32 hidden states and the bf16 head; the projection runs in float32 and the
    head's gradient comes back in bf16, as with TRL's kernel."""
    model = tiny_model("llama", dtype=torch.bfloat16).train()
    want = _run(model, ALL, False, cast_lm_head_to_fp32=True)
    got = _run(model, ALL, True, cast_lm_head_to_fp32=True)
    assert got[1]["lm_head.weight"].dtype == torch.bfloat16
    # Both project in float32 from the same bf16 values; the decoder's bf16 gradients round.
    _assert_same(got, want, atol=1e-5, grad_rtol=2e-2)


def test_bfloat16_autocast_is_at_least_as_exact_as_trl():
    """Under bf16 autocast both project the bf16 operands (TRL's rule). TRL rounds each logits tile
    to bf16 before folding it, alignkern keeps the products in float32: against the float64
    projection of the same bf16 operands alignkern's log-probs and entropy are within 1e-5 and
    at least 100x closer than TRL's. (So the two differ by TRL's rounding, about 1e-2, which no
    change of TRL's chunk size moves: its chunks change only the order of its fp32 sums.)"""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 64, generator=gen)
    weight = torch.randn(3001, 64, generator=gen) / 4
    targets = torch.randint(0, 3001, (40,), generator=gen)
    with ak_trl.use_alignkern(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = ak_trl.AlignkernFusedHead.apply(hidden, weight, None, targets, 0.8, 1024, None,
                                               1.0, ("entropy",))
        theirs = ak_trl._TRL_FUNCTION.apply(hidden, weight, None, targets, 0.8, 1024, None, 1.0,
                                            ("entropy",))
    z = (hidden.bfloat16().double() @ weight.bfloat16().double().T) / 0.8
    log_p = torch.log_softmax(z, -1)
    exact = (log_p.gather(-1, targets[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1))
    for ours_x, theirs_x, exact_x in zip(ours[:2], theirs[:2], exact):
        our_err = (ours_x.double() - exact_x).abs().max()
        their_err = (theirs_x.double() - exact_x).abs().max()
        assert our_err <= 1e-5 and our_err * 100 <= their_err, (our_err, their_err)


def test_zero3_head_gathered_for_the_forward_only(monkeypatch, alignkern_calls):
    """A ZeRO-3 parameter (``ds_id``) holds no data outside TRL's gather context; TRL's kernel
    gathers again in its backward, alignkern keeps a gathered copy: the backward never reads the
    partitioned head. (DeepSpeed's gradient hook, simulated, sees the gathered parameter.)"""
    model = tiny_model("llama").train()
    want = _run(model, ("log_probs", "entropy"), False)

    def partitioned(module):
        weight = module.lm_head.weight
        full = weight.data
        weight.ds_id = 1
        weight.data = torch.empty(0)

        @contextlib.contextmanager
        def gather(*params):
            weight.data = full
            try:
                yield
            finally:
                weight.data = torch.empty(0)

        def gathered_for_reduction(grad):
            weight.data = full
            return grad

        weight.register_hook(gathered_for_reduction)
        monkeypatch.setattr(trl_utils, "maybe_gather_lm_head_ctx", gather)

    got = _run(model, ("log_probs", "entropy"), True, prepare=partitioned)
    assert alignkern_calls
    _assert_same(got, want)


def _fused_model(family="llama"):
    model = tiny_model(family)
    trl_utils.add_fused_lm_head(model)
    return model


def _on(model, alignkern_calls) -> bool:
    """Whether ``model``'s fused head runs on alignkern (one fused forward, counted)."""
    ids, labels = _batch()
    before = len(alignkern_calls)
    model(input_ids=ids, labels=labels, fused_lm_head=True)
    return len(alignkern_calls) > before


def test_scoping_and_undo(alignkern_calls):
    """``use_alignkern(model)`` switches on that model only; ``use_alignkern()`` every fused
    head, built before or after; ``undo`` switches back; a model without a fused head is a clear
    error."""
    first, second = _fused_model(), _fused_model()
    hook = ak_trl.use_alignkern(first)
    assert _on(first, alignkern_calls) and not _on(second, alignkern_calls)
    hook.undo()
    assert not _on(first, alignkern_calls)
    with ak_trl.use_alignkern():
        later = _fused_model()
        assert _on(second, alignkern_calls) and _on(later, alignkern_calls)
    assert not _on(later, alignkern_calls)
    with pytest.raises(ValueError, match="use_alignkern: LlamaForCausalLM has no TRL fused LM "
                                         "head"):
        ak_trl.use_alignkern(tiny_model("llama"))
    with pytest.raises(ValueError, match="use_alignkern: target must be a TRL trainer, a model "
                                         "or None, got str"):
        ak_trl.use_alignkern("model")


@pytest.mark.parametrize("kinds", [("global", "global"), ("scoped", "scoped"),
                                   ("global", "scoped"), ("scoped", "global")])
@pytest.mark.parametrize("undo_order", [(0, 1), (1, 0)], ids=["first-first", "last-first"])
def test_handles_nest_in_any_order(kinds, undo_order, alignkern_calls):
    """Every handle holds its own reference: a model is on while any global handle or any handle
    scoped to it is open, whatever order they are undone in; undoing a handle twice changes
    nothing the second time; the last undo puts back the very objects it replaced (TRL's
    function in ``trl.trainer.utils`` and the model's forward)."""
    model, other = _fused_model(), _fused_model()
    forward = vars(model)["forward"]

    def open_handle(kind):
        return ak_trl.use_alignkern() if kind == "global" else ak_trl.use_alignkern(model)

    def assert_state(open_kinds):
        assert _on(model, alignkern_calls) == bool(open_kinds), open_kinds
        assert _on(other, alignkern_calls) == ("global" in open_kinds), open_kinds

    handles = [open_handle(kind) for kind in kinds]
    assert_state(kinds)
    still_open = dict(enumerate(kinds))
    for index in undo_order:
        handles[index].undo()
        del still_open[index]
        assert_state(tuple(still_open.values()))
        handles[index].undo()  # harmless: it releases nothing another handle holds
        assert_state(tuple(still_open.values()))
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    assert vars(model)["forward"] is forward


def test_handles_nest_as_context_managers(alignkern_calls):
    model, other = _fused_model(), _fused_model()
    forward = vars(model)["forward"]
    with ak_trl.use_alignkern(model):
        with ak_trl.use_alignkern(model):
            assert _on(model, alignkern_calls) and not _on(other, alignkern_calls)
        assert _on(model, alignkern_calls)
        with ak_trl.use_alignkern() as everywhere:
            assert _on(model, alignkern_calls) and _on(other, alignkern_calls)
            everywhere.undo()  # an explicit undo inside the block: leaving it does nothing more
            assert _on(model, alignkern_calls) and not _on(other, alignkern_calls)
        assert _on(model, alignkern_calls) and not _on(other, alignkern_calls)
    assert not _on(model, alignkern_calls)
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    assert vars(model)["forward"] is forward


def test_last_undo_restores_another_patch_of_trl(monkeypatch, alignkern_calls):
    """What was in ``trl.trainer.utils._ChunkedLogProbFunction`` before the first handle (here
    another library's patch) is what runs the heads alignkern is off for, and what the last undo
    puts back."""
    calls = []

    class OtherPatch:
        @staticmethod
        def apply(*args):
            calls.append(1)
            return ak_trl._TRL_FUNCTION.apply(*args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", OtherPatch)
    model, other = _fused_model(), _fused_model()
    with ak_trl.use_alignkern(model):
        assert _on(model, alignkern_calls) and not calls
        assert not _on(other, alignkern_calls) and calls
    assert trl_utils._ChunkedLogProbFunction is OtherPatch


def test_a_deepcopy_of_a_scoped_model_is_not_scoped(alignkern_calls):
    """``copy.deepcopy`` of a model with an open ``use_alignkern(model)`` handle is a stock model:
    its fused head runs on TRL's kernel (hook it with its own ``use_alignkern(copy)``), with the
    copy's own weights, and nothing of it follows the original's handle."""
    model = _fused_model()
    ids, labels = _batch()
    with ak_trl.use_alignkern(model):
        clone = copy.deepcopy(model)
        assert _on(model, alignkern_calls) and not _on(clone, alignkern_calls)
        assert vars(clone)["forward"].__self__ is clone
        with torch.no_grad():
            clone.lm_head.weight.mul_(2)
        stock = clone(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        with ak_trl.use_alignkern(clone):
            assert _on(clone, alignkern_calls)
            ours = clone(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        torch.testing.assert_close(ours, stock, atol=2e-6, rtol=0)
        assert not _on(clone, alignkern_calls) and _on(model, alignkern_calls)
        original = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        assert not torch.allclose(original, ours)  # the copy's head, not the original's
    assert not _on(model, alignkern_calls) and not _on(clone, alignkern_calls)


def test_undo_when_the_forward_was_wrapped_since(alignkern_calls):
    """Something wraps the scoped forward after ``use_alignkern(model)`` (accelerate's mixed
    precision keeps the forward it wraps as ``_original_forward``): the undo cannot take the hook
    out of the wrapper, but it switches the model off, puts TRL's forward back where the hook sat,
    and the model can be hooked again."""
    model = _fused_model()
    trl_forward = vars(model)["forward"]
    hook = ak_trl.use_alignkern(model)
    scoped = vars(model)["forward"]
    model._original_forward = scoped
    model.forward = lambda *args, **kwargs: scoped(*args, **kwargs)
    assert _on(model, alignkern_calls)
    hook.undo()
    assert not _on(model, alignkern_calls)
    assert vars(model)["_original_forward"] is trl_forward
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    with ak_trl.use_alignkern(model):
        assert _on(model, alignkern_calls)
    assert not _on(model, alignkern_calls)
