"""Every registered op, forward and backward, called directly as ``torch.ops.alignkern.<op>`` (as a
compiled graph or another library would, without alignkern's Python wrappers), validates every
argument itself: a mis-shaped or mistyped tensor, or a bad scalar, is a clear TypeError or
ValueError naming the op, never a kernel call with inconsistent sizes. CI runs this file once more
against an AddressSanitizer build of the C++ kernels (.ci/asan), so a read or write past a buffer
fails it even where the numbers would look fine."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from conftest import available_backends

import alignkern  # noqa: F401  (registers the ops)

BACKENDS = available_backends()
# Sizes chosen so that no two symbols are equal and a grown dimension never matches another.
N, K, V, H, H_REF = 3, 2, 11, 5, 7
B, HQ, HKV, LQ, LK, D = 2, 4, 2, 5, 6, 8
G, ROWS, LP = 3, 9, 7  # shared_prefix_attention: ROWS rows in G groups, a prefix of LP keys


class Case(NamedTuple):
    """A valid call of one registered op: its arguments in schema order, and for each tensor
    argument the symbol of each dimension (dimensions with the same symbol must agree)."""

    args: dict
    dims: dict


def _token_logprobs_cases(backend):
    logits = torch.randn(N, V)
    targets = torch.randint(0, V, (N, K))
    forward = Case(dict(logits=logits, targets=targets, temperature=1.3, ignore_index=-100,
                        backend=backend),
                   dict(logits=("N", "V"), targets=("N", "K")))
    out, row_max, log_sum = torch.ops.alignkern.token_logprobs(logits, targets, 1.3, -100,
                                                               "reference")
    backward = Case(dict(grad_out=torch.randn_like(out), grad_lse=torch.randn_like(log_sum),
                         logits=logits, targets=targets, row_max=row_max, log_sum=log_sum,
                         temperature=1.3, ignore_index=-100, backend=backend),
                    dict(grad_out=("N", "K"), grad_lse=("N",), logits=("N", "V"),
                         targets=("N", "K"), row_max=("N",), log_sum=("N",)))
    return {"token_logprobs": forward, "token_logprobs_backward": backward}


def _linear_logprobs_cases(backend):
    hidden, weight, bias = torch.randn(N, H), torch.randn(V, H), torch.randn(V)
    targets = torch.randint(0, V, (N, K))
    options = dict(temperature=0.9, softcap=20.0, logit_scale=0.5, ignore_index=-100)
    dims = dict(hidden=("N", "H"), weight=("V", "H"), targets=("N", "K"), bias=("V",))
    forward = Case(dict(hidden=hidden, weight=weight, targets=targets, bias=bias, **options,
                        keep_logits=False, backend=backend), dims)
    out, row_max, log_sum, _ = torch.ops.alignkern.linear_logprobs(
        hidden, weight, targets, bias, *options.values(), False, "reference")
    stats = Case(dict(hidden=hidden, weight=weight, targets=targets, bias=bias, **options,
                      entropy=True, log_sum_sq_probs=True, mean_logits=True, is_top1=True,
                      max_logits=True, keep_logits=False, backend=backend), dims)
    entropy = torch.ops.alignkern.linear_logprobs_stats(
        hidden, weight, targets, bias, *options.values(), True, False, False, False, False, False,
        "reference")[3]
    backward = Case(dict(grad_out=torch.randn_like(out), grad_lse=torch.randn_like(log_sum),
                         hidden=hidden, weight=weight, targets=targets, bias=bias,
                         row_max=row_max, log_sum=log_sum, **options, need_hidden_grad=True,
                         need_weight_grad=True, need_bias_grad=True, backend=backend,
                         grad_entropy=torch.randn_like(entropy), entropy=entropy),
                    dict(dims, grad_out=("N", "K"), grad_lse=("N",), row_max=("N",),
                         log_sum=("N",), grad_entropy=("N",), entropy=("N",)))
    return {"linear_logprobs": forward, "linear_logprobs_stats": stats,
            "linear_logprobs_backward": backward}


def _linear_kl_cases(backend):
    sides = dict(hidden=torch.randn(N, H), weight=torch.randn(V, H),
                 ref_hidden=torch.randn(N, H_REF), ref_weight=torch.randn(V, H_REF))
    dims = dict(hidden=("N", "H"), weight=("V", "H"), ref_hidden=("N", "Hr"),
                ref_weight=("V", "Hr"))
    forward = Case(dict(**sides, temperature=1.2, logit_scale=0.5, keep_gradient=False,
                        backend=backend), dims)
    _, row_max, log_sum, expect, *_ = torch.ops.alignkern.linear_kl(*sides.values(), 1.2, 0.5,
                                                                    False, "reference")
    backward = Case(dict(grad_kl=torch.randn(N), **sides, row_max=row_max, log_sum=log_sum,
                         expect=expect, temperature=1.2, logit_scale=0.5, need_weight_grad=True,
                         backend=backend),
                    dict(dims, grad_kl=("N",), row_max=("N",), log_sum=("N",), expect=("N",)))
    return {"linear_kl": forward, "linear_kl_backward": backward}


def _reward_attention_cases(backend):
    q, k, v = torch.randn(B, HQ, LQ, D), torch.randn(B, HKV, LK, D), torch.randn(B, HKV, LK, D)
    inputs = dict(q=q, k=k, v=v, key_bias=torch.randn(B, HQ, LK),
                  key_rank=torch.randint(0, 3, (B, LK)), query_rank=torch.randint(0, 3, (B, LQ)))
    dims = dict(q=("B", "Hq", "Lq", "D"), k=("B", "Hkv", "Lk", "D"), v=("B", "Hkv", "Lk", "D"),
                key_bias=("B", "Hq", "Lk"), key_rank=("B", "Lk"), query_rank=("B", "Lq"))
    forward = Case(dict(**inputs, causal=False, scale=0.3, backend=backend), dims)
    out, lse = torch.ops.alignkern.reward_attention(*inputs.values(), False, 0.3, "reference")
    backward = Case(dict(grad_out=torch.randn_like(out), grad_lse=torch.randn_like(lse),
                         **inputs, out=out, lse=lse, causal=False, scale=0.3,
                         need_bias_grad=True, backend=backend),
                    dict(dims, grad_out=("B", "Hq", "Lq", "D"), grad_lse=("B", "Hq", "Lq"),
                         out=("B", "Hq", "Lq", "D"), lse=("B", "Hq", "Lq")))
    return {"reward_attention": forward, "reward_attention_backward": backward}


def _shared_prefix_attention_cases(backend):
    inputs = dict(q=torch.randn(ROWS, HQ, LQ, D), prefix_k=torch.randn(G, HKV, LP, D),
                  prefix_v=torch.randn(G, HKV, LP, D), suffix_k=torch.randn(ROWS, HKV, LK, D),
                  suffix_v=torch.randn(ROWS, HKV, LK, D), prefix_key_bias=torch.randn(G, HQ, LP),
                  suffix_key_bias=torch.randn(ROWS, LK),
                  prefix_key_rank=torch.randint(0, 3, (G, LP)),
                  suffix_key_rank=torch.randint(0, 3, (ROWS, LK)),
                  query_rank=torch.randint(0, 3, (ROWS, LQ)))
    dims = dict(q=("N", "Hq", "Lq", "D"), prefix_k=("G", "Hkv", "Lp", "D"),
                prefix_v=("G", "Hkv", "Lp", "D"), suffix_k=("N", "Hkv", "Ls", "D"),
                suffix_v=("N", "Hkv", "Ls", "D"), prefix_key_bias=("G", "Hq", "Lp"),
                suffix_key_bias=("N", "Ls"), prefix_key_rank=("G", "Lp"),
                suffix_key_rank=("N", "Ls"), query_rank=("N", "Lq"))
    forward = Case(dict(**inputs, causal=True, scale=0.3, backend=backend), dims)
    out, lse = torch.ops.alignkern.shared_prefix_attention(*inputs.values(), True, 0.3,
                                                           "reference")
    backward = Case(dict(grad_out=torch.randn_like(out), grad_lse=torch.randn_like(lse),
                         **inputs, out=out, lse=lse, causal=True, scale=0.3,
                         need_prefix_bias_grad=True, need_suffix_bias_grad=True,
                         backend=backend),
                    dict(dims, grad_out=("N", "Hq", "Lq", "D"), grad_lse=("N", "Hq", "Lq"),
                         out=("N", "Hq", "Lq", "D"), lse=("N", "Hq", "Lq")))
    return {"shared_prefix_attention": forward, "shared_prefix_attention_backward": backward}


def cases(backend: str) -> dict[str, Case]:
    torch.manual_seed(0)
    return {**_token_logprobs_cases(backend), **_linear_logprobs_cases(backend),
            **_linear_kl_cases(backend), **_reward_attention_cases(backend),
            **_shared_prefix_attention_cases(backend)}


def call(name: str, args: dict):
    return getattr(torch.ops.alignkern, name)(*args.values())


def registered_ops() -> list[str]:
    return sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("alignkern::"))


def shared_dims(case: Case, arg: str) -> list[int]:
    """The dimensions of ``arg`` whose symbol another tensor argument of the call also has: growing
    one of them by 1 makes the call inconsistent."""
    others = {s for other, symbols in case.dims.items() if other != arg for s in symbols}
    return [i for i, symbol in enumerate(case.dims[arg]) if symbol in others]


def grown(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cat([x, x.narrow(dim, 0, 1)], dim=dim)


def wrong_dtype(x: torch.Tensor) -> torch.Tensor:
    """No argument of any op takes complex numbers (float ranks are valid, so not float)."""
    return x.to(torch.complex64)


def expect_clear_error(name: str, args: dict):
    with pytest.raises((TypeError, ValueError), match=rf"^{name}: "):
        call(name, args)


# ----------------------------------------------------------------------------- the tests


def test_every_registered_op_has_a_case():
    assert registered_ops() == sorted(cases("reference"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", registered_ops())
def test_the_valid_call_runs(backend, name):
    """The baseline the error cases perturb: it runs and gives finite outputs."""
    outputs = call(name, cases(backend)[name].args)
    for out in outputs if isinstance(outputs, tuple) else (outputs,):
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", registered_ops())
def test_each_tensor_argument_mis_shaped_in_turn(backend, name):
    case = cases(backend)[name]
    for arg in case.dims:
        x = case.args[arg]
        variants = [grown(x, dim) for dim in shared_dims(case, arg)]
        variants.append(x.unsqueeze(0).expand(2, *x.shape).contiguous())  # one more dimension
        assert variants, arg
        for bad in variants:
            expect_clear_error(name, {**case.args, arg: bad})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", registered_ops())
def test_each_tensor_argument_of_the_wrong_dtype(backend, name):
    case = cases(backend)[name]
    for arg in case.dims:
        with pytest.raises(TypeError, match=rf"^{name}: "):
            call(name, {**case.args, arg: wrong_dtype(case.args[arg])})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", registered_ops())
def test_each_tensor_argument_on_another_device(backend, name):
    case = cases(backend)[name]
    for arg in case.dims:
        expect_clear_error(name, {**case.args, arg: case.args[arg].to("meta")})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", registered_ops())
def test_non_contiguous_arguments_give_the_contiguous_answer(backend, name):
    """Views with other strides are read correctly (the ops copy what a kernel needs
    contiguous)."""
    case = cases(backend)[name]
    expected = call(name, case.args)
    for arg in case.dims:
        x = case.args[arg]
        strided = torch.stack([x, torch.full_like(x, 7)], dim=-1)[..., 0]  # every stride doubled
        got = call(name, {**case.args, arg: strided})
        for a, b in zip(got if isinstance(got, tuple) else (got,),
                        expected if isinstance(expected, tuple) else (expected,)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


BAD_SCALARS = {
    "temperature": [0.0, -1.0, float("nan"), float("inf"), 1e31, 1e-31],
    "softcap": [0.0, -2.0, float("nan"), float("inf")],
    "logit_scale": [0.0, -1.0, float("nan"), float("inf")],
    "scale": [float("nan"), float("inf")],
    "backend": ["tpu", ""],
}


@pytest.mark.parametrize("name", registered_ops())
def test_bad_scalars_are_refused(name):
    case = cases("reference")[name]
    checked = [arg for arg in BAD_SCALARS if arg in case.args]
    assert "backend" in checked and len(checked) >= 2
    for arg in checked:
        for value in BAD_SCALARS[arg]:
            expect_clear_error(name, {**case.args, arg: value})


def int_arguments(name: str) -> list[str]:
    return [a.name for a in getattr(torch.ops.alignkern, name).default._schema.arguments
            if str(a.type) == "int"]


INT_OPS = [name for name in registered_ops() if int_arguments(name)]


def test_ignore_index_is_the_only_integer_argument():
    """So the int64 checks below cover every integer argument of every registered op."""
    assert {arg for name in registered_ops() for arg in int_arguments(name)} == {"ignore_index"}
    assert INT_OPS == ["linear_logprobs", "linear_logprobs_backward", "linear_logprobs_stats",
                       "token_logprobs", "token_logprobs_backward"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", INT_OPS)
@pytest.mark.parametrize("value", [-(2**63), 2**63 - 1, 2**31, -(2**31) - 1],
                         ids=["int64-min", "int64-max", "2^31", "-2^31-1"])
def test_ignore_index_takes_the_whole_int64_range(backend, name, value):
    """At any int64 value (none truncated to 32 bits) ignore_index marks the targets that hold it
    exactly as -100 does, on every backend."""
    args = cases(backend)[name].args
    targets = args["targets"].clone()
    targets[0, 0] = -100
    expected = call(name, {**args, "targets": targets, "ignore_index": -100})
    targets[0, 0] = value
    got = call(name, {**args, "targets": targets, "ignore_index": value})
    for a, b in zip(got if isinstance(got, tuple) else (got,),
                    expected if isinstance(expected, tuple) else (expected,)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", INT_OPS)
@pytest.mark.parametrize("value", [2**63, 2**70, -(2**63) - 1])
def test_ignore_index_beyond_int64_stops_in_torch_before_the_op(name, value):
    """An integer beyond int64 cannot reach the op's own checks (which refuse it with a
    ValueError when it comes through the public functions): torch's argument parser refuses it
    first, with a RuntimeError naming the op, the argument and the value. No kernel runs."""
    args = cases("reference")[name].args
    with pytest.raises(RuntimeError, match=rf"^alignkern::{name}\(\) Expected a value of type "
                                           rf"'int' for argument 'ignore_index'.*\nPosition: \d+\n"
                                           rf"Value: {value}\n"):
        call(name, {**args, "ignore_index": value})
