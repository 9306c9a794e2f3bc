"""Benchmark cases for linear_logprobs with the entropy: what a GRPO step asks of the LM head.

One target per row, the log-probability and the entropy of the same distribution; fwd+bwd
differentiates both (random upstream gradients: the policy loss and an entropy bonus).

Providers (each ``(hidden, weight, targets (N,)) -> (logprobs (N,), entropy (N,))``):
  alignkern      ``alignkern.linear_logprobs(..., stats=("entropy",))``
  torch-eager    materialised float32 logits, ``log_softmax``, gather and ``-(p * log p).sum``
  torch-compile  ``torch.compile`` of the same
  trl-chunked    TRL's fused LM head (``ChunkedLogProbFunction``, ``outputs=("entropy",)``) with
                 the vocabulary chunk TRL's trainers use
  matmul-floor   the bare ``hidden @ weight.T`` (forward) and its two backward GEMMs
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import alignkern

from . import linear_logprobs as _plain
from .report import FLOOR

KERNEL = "linear_logprobs_entropy"
PROVIDERS = ("alignkern", "torch-eager", "torch-compile", "trl-chunked", FLOOR)
GPU_ONLY = ()
SWEPT = ("V", "vocabulary size V")


def alignkern_entropy(hidden, weight, targets):
    result = alignkern.linear_logprobs(hidden, weight, targets, stats=("entropy",))
    return result.logprobs, result.entropy


def torch_eager(hidden, weight, targets):
    log_p = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    return log_p.gather(-1, targets[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)


def matmul_floor(hidden, weight, targets):
    return (hidden @ weight.T,)


def _trl_chunked() -> Callable | str:
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    except ImportError as exc:
        return f"missing: trl is not installed ({exc})"

    def run(hidden, weight, targets):
        # (hidden, weight, bias, targets, temperature, chunk, softcap, logit_scale, outputs)
        logprobs, entropy, *_ = ChunkedLogProbFunction.apply(
            hidden, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
            ("entropy",))
        return logprobs, entropy

    return run


def providers(device: torch.device) -> dict:
    return {"alignkern": alignkern_entropy, "torch-eager": torch_eager,
            "torch-compile": torch.compile(torch_eager, dynamic=False),
            "trl-chunked": _trl_chunked(), FLOOR: matmul_floor}


@dataclass(frozen=True)
class Case(_plain.Case):
    """linear_logprobs' case with one target per row (``k`` = 1)."""

    @property
    def label(self) -> str:
        return (f"N={self.rows} H={self.hidden} V={self.vocab} "
                f"{str(self.dtype).removeprefix('torch.')}")

    def make_inputs(self, device: torch.device):
        hidden, weight, targets = super().make_inputs(device)
        return hidden, weight, targets[:, 0]


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        rows = (1024,) if quick else (1024, 8192)
        return [Case(n, 4096, v, 1, torch.bfloat16) for n in rows for v in (128256, 151936)]
    if quick:
        return [Case(64, 128, 32000, 1, torch.float32)]
    # float32 only: this VM has no bf16 FMA units, and the peers' bf16 backward GEMMs take minutes
    return [Case(512, 256, v, 1, torch.float32) for v in (32000, 128256)]


def default_cases(device: torch.device) -> list[Case]:
    """The CPU default run's one case (so that the default run ends within 3 minutes)."""
    return [Case(128, 256, 32000, 1, torch.float32)]


runs = _plain.runs


def forward_fn(provider, hidden, weight, targets) -> Callable:
    return lambda: provider(hidden, weight, targets)


def forward_backward_fn(provider, hidden, weight, targets) -> Callable:
    leaves = (hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True))
    upstream = None

    def step():
        nonlocal upstream
        outputs = provider(*leaves, targets)
        if upstream is None:
            upstream = tuple(torch.randn_like(out) for out in outputs)
        return torch.autograd.grad(outputs, leaves, upstream)

    return step
