"""Scoring through an LM head sharded by FSDP2 (``fully_shard``), without gathering the head.

FSDP2 shards every parameter along dim 0 over its (1-D) device mesh; for an LM head
``weight (V, H)`` (and ``bias (V,)``) that is the vocabulary, so outside the module's own forward
the head is a ``DTensor`` with placement ``Shard(0)`` whose local tensor is a contiguous block of
rows ``[start, start + V_local)`` (``torch.chunk`` sizes: ``ceil(V / W)`` rows per rank, the last
ranks fewer; FSDP2's padding is not part of the local tensor). That is exactly the shard
convention of ``alignkern.distributed``, so the head is used where it lies:

* FSDP is data-parallel: each rank scores its own rows (``N_r`` hidden states and targets). The
  rows of all ranks are all-gathered (``sum_r N_r`` · H numbers, padded to the largest ``N_r``),
  scored vocabulary-parallel on the local head shard (``alignkern.distributed.linear_logprobs`` /
  ``self_eval_scores``: replicated results), and each rank keeps its own rows.
* Backward: the gradient of each rank's own rows is all-reduced (summed) first, so every rank
  differentiates ``sum_r loss_r`` through the replicated computation; the hidden states get their
  own rows of that gradient (which is ``d loss_r / d hidden_r``), the local head shard gets
  ``d sum_r loss_r / d shard`` divided by the mesh size: the mean over ranks, which is what
  FSDP2's reduce-scatter gives every other parameter (its default gradient divide factor). The
  head's ``.grad`` is a ``Shard(0)`` DTensor, as FSDP leaves it.

Every function here is a collective over the head's mesh: every rank calls it, in the same order,
and every rank backpropagates through it or none does (as with FSDP's own reduce-scatter).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import vocab_parallel as _vp

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - older torch has no public DTensor
    DTensor = Shard = None


class HeadShard(NamedTuple):
    """This rank's rows of a ``Shard(0)`` LM head, as ``alignkern.distributed`` takes them."""

    weight: torch.Tensor  # (V_local, H), differentiable into the DTensor parameter
    bias: torch.Tensor | None  # (V_local,) or None
    vocab_start: int
    vocab_size: int
    process_group: object
    world_size: int


