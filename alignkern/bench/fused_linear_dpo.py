"""Benchmark cases for fused_linear_dpo_loss: one DPO training step (forward+backward) from hidden
states, the reference log-likelihoods precomputed.

Providers (each ``(hidden, weight, targets, mask, ref_logps) -> loss``):
  alignkern        ``alignkern.losses.fused_linear_dpo_loss`` (sequence_logprobs, no logits)
  torch-unfused    ``hidden @ weight.T`` → float32 ``log_softmax`` → gather → masked sum → DPO
  liger            Liger's ``LigerFusedLinearDPOLoss`` where installed
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import losses

KERNEL = "fused_linear_dpo_loss"
PROVIDERS = ("alignkern", "torch-unfused", "liger")
GPU_ONLY = ("liger",)
SWEPT = ("B*T", "tokens B*T")


def alignkern_dpo(hidden, weight, targets, mask, ref_logps):
    return losses.fused_linear_dpo_loss(hidden, weight, targets, mask, ref_logps=ref_logps).loss


def torch_unfused(hidden, weight, targets, mask, ref_logps):
    logprobs = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    sequence = (picked * mask).sum(-1)
    half = hidden.shape[0] // 2
    h = (sequence[:half] - ref_logps[:half]) - (sequence[half:] - ref_logps[half:])
    return -F.logsigmoid(0.1 * h).mean()


def _liger(device: torch.device):
    if device.type != "cuda":
        return "missing: GPU-only (Triton kernels)"
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError as exc:
        return f"missing: liger-kernel is not installed ({exc})"
    loss = LigerFusedLinearDPOLoss(beta=0.1)

    def run(hidden, weight, targets, mask, ref_logps):
        labels = targets.masked_fill(~mask, -100)
        half = hidden.shape[0] // 2
        return loss(weight, hidden, labels, ref_chosen_logps=ref_logps[:half],
                    ref_rejected_logps=ref_logps[half:])[0]

    return run


def providers(device: torch.device) -> dict:
    return {"alignkern": alignkern_dpo, "torch-unfused": torch_unfused, "liger": _liger(device)}


@dataclass(frozen=True)
class Case:
    pairs: int
    length: int
    hidden: int
    vocab: int
    dtype: torch.dtype

    @property
    def x(self) -> int:
        return 2 * self.pairs * self.length

    @property
    def label(self) -> str:
        return (f"B*T={self.x} H={self.hidden} V={self.vocab} "
                f"{str(self.dtype).removeprefix('torch.')}")

    def make_inputs(self, device: torch.device):
        rows = 2 * self.pairs
        hidden = torch.randn(rows, self.length, self.hidden, device=device, dtype=self.dtype)
        weight = torch.randn(self.vocab, self.hidden, device=device, dtype=self.dtype)
        weight /= self.hidden**0.5
        targets = torch.randint(0, self.vocab, (rows, self.length), device=device)
        mask = torch.rand(rows, self.length, device=device) > 0.1
        ref_logps = -torch.rand(rows, device=device) * self.length * 5
        return hidden, weight, targets, mask, ref_logps

    def flops(self, mode: str) -> int:
        return 3 * 2 * self.x * self.vocab * self.hidden  # the three GEMMs of the LM head

    def items(self, mode: str) -> tuple[int, str]:
        """A training step's throughput: tokens (chosen and rejected) per second."""
        return self.x, "tokens"

    def bytes_moved(self, mode: str) -> int:
        return 0


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        tokens = (8192,) if quick else (8192, 16384, 32768)
        return [Case(n // 2048, 1024, 4096, 128256, torch.bfloat16) for n in tokens]
    if quick:
        return [Case(2, 16, 64, 8000, torch.float32)]
    return [Case(4, 64, 256, 32000, torch.float32)]


def default_cases(device: torch.device) -> list[Case]:
    """The CPU default run's representative case: half the full sweep's tokens."""
    return [Case(2, 64, 256, 32000, torch.float32)]


def runs(found: dict) -> list[tuple[str, str]]:
    return [("fwd+bwd", name) for name in found]  # a training step


def forward_fn(provider, *inputs):
    return lambda: provider(*inputs)


def forward_backward_fn(provider, hidden, weight, targets, mask, ref_logps):
    leaves = (hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True))

    def step():
        return torch.autograd.grad(provider(*leaves, targets, mask, ref_logps), leaves)

    return step
