"""Benchmark cases for reward_attention: a reward bias on the keys plus the reward-ordering mask.

Providers (each a function ``(q, k, v, bias, rank, causal) -> out``):
  alignkern             the default backend (triton on GPU, the C++ kernels on CPU)
  alignkern-cuda        the tensor-core CUDA forward (GPU only; its backward is the Triton path)
  flex-attention        FlexAttention, bias as ``score_mod`` and ranks/causal as ``mask_mod``,
                        the block mask built once outside the timed step
  flex-with-mask-build  the same, building the block mask inside the step (a new batch of rewards
                        needs a new block mask)
  sdpa-float-mask       ``scaled_dot_product_attention`` with a materialised (B, 1, L, L) float mask
  flash-ceiling         SDPA with no bias and no rank mask (flash on GPU): the speed ceiling
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import alignkern

from .report import FLASH

KERNEL = "reward_attention"
PROVIDERS = ("alignkern", "alignkern-cuda", "flex-attention", "flex-with-mask-build",
             "sdpa-float-mask", FLASH)
GPU_ONLY = ("alignkern-cuda",)
SWEPT = ("L", "sequence length L")


def _alignkern(backend: str | None):
    def run(q, k, v, bias, rank, causal):
        kwargs = dict(key_bias=bias, key_rank=rank, query_rank=rank, causal=causal)
        if backend is None:
            return alignkern.reward_attention(q, k, v, **kwargs)
        with alignkern.use_backend(backend):
            return alignkern.reward_attention(q, k, v, **kwargs)

    return run


def _float_mask(bias, rank, causal, length):
    visible = rank[:, None, :] <= rank[:, :, None]  # (B, Lq, Lk): key rank <= query rank
    if causal:
        visible = visible & torch.ones(length, length, dtype=torch.bool, device=bias.device).tril()
    mask = torch.where(visible, bias[:, None, :].float(), float("-inf"))
    return mask[:, None].to(bias.dtype)


def sdpa_float_mask(q, k, v, bias, rank, causal):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_float_mask(bias, rank, causal,
                                                                         q.shape[2]))


def flash_ceiling(q, k, v, bias, rank, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _flex(device: torch.device, with_mask_build: bool):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        return f"missing: FlexAttention is not available in this torch ({exc})"
    compiled = torch.compile(flex_attention, dynamic=False)
    cache: dict = {}

    def block_mask_for(rank, causal, length):
        def mask_mod(b, h, q_idx, kv_idx):
            visible = rank[b, kv_idx] <= rank[b, q_idx]
            return visible & (kv_idx <= q_idx) if causal else visible

        return create_block_mask(mask_mod, rank.shape[0], None, length, length,
                                 device=str(device))

    def run(q, k, v, bias, rank, causal):
        key = (rank.data_ptr(), causal)
        if with_mask_build or key not in cache:
            cache[key] = block_mask_for(rank, causal, q.shape[2])

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, kv_idx]

        return compiled(q, k, v, score_mod=score_mod, block_mask=cache[key])

    return run


def providers(device: torch.device) -> dict:
    """Provider name -> function, or a string saying why it is missing here."""
    found: dict = {"alignkern": _alignkern(None)}
    if device.type == "cuda":
        reason = alignkern._backend.unavailable_reason("cuda", device)
        found["alignkern-cuda"] = _alignkern("cuda") if reason is None else f"missing: {reason}"
    found["flex-attention"] = _flex(device, with_mask_build=False)
    found["flex-with-mask-build"] = _flex(device, with_mask_build=True)
    found["sdpa-float-mask"] = sdpa_float_mask
    found[FLASH] = flash_ceiling
    return found


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    length: int
    head_dim: int
    causal: bool
    dtype: torch.dtype

    @property
    def x(self) -> int:
        return self.length

    @property
    def label(self) -> str:
        return (f"B={self.batch} H={self.heads} L={self.length} D={self.head_dim} "
                f"{'causal' if self.causal else 'full'} {str(self.dtype).removeprefix('torch.')}")

    def make_inputs(self, device: torch.device):
        shape = (self.batch, self.heads, self.length, self.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=self.dtype) for _ in range(3))
        bias = torch.randn(self.batch, self.length, device=device, dtype=self.dtype)
        rank = torch.randint(0, 8, (self.batch, self.length), device=device).float()
        return q, k, v, bias, rank, self.causal

    def flops(self, mode: str) -> int:
        """FlashAttention's convention: 4 B H L^2 D forward (half when causal), backward 2.5x."""
        forward = 4 * self.batch * self.heads * self.length**2 * self.head_dim
        forward //= 2 if self.causal else 1
        return forward if mode == "fwd" else int(3.5 * forward)

    def bytes_moved(self, mode: str) -> int:
        return 0  # compute-bound: reported in TFLOP/s


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        tokens = 16384
        lengths = (512, 2048) if quick else (512, 2048, 8192)
        dims = (64,) if quick else (64, 128)
        return [Case(tokens // length, 16, length, d, causal, torch.bfloat16)
                for length in lengths for d in dims for causal in (False, True)]
    if quick:
        return [Case(1, 2, 128, 64, True, torch.float32)]
    return [Case(1, 4, length, 64, causal, torch.float32)
            for length in (512, 1024) for causal in (False, True)]


def default_cases(device: torch.device) -> list[Case]:
    """The CPU default run's representative case: causal, L = 1024 (from the full sweep)."""
    return [Case(1, 4, 1024, 64, True, torch.float32)]


def runs(found: dict) -> list[tuple[str, str]]:
    return [(mode, name) for mode in ("fwd", "fwd+bwd") for name in found]


def forward_fn(provider: Callable, q, k, v, bias, rank, causal) -> Callable:
    return lambda: provider(q, k, v, bias, rank, causal)


def forward_backward_fn(provider: Callable, q, k, v, bias, rank, causal) -> Callable:
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v, bias)]
    grad_out = torch.randn_like(q)

    def step():
        out = provider(*leaves, rank, causal)
        return torch.autograd.grad(out, leaves, grad_out, allow_unused=True)

    return step
