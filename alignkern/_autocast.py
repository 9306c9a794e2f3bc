"""alignkern's one autocast policy, registered on every op.

Under ``torch.autocast`` (cpu or cuda), a registered op whose work is matrix products
(``linear_logprobs``, ``linear_kl``, ``reward_attention``) casts its floating-point operands —
the hidden states and LM heads, or q, k and v — to the autocast dtype once, at the op's boundary,
the way ``torch.matmul`` and SDPA are autocast; float64 tensors, biases, ranks and gradients are
left as they are. The op then runs with autocast off for that device: its kernels accumulate in
float32 from exactly those operands, and autograd saves exactly those operands, so the backward
differentiates the function the forward computed. The cast itself is recorded by autograd, so
gradients reach float32 parameters in float32. ``token_logprobs`` casts nothing (like
``log_softmax`` it reads its logits in float32). Backward ops cast nothing either; they only keep
autocast from reaching inside them when a backward pass runs inside an autocast region.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Keeps the registrations alive for the life of the process.
_LIBRARY = torch.library.Library("alignkern", "IMPL")
DEVICE_TYPES = ("cpu", "cuda")


def _autocast_key(device_type: str) -> torch._C.DispatchKey:
    return getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))


def register(name: str, cast: Sequence[str] = ()) -> None:
    """Register the policy for ``alignkern::<name>``: cast the floating-point tensor arguments
    named in ``cast`` (float64 excepted) to the autocast dtype, then run with autocast off."""
    overload = getattr(torch.ops.alignkern, name).default
    arguments = [argument.name for argument in overload._schema.arguments]
    unknown = set(cast) - set(arguments)
    if unknown:
        raise ValueError(f"alignkern::{name} has no argument(s) {sorted(unknown)}")
    positions = {arguments.index(arg) for arg in cast}
    for device_type in DEVICE_TYPES:
        key = _autocast_key(device_type)

        def kernel(_keyset, *args, _device_type=device_type, _key=key):
            dtype = torch.get_autocast_dtype(_device_type)
            args = tuple(
                _cast(value, _device_type, dtype) if index in positions else value
                for index, value in enumerate(args)
            )
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return overload(*args)

        _LIBRARY.impl(name, kernel, str(key).split(".")[-1], with_keyset=True)


def cast_operands(*values):
    """``values`` as the op's autocast kernel will see them: under ``torch.autocast`` for a
    tensor's device, its floating-point tensors (float64 excepted) in the autocast dtype, else
    unchanged. The public functions call this before validating, so that what they check (equal
    dtypes, say) is what the op will get; the cast is recorded by autograd like the op's own."""
    first = next((v for v in values if isinstance(v, torch.Tensor)), None)
    if first is None or first.device.type not in DEVICE_TYPES:
        return values
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return values
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(_cast(value, device_type, dtype) for value in values)


def _cast(value, device_type: str, dtype: torch.dtype):
    eligible = (isinstance(value, torch.Tensor) and value.is_floating_point()
                and value.device.type == device_type and value.dtype != torch.float64)
    return value.to(dtype) if eligible else value
