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
from hf_models import tiny_model, tiny_tokenizer  # noqa: E402
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


def test_cast_lm_head_to_fp32_never_copies_the_head(monkeypatch):
    """float32 hidden states and a bf16 head go to linear_logprobs as they are: the kernels convert
    each tile, so the V x H head is not copied to float32 (2.5 GB at V = 152k, H = 4096)."""
    import alignkern.integrations.trl as hook

    seen = {}
    original = hook.linear_logprobs

    def spy(hidden, weight, *args, **kwargs):
        seen["weight"] = weight
        return original(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(hook, "linear_logprobs", spy)
    copies = []  # _run hooks a copy of the model
    _run(tiny_model("llama", dtype=torch.bfloat16).train(), ALL, True, prepare=copies.append,
         cast_lm_head_to_fp32=True)
    assert seen["weight"] is copies[0].lm_head.weight
    hidden = torch.randn(3, 8)
    weight = torch.randn(5, 8, dtype=torch.bfloat16)
    assert hook.projection_operands(hidden, weight, None)[1] is weight


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


# ----------------------------------------------------------------------------- every dtype mix

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
AUTOCAST = (None, torch.float16, torch.bfloat16)
# Unit roundoff of each dtype.
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11,
        torch.bfloat16: 2.0**-8}
_RANK = {torch.float16: 0, torch.bfloat16: 0, torch.float32: 1, torch.float64: 2}


def _dtype_name(dtype):
    return "none" if dtype is None else str(dtype).removeprefix("torch.")


def _alignkern_roundings(hidden, weight, autocast):
    """The dtypes ``fused_head`` documents rounding hidden and the head (and bias) through, in
    order: under autocast the autocast dtype (float64 kept); then the projection's, the more
    precise of the two where one holds the other, else hidden's."""
    if autocast is not None:
        hidden, weight = (d if d == torch.float64 else autocast for d in (hidden, weight))
    projection = weight if _RANK[hidden] < _RANK[weight] else hidden
    return (hidden, projection), (weight, projection)


def _trl_dtype(hidden, autocast):
    """The projection dtype of TRL's kernel: the autocast dtype under autocast, else hidden's."""
    return hidden if autocast is None else autocast


def _scale(hidden, weight, bias, temperature):
    """The largest sum of |products| in a logit: what the rounding errors in the logits scale
    with."""
    sums = hidden.detach().abs().double() @ weight.detach().abs().double().T
    if bias is not None:
        sums = sums + bias.detach().abs().double()
    return float(sums.max()) / temperature


