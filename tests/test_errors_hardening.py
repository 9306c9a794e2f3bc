"""Argument checks shared through ``alignkern._checks``: numbers that ``float()`` refuses, and the
float32 range of the factors the LM-head kernels put on the logits."""

from __future__ import annotations

import pytest

from alignkern import _checks


@pytest.mark.parametrize("check, argument", [
    (lambda value: _checks.real("f", "x", value), "x"),
    (lambda value: _checks.real("f", "x", value, positive=True, optional=True), "x"),
    (lambda value: _checks.temperature("f", value), "temperature"),
], ids=["real", "real optional", "temperature"])
@pytest.mark.parametrize("value", [10**400, -(10**400)], ids=["huge", "-huge"])
def test_an_integer_beyond_float_range_is_a_value_error(check, argument, value):
    """float() refuses it with a bare OverflowError, which reached the caller (dpo_loss's beta,
    reward_attention's scale, linear_logprobs' temperature, ...)."""
    with pytest.raises(ValueError, match=rf"^f: {argument} must be within float's range "
                                         rf"\(about ±1.8e308\), got int -?1000"):
        check(value)


@pytest.mark.parametrize("temperature, logit_scale, softcap", [
    (1.0, 1.0, None), (1e-30, 1.0, None), (1e-20, 1e10, None), (1e30, 1e30, None),
    (1e-28, 1.0, 30.0), (1.0, 1e30, 1e-30), (2.0, 0.5, 1e30),
])
def test_logit_factors_within_float32_range_pass(temperature, logit_scale, softcap):
    assert _checks.logit_factors("f", temperature, logit_scale, softcap) is None


@pytest.mark.parametrize("temperature, logit_scale, softcap, name, got", [
    (1e-30, 1e10, None, "logit_scale / temperature", "1e+40"),
    (1e30, 1e-10, None, "logit_scale / temperature", "1e-40"),
    (1.0, 1e31, None, "logit_scale", "1e+31"),
    (1e-30, 1.0, 30.0, "softcap / temperature", "3e+31"),
    (1.0, 1.0, 1e39, "softcap", "1e+39"),
])
def test_logit_factors_outside_float32_range_name_the_factor(temperature, logit_scale, softcap,
                                                             name, got):
    """Each argument alone may be within range and a quotient not: temperature=1e-30 with
    logit_scale=1e10 gave [-inf, nan] from linear_logprobs."""
    given = f"temperature={temperature:g}, logit_scale={logit_scale:g}" + (
        "" if softcap is None else f", softcap={softcap:g}")
    with pytest.raises(ValueError) as error:
        _checks.logit_factors("f", temperature, logit_scale, softcap)
    assert str(error.value) == (f"f: {name} must be within [1e-30, 1e+30] (kernels hold it in "
                                f"float32), got {got} ({given})")
