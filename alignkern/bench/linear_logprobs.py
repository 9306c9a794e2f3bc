"""Benchmark cases for linear_logprobs: log-probs of K tokens per row straight from hidden states.

Providers (each a function ``(hidden, weight, targets) -> log-probs (N, K)``):
  alignkern          the default backend for the device (triton on GPU, chunked BLAS on CPU)
  alignkern-cuda     the tensor-core CUDA forward (GPU only; its backward is the Triton path)
  torch-eager        ``log_softmax((hidden @ weight.T).float()).gather(targets)``
  torch-compile      ``torch.compile`` of the same
  cut-cross-entropy  ``-linear_cross_entropy(..., reduction="none")``, once per target column
  liger              Liger's fused linear cross-entropy with ``reduction="none"``, once per column
  trl-chunked        TRL's fused LM head kernel (``trl.kernels.ChunkedLogProbFunction``: cuBLAS tiles
                     and a Triton fold on GPU, torch tiles on CPU), log-probs only, once per column,
                     with the vocabulary chunk TRL's trainers use
  matmul-floor       the bare ``hidden @ weight.T`` (forward) and its two backward GEMMs: the floor
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import alignkern

from .report import FLOOR

KERNEL = "linear_logprobs"
PROVIDERS = ("alignkern", "alignkern-cuda", "torch-eager", "torch-compile", "cut-cross-entropy",
             "liger", "trl-chunked", FLOOR)
GPU_ONLY = ("alignkern-cuda", "cut-cross-entropy", "liger")
SWEPT = ("V", "vocabulary size V")
Provider = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def torch_eager(hidden, weight, targets):
    logprobs = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    return logprobs.gather(-1, targets)


def matmul_floor(hidden, weight, targets):
    return hidden @ weight.T


def _per_column(nll_fn) -> Provider:
    """Peers that take one target per row: call them once per target column."""

    def run(hidden, weight, targets):
        return torch.stack([-nll_fn(hidden, weight, targets[:, j]) for j in range(targets.shape[1])],
                           dim=-1)

    return run


def _cut_cross_entropy() -> Provider | str:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        return f"missing: cut-cross-entropy is not installed ({exc})"
    return _per_column(lambda h, w, t: linear_cross_entropy(h, w, t, reduction="none"))


def _liger() -> Provider | str:
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )
    except ImportError as exc:
        return f"missing: liger-kernel is not installed ({exc})"
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return _per_column(lambda h, w, t: loss(w, h, t))


def _trl_chunked() -> Provider | str:
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    except ImportError as exc:
        return f"missing: trl is not installed ({exc})"

    def run(hidden, weight, targets):
        # (hidden, weight, bias, targets, temperature, chunk, softcap, logit_scale, outputs)
        return torch.stack([ChunkedLogProbFunction.apply(hidden, weight, None, targets[:, j], 1.0,
                                                         _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                                         ())[0]
                            for j in range(targets.shape[1])], dim=-1)

    return run


def _with_backend(name: str) -> Provider:
    def run(hidden, weight, targets):
        with alignkern.use_backend(name):
            return alignkern.linear_logprobs(hidden, weight, targets)

    return run


def providers(device: torch.device) -> dict[str, Provider | str]:
    """Provider name -> function, or a string saying why it is missing here."""
    found: dict[str, Provider | str] = {"alignkern": alignkern.linear_logprobs}
    if device.type == "cuda":
        reason = alignkern._backend.unavailable_reason("cuda", device)
        found["alignkern-cuda"] = _with_backend("cuda") if reason is None else f"missing: {reason}"
    found["torch-eager"] = torch_eager
    found["torch-compile"] = torch.compile(torch_eager, dynamic=False)
    gpu_only = "missing: GPU-only (Triton kernels)"
    found["cut-cross-entropy"] = _cut_cross_entropy() if device.type == "cuda" else gpu_only
    found["liger"] = _liger() if device.type == "cuda" else gpu_only
    found["trl-chunked"] = _trl_chunked()
    found[FLOOR] = matmul_floor
    return found


@dataclass(frozen=True)
class Case:
    rows: int
    hidden: int
    vocab: int
    k: int
    dtype: torch.dtype

    @property
    def x(self) -> int:
        return self.vocab

    @property
    def label(self) -> str:
        return (f"N={self.rows} H={self.hidden} V={self.vocab} K={self.k} "
                f"{str(self.dtype).removeprefix('torch.')}")

    def make_inputs(self, device: torch.device):
        hidden = torch.randn(self.rows, self.hidden, device=device, dtype=self.dtype)
        weight = torch.randn(self.vocab, self.hidden, device=device, dtype=self.dtype)
        weight /= self.hidden**0.5
        targets = torch.randint(0, self.vocab, (self.rows, self.k), device=device)
        return hidden, weight, targets

    def flops(self, mode: str) -> int:
        """One (N, V, H) GEMM forward; the floor's three (forward, dhidden, dweight) with the
        backward. Kernels that recompute the logits do a fourth, which counts against them."""
        gemm = 2 * self.rows * self.vocab * self.hidden
        return gemm if mode == "fwd" else 3 * gemm

    def bytes_moved(self, mode: str) -> int:
        return 0  # compute-bound: reported in TFLOP/s


GPU_ROWS = (1024, 8192, 32768)
GPU_VOCABS = (32000, 128256, 151936, 262144)


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        if quick:
            return [Case(n, 4096, 128256, k, torch.bfloat16) for n in (1024, 8192) for k in (1, 4)]
        return [Case(n, 4096, v, k, torch.bfloat16)
                for n in GPU_ROWS for v in GPU_VOCABS for k in (1, 4)]
    if quick:
        return [Case(64, 128, 32000, 1, torch.float32)]
    return [Case(512, 256, v, k, torch.float32) for v in (32000, 128256) for k in (1, 4)]


def default_cases(device: torch.device) -> list[Case]:
    """The CPU default run's representative case: the full sweep's first vocabulary and K = 4, a
    quarter of its rows (so that the default run ends within 3 minutes on 2 cores)."""
    return [Case(128, 256, 32000, 4, torch.float32)]


def runs(found: dict) -> list[tuple[str, str]]:
    """(mode, provider) pairs to measure: every provider in both modes."""
    return [(mode, name) for mode in ("fwd", "fwd+bwd") for name in found]


def forward_fn(provider: Provider, hidden, weight, targets) -> Callable:
    return lambda: provider(hidden, weight, targets)


def forward_backward_fn(provider: Provider, hidden, weight, targets) -> Callable:
    leaves = (hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True))
    grad_out = None

    def step():
        nonlocal grad_out
        out = provider(*leaves, targets)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        return torch.autograd.grad(out, leaves, grad_out)

    return step