def _exact(hidden, weight, bias, targets, temperature, roundings):
    """Float64 log-probs and entropy of the operands rounded through ``roundings`` (hidden's
    dtypes, then the head's and bias'), differentiable in the float64 leaves it returns last."""
    leaves = []
    for x, dtypes in zip((hidden, weight, bias), (roundings[0], roundings[1], roundings[1])):
        for dtype in dtypes:
            x = x.detach().to(dtype)
        leaves.append(x.double().requires_grad_())
    log_p = torch.log_softmax((leaves[0] @ leaves[1].T + leaves[2]) / temperature, -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_p.gather(-1, targets[:, None])[:, 0], entropy, leaves


def _relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("autocast", AUTOCAST, ids=_dtype_name)
@pytest.mark.parametrize("weight_dtype", DTYPES, ids=_dtype_name)
@pytest.mark.parametrize("hidden_dtype", DTYPES, ids=_dtype_name)
def test_every_dtype_mix_equals_trl_kernel(hidden_dtype, weight_dtype, autocast):
    """Every hidden/head dtype pair TRL's kernel accepts, with and without autocast (the dtypes a
    model hands it: float16 model under bf16 autocast gives float32 hidden states and a float16
    head, ``cast_lm_head_to_fp32`` float32 hidden states and the model's head, ...).

    alignkern projects in the dtype ``projection_operands`` documents and keeps its logits in
    float32: its log-probs and entropy are within 2e-5 of float64 on the same rounded operands,
    its gradients within the rounding of that dtype and of the gradient's own; and it is never
    less exact than TRL's kernel. The two agree within the rounding of TRL's projection dtype
    (TRL rounds each logits tile to it): 2 u |h| |w| / T on the outputs, 4 u relative on the
    gradients (u: TRL's unit roundoff) plus alignkern's own rounding."""
    gen = torch.Generator().manual_seed(5)
    rows, size, vocab, temperature = 24, 64, 700, 0.8
    operands = (torch.randn(rows, size, generator=gen).to(hidden_dtype),
                (torch.randn(vocab, size, generator=gen) / 4).to(weight_dtype),
                (torch.randn(vocab, generator=gen) / 4).to(weight_dtype))
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    upstream = (torch.randn(rows, generator=gen), torch.randn(rows, generator=gen))

    def run(function):
        leaves = [x.clone().requires_grad_() for x in operands]
        context = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
        with context:
            log_probs, entropy, *_ = function.apply(*leaves, targets, temperature, 256, None, 1.0,
                                                    ("entropy",))
        sum(((x * g).sum() for x, g in zip((log_probs, entropy), upstream))).backward()
        return (log_probs, entropy), [x.grad for x in leaves]

    with ak_trl.use_alignkern():
        ours, our_grads = run(ak_trl.AlignkernFusedHead)
    theirs, their_grads = run(ChunkedLogProbFunction)
    roundings = _alignkern_roundings(hidden_dtype, weight_dtype, autocast)
    trl_unit = UNIT[_trl_dtype(hidden_dtype, autocast)]
    *exact, leaves = _exact(*operands, targets, temperature, roundings)
    sum(((x * g).sum() for x, g in zip(exact, upstream))).backward()
    exact = [x.detach() for x in exact]
    scale = _scale(*operands, temperature)

    for name, mine, trl, truth in zip(("log_probs", "entropy"), ours, theirs, exact):
        assert mine.dtype == trl.dtype, name
        our_error = float((mine.detach().double() - truth).abs().max())
        their_error = float((trl.detach().double() - truth).abs().max())
        assert our_error <= 2e-5 and our_error <= their_error + 2e-5, (name, our_error,
                                                                       their_error)
        difference = float((mine - trl).detach().double().abs().max())
        assert difference <= 2 * trl_unit * scale + 2e-5, (name, difference, trl_unit * scale)
    chains = (roundings[0], roundings[1], roundings[1])
    for name, mine, trl, leaf, chain in zip(("hidden", "weight", "bias"), our_grads, their_grads,
                                            leaves, chains):
        assert mine.dtype == trl.dtype, name
        # the gradient comes back through each cast: rounded to each dtype, then its own
        own_rounding = sum(UNIT[dtype] for dtype in chain) + UNIT[mine.dtype] + 1e-5
        our_error, their_error = _relative(mine, leaf.grad), _relative(trl, leaf.grad)
        assert our_error <= own_rounding, (name, our_error, own_rounding)
        assert our_error <= their_error + own_rounding, (name, our_error, their_error)
        assert _relative(mine, trl) <= 4 * trl_unit + own_rounding, (name, _relative(mine, trl))


@pytest.mark.parametrize("cast_lm_head_to_fp32", [False, True], ids=["", "cast_lm_head_to_fp32"])
@pytest.mark.parametrize("autocast", AUTOCAST, ids=_dtype_name)
@pytest.mark.parametrize("model_dtype", DTYPES[:3], ids=_dtype_name)
def test_every_model_dtype_runs_like_trl(model_dtype, autocast, cast_lm_head_to_fp32,
                                         monkeypatch, alignkern_calls):
    """A float32, float16 or bfloat16 model, with and without autocast to float16 or bfloat16,
    with and without ``cast_lm_head_to_fp32``: the fused forward and backward run on alignkern
    (today's TRL's ``test_train_model_dtype`` case is float16 under bf16 autocast, where the
    hidden states come out float32 and the head is float16); its outputs agree with TRL's
    within the rounding of TRL's projection dtype (as in the test above, from the operands TRL's
    kernel received), the gradients of every parameter within 8 u relative (u: the unit roundoff
    of the least precise dtype in play: the backbone rounds too) and in the same dtypes."""
    received = []

    class Recorder:
        @staticmethod
        def apply(hidden, weight, bias, *args):
            autocast_on = torch.is_autocast_enabled("cpu")
            received.append((hidden, weight, bias, torch.get_autocast_dtype("cpu")
                             if autocast_on else None))
            return ChunkedLogProbFunction.apply(hidden, weight, bias, *args)

    model = tiny_model("llama", dtype=model_dtype).train()
    outputs = ("log_probs", "entropy")
    head = dict(temperature=0.7, cast_lm_head_to_fp32=cast_lm_head_to_fp32)
    with monkeypatch.context() as patch:
        patch.setattr(trl_utils, "_ChunkedLogProbFunction", Recorder)
        want, want_grads = _run(model, outputs, False, autocast, **head)
    got, got_grads = _run(model, outputs, True, autocast, **head)
    assert alignkern_calls and len(received) == 1

    hidden, weight, bias, trl_autocast = received[0]
    trl_unit = UNIT[_trl_dtype(hidden.dtype, trl_autocast)]
    bound = 2 * trl_unit * _scale(hidden, weight, bias, 0.7) + 2e-5
    for field in ("loss", *outputs):
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == b.dtype and a.shape == b.shape, field
        assert float((a - b).detach().double().abs().max()) <= bound, field
    least = max((model_dtype, autocast or model_dtype), key=UNIT.get)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in got_grads.items():
        assert grad.dtype == want_grads[name].dtype, name
        assert _relative(grad, want_grads[name]) <= 8 * UNIT[least] + 1e-5, name


def test_train_model_dtype(tmp_path, alignkern_calls):
    """TRL's own ``test_train_model_dtype`` (DPO), with a tiny local model instead of the hub's:
    a float16 model (``model_init_kwargs``) trained under TRL's default bf16 mixed precision
    (bf16 autocast on CPU) with ``use_alignkern()``; as TRL asserts: a train loss, and every
    parameter changed."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tiny_model("qwen2").save_pretrained(tmp_path / "model")
    data = Dataset.from_dict({"prompt": ["Question: can a cat fly?", "Numbers one two three"],
                              "chosen": [" no", " four five"], "rejected": [" yes", " seven"]})
    args = DPOConfig(output_dir=str(tmp_path / "out"), model_init_kwargs={"dtype": torch.float16},
                     learning_rate=0.1, report_to=[], use_cpu=True, max_steps=2,
                     per_device_train_batch_size=2, save_strategy="no", disable_tqdm=True,
                     dataloader_num_workers=0, max_length=32)
    assert args.bf16
    with ak_trl.use_alignkern():
        trainer = DPOTrainer(model=str(tmp_path / "model"), args=args, train_dataset=data,
                             processing_class=tiny_tokenizer())
        assert trainer.model.dtype == torch.float16
        before = {name: p.clone() for name, p in trainer.model.named_parameters()}
        trainer.train()
    assert alignkern_calls
    assert trainer.state.log_history[-1]["train_loss"] is not None
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} has not changed"


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
