"""Benchmark cases for token_logprobs: alignkern against the ways people compute it today.

Providers (each a function ``(logits, targets) -> log-probs``):
  alignkern          the default backend for the device (triton on GPU, the C++ kernel on CPU)
  alignkern-cuda     the CUDA kernel from csrc/cuda (GPU only)
  torch-eager        ``log_softmax(logits.float()).gather(targets)``
  torch-compile      ``torch.compile`` of the same
  trl-selective      a row loop in the style of TRL's ``selective_log_softmax``
  read-ceiling       ``logits.amax(-1)``: one plain read of the logits, the bandwidth ceiling
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import alignkern

from .report import CEILING

KERNEL = "token_logprobs"
PROVIDERS = ("alignkern", "alignkern-cuda", "torch-eager", "torch-compile", "trl-selective",
             CEILING)
GPU_ONLY = ("alignkern-cuda",)
SWEPT = ("V", "vocabulary size V")
Provider = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def torch_eager(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def trl_style_selective(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One sequence at a time: float32 logits use logsumexp, 16-bit logits log_softmax per row."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    rows = [
        torch.log_softmax(row, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        for row, ids in zip(logits, targets)
    ]
    return torch.stack(rows).float()


def read_ceiling(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.amax(-1)


def _with_backend(name: str) -> Provider:
    def run(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with alignkern.use_backend(name):
            return alignkern.token_logprobs(logits, targets)

    return run


def providers(device: torch.device) -> dict[str, Provider | str]:
    """Provider name -> function, or a string saying why it is missing here."""
    found: dict[str, Provider | str] = {"alignkern": alignkern.token_logprobs}
    if device.type == "cuda":
        reason = alignkern._backend.unavailable_reason("cuda", device)
        found["alignkern-cuda"] = _with_backend("cuda") if reason is None else f"missing: {reason}"
    found["torch-eager"] = torch_eager
    found["torch-compile"] = torch.compile(torch_eager, dynamic=False)
    found["trl-selective"] = trl_style_selective
    found[CEILING] = read_ceiling
    return found


@dataclass(frozen=True)
class Case:
    batch: int  # sequences
    seq: int  # positions per sequence; rows = batch * seq
    vocab: int
    dtype: torch.dtype

    @property
    def rows(self) -> int:
        return self.batch * self.seq

    @property
    def x(self) -> int:
        return self.vocab

    @property
    def label(self) -> str:
        return f"N={self.rows} V={self.vocab} {str(self.dtype).removeprefix('torch.')}"

    def make_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.randn(self.batch, self.seq, self.vocab, device=device, dtype=self.dtype)
        targets = torch.randint(0, self.vocab, (self.batch, self.seq), device=device)
        return logits, targets

    def bytes_moved(self, mode: str) -> int:
        """Compulsory traffic: read the logits forward; read them again and write the gradient
        backward."""
        logits = self.rows * self.vocab * torch.finfo(self.dtype).bits // 8
        return logits if mode == "fwd" else 3 * logits

    def flops(self, mode: str) -> int:
        return 0  # memory-bound: reported in GB/s


GPU_VOCABS = (32000, 128256, 151936, 262144)


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        vocabs = GPU_VOCABS[:2] if quick else GPU_VOCABS
        return [Case(8, 1024, v, torch.bfloat16) for v in vocabs]
    if quick:
        return [Case(2, 32, 32000, torch.float32)]
    return [
        Case(4, 64, v, dtype) for dtype in (torch.float32, torch.bfloat16) for v in (32000, 128256)
    ]


def default_cases(device: torch.device) -> list[Case]:
    """The CPU default run's representative case (the first of the full sweep)."""
    return [Case(4, 64, 32000, torch.float32)]


def runs(found: dict) -> list[tuple[str, str]]:
    """(mode, provider) pairs to measure: every provider in both modes, the read ceiling forward
    only (it has no backward)."""
    return [(mode, name) for mode in ("fwd", "fwd+bwd") for name in found
            if not (name == CEILING and mode != "fwd")]


def forward_fn(provider: Provider, logits: torch.Tensor, targets: torch.Tensor) -> Callable:
    return lambda: provider(logits, targets)


def forward_backward_fn(provider: Provider, logits: torch.Tensor, targets: torch.Tensor) -> Callable:
    x = logits.detach().requires_grad_(True)
    grad_out = None

    def step():
        nonlocal grad_out
        out = provider(x, targets)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        return torch.autograd.grad(out, x, grad_out)

    return step