def is_dtensor(tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _check_placement(fn: str, name: str, tensor, mesh=None):
    if tensor.device_mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
        raise NotImplementedError(
            f"{fn}: the LM head {name} is a DTensor with placements {tuple(tensor.placements)} on "
            f"a {tensor.device_mesh.ndim}-D mesh; only FSDP2's layout (Shard(0) on a 1-D mesh) is "
            "supported. Gather it (e.g. model.unshard() / full_tensor()) or reshard it first")
    if mesh is not None and tensor.device_mesh != mesh:
        raise NotImplementedError(f"{fn}: the LM head weight and bias are on different meshes")


def head_shard(fn: str, weight: torch.Tensor, bias: torch.Tensor | None) -> HeadShard:
    """This rank's shard of a DTensor head ``weight (V, H)`` / ``bias (V,)`` placed ``Shard(0)``
    on a 1-D mesh. The local tensors carry the gradient scale described in the module doc."""
    _check_placement(fn, "weight", weight)
    mesh = weight.device_mesh
    if bias is not None:
        if not is_dtensor(bias):
            raise NotImplementedError(f"{fn}: the LM head weight is a DTensor but its bias is not")
        _check_placement(fn, "bias", bias, mesh)
    vocab_size = weight.shape[0]
    world = mesh.size()
    if vocab_size < world:
        # Same on every rank (global shapes), so every rank raises: no collective is left hanging.
        raise ValueError(f"{fn}: a vocabulary of {vocab_size} ids sharded over {world} ranks "
                         "leaves some ranks without a shard; vocabulary-parallel scoring needs "
                         "one on every rank")
    coordinate = mesh.get_local_rank()
    chunk = math.ceil(vocab_size / world)
    start = min(coordinate * chunk, vocab_size)
    scale = 1.0 / world
    local_weight = _ScaleGrad.apply(weight.to_local(), scale)
    local_bias = None if bias is None else _ScaleGrad.apply(bias.to_local(), scale)
    if local_weight.shape[0] == 0 or start + local_weight.shape[0] > vocab_size:
        raise ValueError(f"{fn}: rank {coordinate}'s LM head shard has {local_weight.shape[0]} "
                         f"rows at {start}, not a torch.chunk shard of {vocab_size} ids over "
                         f"{world} ranks; vocabulary-parallel scoring needs one on every rank")
    return HeadShard(local_weight, local_bias, start, vocab_size, mesh.get_group(), world)


# ----------------------------------------------------------------------------- data parallel rows


def _row_counts(rows: int, device, group) -> list[int]:
    counts = [torch.zeros(1, dtype=torch.long, device=device)
              for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor([rows], dtype=torch.long, device=device), group=group)
    return [int(c) for c in counts]


def _gather_padded(x: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """Every rank's rows of ``x`` concatenated in rank order (not differentiable)."""
    longest = max(counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


class _GatherRows(torch.autograd.Function):
    """Forward: all ranks' rows. Backward: this rank's rows of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, x, counts, rank, group):
        ctx.offset, ctx.rows = sum(counts[:rank]), counts[rank]
        return _gather_padded(x, counts, group)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.offset:ctx.offset + ctx.rows], None, None, None


class _OwnRows(torch.autograd.Function):
    """Forward: this rank's rows of a replicated result. Backward: every rank's row gradients,
    summed, so that all ranks differentiate the sum of their losses."""

    @staticmethod
    def forward(ctx, x, counts, rank, group):
        ctx.offset, ctx.shape, ctx.group = sum(counts[:rank]), x.shape, group
        return x[ctx.offset:ctx.offset + counts[rank]].clone()

    @staticmethod
    def backward(ctx, grad):
        full = torch.zeros(ctx.shape, dtype=grad.dtype, device=grad.device)
        full[ctx.offset:ctx.offset + grad.shape[0]] = grad
        dist.all_reduce(full, group=ctx.group)
        return full, None, None, None


def _data_parallel(shard: HeadShard, hidden: torch.Tensor, per_row: list[torch.Tensor], score):
    """Gather every rank's rows, ``score(all_hidden, *all_per_row)`` (a replicated result whose
    leading dimension is the rows), and return this rank's rows of it."""
    group = shard.process_group
    rank = dist.get_rank(group)
    counts = _row_counts(hidden.shape[0], hidden.device, group)
    all_hidden = _GatherRows.apply(hidden, counts, rank, group)
    result = score(all_hidden, *[_gather_padded(t, counts, group) for t in per_row])
    if not result.requires_grad:
        offset = sum(counts[:rank])
        return result[offset:offset + counts[rank]].clone()
    return _OwnRows.apply(result, counts, rank, group)


def linear_logprobs(shard: HeadShard, hidden: torch.Tensor, targets: torch.Tensor, *,
                    temperature: float = 1.0, softcap: float | None = None,
                    logit_scale: float = 1.0) -> torch.Tensor:
    """``alignkern.linear_logprobs(hidden (N_r, H), full_head, targets (N_r,))`` for this rank's
    rows, computed on the local head shard. A collective over the head's mesh."""
    def score(all_hidden, all_targets):
        return _vp.linear_logprobs(all_hidden, shard.weight, all_targets, bias=shard.bias,
                                   vocab_start=shard.vocab_start, vocab_size=shard.vocab_size,
                                   process_group=shard.process_group, temperature=temperature,
                                   softcap=softcap, logit_scale=logit_scale)

    return _data_parallel(shard, hidden, [targets], score)


def self_eval_scores(shard: HeadShard, hidden: torch.Tensor, options: torch.Tensor,
                     values: torch.Tensor | None = None, *, temperature: float = 1.0,
                     softcap: float | None = None, logit_scale: float = 1.0):
    """``alignkern.self_eval_scores(hidden (N_r, H), full_head, options, values)`` for this rank's
    rows, on the local head shard. ``options``/``values`` must be the same on every rank. A
    collective over the head's mesh."""
    import alignkern

    def score(all_hidden):
        result = _vp.self_eval_scores(all_hidden, shard.weight, options, values, bias=shard.bias,
                                      vocab_start=shard.vocab_start, vocab_size=shard.vocab_size,
                                      process_group=shard.process_group,
                                      temperature=temperature, softcap=softcap,
                                      logit_scale=logit_scale)
        return torch.stack([result.score, result.mass], dim=-1)

    both = _data_parallel(shard, hidden, [], score)
    return alignkern.SelfEvalScores(both[..., 0], both[..., 1])
