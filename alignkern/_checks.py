"""Argument checks shared by the public functions and the registered ops.

Every check raises a ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, device or
value) whose message names the function, the argument, what was expected and what came, as
docs/design.md's error contract asks. The registered ops call these themselves, so a caller that skips
the Python wrappers (a compiled graph, another library) gets the same errors and never reaches a
kernel with inconsistent sizes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Kernels compute 1 / temperature in float32; beyond these bounds it leaves float32's normal range.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-30, 1e30


def describe(value) -> str:
    """How an argument is shown in an error: dtype, shape and device of a tensor, else its type
    and value."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    if value is None:
        return "None"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _names(dtypes: Iterable[torch.dtype]) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def tensor(fn: str, arg: str, value, *, dtypes: Sequence[torch.dtype] | None = None,
           floating: bool = False) -> torch.Tensor:
    """``value`` must be a tensor (of one of ``dtypes``, or of any real floating dtype)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {arg} must be a torch.Tensor, got {describe(value)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{fn}: {arg} must be {_names(dtypes)}, got {value.dtype}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{fn}: {arg} must be a real floating-point tensor, got {value.dtype}")
    return value


def optional_tensor(fn: str, arg: str, value, **kwargs) -> torch.Tensor | None:
    return None if value is None else tensor(fn, arg, value, **kwargs)


def shape(fn: str, arg: str, value: torch.Tensor, expected: Sequence[int],
          what: str | None = None) -> None:
    """``value.shape`` must equal ``expected`` (``what`` says where the expectation comes from)."""
    if tuple(value.shape) != tuple(expected):
        source = f" ({what})" if what else ""
        raise ValueError(f"{fn}: {arg} must have shape {tuple(expected)}{source}, got "
                         f"{tuple(value.shape)}")


def mask(fn: str, arg: str, value, expected: Sequence[int], what: str) -> torch.Tensor:
    """A bool (or integer 0/1) tensor of shape ``expected``."""
    tensor(fn, arg, value)
    if value.is_floating_point() or value.is_complex():
        raise TypeError(f"{fn}: {arg} must be a bool (or integer 0/1) tensor, got {value.dtype}")
    shape(fn, arg, value, expected, what)
    return value


def same_device(fn: str, **tensors: torch.Tensor | None) -> None:
    devices = {arg: t.device for arg, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{arg} on {device}" for arg, device in devices.items())
        raise ValueError(f"{fn}: all tensors must be on the same device, got {listed}")


def same_device_in_fake(fn: str, **tensors: torch.Tensor | None) -> None:
    """``same_device`` for fake kernels, which are what runs when one argument is on the meta
    device (the dispatcher picks the op's Meta kernel for the whole call)."""
    devices = {arg: t.device for arg, t in tensors.items() if t is not None}
    listed = ", ".join(f"{arg} on {device}" for arg, device in devices.items())
    torch._check_value(len(set(devices.values())) <= 1,
                       lambda: f"{fn}: all tensors must be on the same device, got {listed}")


def _as_float(fn: str, arg: str, value: numbers.Real) -> float:
    """``float(value)``; a ValueError for an integer (or fraction) beyond float's range, which
    ``float`` refuses with a bare OverflowError."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{fn}: {arg} must be within float's range (about ±1.8e308), got "
                         f"{describe(value)}") from None


def real(fn: str, arg: str, value, *, positive: bool = False, finite: bool = True,
         low: float | None = None, high: float | None = None, optional: bool = False):
    """A real number (int or float, not bool, not a string or tensor), returned as float; None
    passes through when ``optional``. NaN is always refused."""
    if optional and value is None:
        return None
    either = "None or " if optional else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {arg} must be {either}a real number, got {describe(value)}")
    number = _as_float(fn, arg, value)
    if math.isnan(number) or (finite and math.isinf(number)) or (positive and number <= 0):
        wanted = ("positive" + (" and finite" if finite else "") if positive
                  else "a finite number" if finite else "a number")
        raise ValueError(f"{fn}: {arg} must be {either}{wanted}, got {number}")
    if low is not None and number < low:
        raise ValueError(f"{fn}: {arg} must be at least {low:g}, got {number:g}")
    if high is not None and number > high:
        raise ValueError(f"{fn}: {arg} must be at most {high:g}, got {number:g}")
    return number


def temperature(fn: str, value) -> float:
    """Positive, finite and within [1e-30, 1e30], so that 1 / temperature is a normal float32."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: temperature must be a real number, got {describe(value)}")
    number = _as_float(fn, "temperature", value)
    if not MIN_TEMPERATURE <= number <= MAX_TEMPERATURE:  # NaN fails too
        raise ValueError(f"{fn}: temperature must be positive and finite, within "
                         f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (kernels use 1 / temperature "
                         f"in float32), got {number}")
    return number


def logit_factors(fn: str, temperature: float, logit_scale: float,
                  softcap: float | None = None) -> None:
    """Every factor the kernels hold in float32 must lie within [1e-30, 1e30], as 1 / temperature
    does: ``logit_scale``, ``softcap`` and the quotients ``logit_scale / temperature`` (the
    kernels fold the scale into the temperature, and every backward multiplies by it) and
    ``softcap / temperature`` (the largest ``|z|``). Each argument alone may be in range and a
    quotient not: ``temperature=1e-30, logit_scale=1e10`` gave ``[-inf, nan]``. Takes the numbers
    ``temperature`` and ``real`` returned."""
    low, high = MIN_TEMPERATURE, MAX_TEMPERATURE
    slack = 1e-9  # 1e10 / 1e-20 is 1.0000000000000002e30 in float64: still the bound
    factors = {"logit_scale": logit_scale, "logit_scale / temperature": logit_scale / temperature}
    if softcap is not None:
        factors.update({"softcap": softcap, "softcap / temperature": softcap / temperature})
    for name, factor in factors.items():
        if not low * (1 - slack) <= factor <= high * (1 + slack):
            given = f"temperature={temperature:g}, logit_scale={logit_scale:g}" + (
                "" if softcap is None else f", softcap={softcap:g}")
            raise ValueError(f"{fn}: {name} must be within [{low:g}, {high:g}] (kernels hold it "
                             f"in float32), got {factor:g} ({given})")


def integer(fn: str, arg: str, value) -> int:
    """An integer (not bool, not a float) that fits in int64."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: {arg} must be an integer, got {describe(value)}")
    number = int(value)
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError(f"{fn}: {arg} must fit in int64, got {number}")
    return number


def boolean(fn: str, arg: str, value) -> bool:
    """A real ``bool`` (a string such as "no" is truthy, so it is refused rather than guessed)."""
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {arg} must be True or False, got {describe(value)}")
    return value


def choice(fn: str, arg: str, value, options: Sequence[str]) -> str:
    """One of the strings in ``options`` (TypeError for a non-string, ValueError for another)."""
    listed = ", ".join(map(repr, options))
    if not isinstance(value, str):
        raise TypeError(f"{fn}: {arg} must be one of {listed}, got {describe(value)}")
    if value not in options:
        raise ValueError(f"{fn}: {arg} must be one of {listed}, got {value!r}")
    return value
