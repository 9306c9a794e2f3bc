"""Benchmark cases for linear_kl: per-token KL(pi || pi_ref) from two hidden states and heads.

Providers (each ``(hidden, weight, ref_hidden, ref_weight) -> kl (N,)``):
  alignkern      ``alignkern.losses.linear_kl`` (one fused pass, no logits)
  torch-eager    two materialised float32 ``log_softmax``es and the sum
  torch-compile  ``torch.compile`` of the same
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import losses

KERNEL = "linear_kl"
PROVIDERS = ("alignkern", "torch-eager", "torch-compile")
GPU_ONLY = ()
SWEPT = ("V", "vocabulary size V")


def torch_eager(hidden, weight, ref_hidden, ref_weight):
    log_p = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    log_q = torch.log_softmax((ref_hidden @ ref_weight.T).float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def providers(device: torch.device) -> dict:
    return {"alignkern": losses.linear_kl, "torch-eager": torch_eager,
            "torch-compile": torch.compile(torch_eager, dynamic=False)}


@dataclass(frozen=True)
class Case:
    rows: int
    hidden: int
    vocab: int
    dtype: torch.dtype

    @property
    def x(self) -> int:
        return self.vocab

    @property
    def label(self) -> str:
        return f"N={self.rows} H={self.hidden} V={self.vocab} {str(self.dtype).removeprefix('torch.')}"

    def make_inputs(self, device: torch.device):
        def head():
            return torch.randn(self.vocab, self.hidden, device=device, dtype=self.dtype) / 8

        hidden, ref_hidden = (torch.randn(self.rows, self.hidden, device=device, dtype=self.dtype)
                              for _ in range(2))
        return hidden, head(), ref_hidden, head()

    def flops(self, mode: str) -> int:
        gemm = 2 * self.rows * self.vocab * self.hidden
        return 2 * gemm if mode == "fwd" else 4 * gemm  # policy + reference, then dh and dW

    def bytes_moved(self, mode: str) -> int:
        return 0

    def items(self, mode: str) -> tuple[int, str]:
        """Per-token KL terms per second."""
        return self.rows, "tokens"


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        rows = (4096,) if quick else (4096, 16384)
        return [Case(n, 4096, 128256, torch.bfloat16) for n in rows]
    if quick:
        return [Case(64, 64, 8000, torch.float32)]
    return [Case(512, 256, 32000, torch.float32)]


def default_cases(device: torch.device) -> list[Case]:
    """The CPU default run's representative case: an eighth of the full sweep's rows (two heads'
    GEMMs forward and backward make it the slowest family on a CPU)."""
    return [Case(64, 256, 32000, torch.float32)]


def runs(found: dict) -> list[tuple[str, str]]:
    return [(mode, name) for mode in ("fwd", "fwd+bwd") for name in found]


def forward_fn(provider, *inputs):
    return lambda: provider(*inputs)


def forward_backward_fn(provider, hidden, weight, ref_hidden, ref_weight):
    leaves = (hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True))
    grad_out = None

    def step():
        nonlocal grad_out
        out = provider(*leaves, ref_hidden, ref_weight)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        return torch.autograd.grad(out, leaves, grad_out)

    return step
