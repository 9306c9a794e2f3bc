"""Vocabulary-parallel scoring over ``torch.distributed``, composed from alignkern's public ops.

Shard convention
----------------
Every rank of ``process_group`` (``None``: the default group) holds one contiguous, non-empty
shard ``[vocab_start, vocab_start + V_local)`` of a vocabulary of ``V`` ids: the last dimension of
its logits shard (``token_logprobs``) or the rows of its LM-head shard ``weight (V_local, H)`` and
``bias (V_local,)`` (``linear_logprobs`` and the functions built on it). Together the shards must
tile ``[0, V)`` exactly, with no gap and no overlap. ``vocab_start=None`` (on every rank) means
"rank order is shard order": rank ``r`` of the group starts where rank ``r - 1`` ends, as in
Megatron's ``VocabUtility`` (shards may be uneven). ``vocab_size`` (optional, the full ``V``)
is checked against the shards when given. Hidden states, targets, options, masks and the scalar
settings must be the same on every rank; results are the same on every rank (replicated).

Replicated inputs: checked only while validating
------------------------------------------------
Vocabulary parallelism is only right when every rank holds the SAME hidden states (and targets,
mask, ...): each rank scores its shard of the vocabulary for the rows it holds, and the shards'
partial sums are added. Ranks that hold different rows (a data-parallel batch split handed to a
tensor-parallel function, a rank that ran dropout with another seed) would silently give numbers
that are no one's log-probabilities. So, with ``ALIGNKERN_VALIDATE`` unset or not ``0``, the setup
exchange carries an exact checksum of the bytes of the replicated tensors (``hidden``; for
``linear_kl`` also ``ref_hidden`` and ``mask``; the targets have their own), computed on their
device, and ranks that disagree raise ``ValueError`` naming them on every rank.
**With ``ALIGNKERN_VALIDATE=0`` nothing is compared between ranks: not the hidden states, not the
targets, not the shapes, the settings or the tiling of the shards; differing inputs then give
wrong numbers without an error.**

Errors on one rank, every rank raises
-------------------------------------
Each rank runs its own argument checks and resolves its backend (``use_backend``,
``ALIGNKERN_BACKEND``, the device's default) BEFORE the setup exchange, and the exchange carries
the outcome: if any rank failed, the failing rank raises its own error (for a backend that cannot
run there: a ``RuntimeError``, or ``ValueError`` for an unknown ``ALIGNKERN_BACKEND``, naming the
function and the rank) and every other rank a ``RuntimeError`` naming that rank (and the backend
asked for there), so no rank is left waiting in a collective. A target id outside ``[0, V)`` that
is not ``ignore_index`` is an ``IndexError`` on every rank; with ``ALIGNKERN_VALIDATE=0`` it gives
NaN in its own element (and NaN gradients in its row), as the single-process op does.

What is communicated, per call with N rows and K targets per row
----------------------------------------------------------------
* one all-gather of ``SETUP_FIELDS`` (16) int64 per rank: whether the rank's own checks passed
  and its backend can run, shard sizes/starts, shapes, dtypes, settings, a summary of the targets
  and, while validating, a checksum of the replicated tensors (one read of their bytes on their
  device, no extra sync), so that a bad setup raises the same error on every rank instead of
  hanging in a collective. It is skipped only when
  ``ALIGNKERN_VALIDATE=0`` and both ``vocab_start`` and ``vocab_size`` are given (on every rank):
  each rank then knows its shard and ``V`` without asking, checks nothing across ranks, and a rank
  whose own checks or backend fail raises alone while the others wait in their next collective
  until the group's timeout (``shard_layout`` checks a layout once, as a collective);
* forward: an all-reduce (max) of N numbers (each shard's row maximum), then one all-reduce (sum)
  of N·(K + 1) numbers (the rescaled sum-exp of each shard and the target logits, each owned by
  exactly one rank, zero elsewhere). The ``(N, V)`` logits are never gathered.
* backward: nothing for ``token_logprobs`` (each rank's ``dlogits`` is local); for the
  ``linear_*`` functions one all-reduce (sum) of ``dhidden`` (N·H numbers), so that every rank
  gets the full gradient of the replicated hidden states (Megatron's "copy to tensor-parallel
  region"). ``dweight``/``dbias`` stay local to their shard.
* ``linear_kl`` (no targets): forward an all-reduce (max) of 2·N numbers and one all-reduce (sum)
  of 3·N; backward the all-reduce of ``dhidden`` above. One pass over the shard each way, like the
  single-process op (see ``_ShardedKL``).

Autograd: ``_ReduceFromShards`` (forward all-reduce sum, backward identity) combines per-rank
partial values into a replicated one; ``_CopyToShards`` (forward identity, backward all-reduce
sum) marks the replicated hidden states entering the per-rank computation. Partial values are
computed from rank-local tensors only (the global maximum used for rescaling is a constant, so
it carries no gradient), which makes the identity backward exact.

torch.compile: values and gradients are right under ``torch.compile`` (checked on 2 gloo ranks),
but the graph breaks at each ``torch.distributed`` collective (``dist.all_reduce`` in the
autograd Functions: three in the forward) and at the setup exchange (``.tolist()`` of the
gathered table); the single-process registered ops between the breaks are compiled as usual.
The process group is a Python object handed to the Functions, never to a registered op.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist

import alignkern

from .. import _autocast, _backend, _checks
from .. import losses as _losses
from ..ops import scoring as _scoring
from ..ops import token_logprobs as _tokens

_LOCAL_IGNORE = -1  # the ignore_index handed to the single-process op: never a local id
_NO_IGNORED_ID = _checks.INT64_MIN  # what the option functions use: no option is ignored


class ShardLayout(NamedTuple):
    """This rank's place in a vocabulary-parallel group."""

    vocab_start: int
    vocab_local: int
    vocab_size: int
    rank: int
    world_size: int


# ----------------------------------------------------------------------------- autograd pieces


class _ReduceFromShards(torch.autograd.Function):
    """All-reduce (sum) of per-rank partial values; the backward is the identity, since every
    rank computes the same loss from the replicated sum."""

    @staticmethod
    def forward(ctx, partial, group):
        total = partial.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToShards(torch.autograd.Function):
    """Identity in the forward; the backward sums the per-rank gradients of a replicated input
    (each rank only sees the part of ``dhidden`` that comes through its vocabulary shard)."""

    @staticmethod
    def forward(ctx, value, group):
        ctx.group = group
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total, None


def _all_reduce_max(value: torch.Tensor, group) -> torch.Tensor:
    out = value.detach().contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


def _all_reduce_sum(value: torch.Tensor, group) -> torch.Tensor:
    """The sum over ranks, in a fresh tensor (no gradient: inside an autograd Function)."""
    out = value.detach().contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


# ----------------------------------------------------------------------------- setup exchange


def _group_rank(fn: str, group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{fn}: torch.distributed is not initialised (call "
                           "torch.distributed.init_process_group first)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(f"{fn}: this process is not a member of process_group")
    return rank, dist.get_world_size(group)


def _validating() -> bool:
    return os.environ.get("ALIGNKERN_VALIDATE", "1") != "0"


def _skips_exchange(vocab_start, vocab_size) -> bool:
    """No setup exchange: ``ALIGNKERN_VALIDATE=0`` and both ``vocab_start`` and ``vocab_size``
    given, so that this rank knows its shard and ``V`` without asking the others."""
    return vocab_start is not None and vocab_size is not None and not _validating()


def _optional_int(fn: str, arg: str, value) -> int | None:
    return None if value is None else _checks.integer(fn, arg, value)


def _settings_code(*values) -> int:
    """A number equal on ranks whose settings (numbers, strings, None, shapes) are equal: a CRC
    of their ``repr``, which unlike ``hash`` of a string is the same in every process."""
    return zlib.crc32(repr(values).encode())


def _targets_summary(targets: torch.Tensor | None, ignore_index: int | None) -> list[int]:
    """``[count, min, max, checksum]`` of the ids that are not ``ignore_index``."""
    if targets is None or targets.numel() == 0 or not _validating():
        return [0, 0, 0, 0]
    flat = targets.reshape(-1).to(torch.int64)
    weights = torch.arange(flat.numel(), device=flat.device) % 65521 + 1
    checksum = (flat * weights).sum()
    counted = flat if ignore_index is None else flat[flat != ignore_index]
    if counted.numel() == 0:
        return [0, 0, 0, int(checksum)]
    stats = torch.stack([counted.min(), counted.max(), checksum]).tolist()
    return [counted.numel(), *stats]


_CHECKSUM_MODULUS = 65521  # the largest prime below 2**16
_CHECKSUM_CHUNK = 1 << 24  # bytes per step: bounds the int32 temporaries at 64 MiB each


def _replicated_checksum(tensors, device: torch.device) -> torch.Tensor:
    """``(2,)`` int64 on ``device``, computed there without a sync: the sum of the bytes of
    ``tensors`` (in order, each read as if contiguous; None skipped) and their sum weighted by
    position (``i mod 65521 + 1`` for byte ``i``). Exact integers, so ranks holding the same bits
    get the same two numbers whatever order their device sums in (a float sum would not promise
    that), with no overflow below 2**38 bytes. A change of any one byte changes the first number;
    bytes moved elsewhere (swapped rows) change the second, unless moved by a multiple of 65521."""
    total = torch.zeros(2, dtype=torch.int64, device=device)
    offset = 0
    for tensor in tensors:
        if tensor is None:
            continue
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        for begin in range(0, data.numel(), _CHECKSUM_CHUNK):
            chunk = data[begin:begin + _CHECKSUM_CHUNK].to(torch.int32)
            first = (offset + begin) % _CHECKSUM_MODULUS
            weights = torch.arange(first, first + chunk.numel(), dtype=torch.int32,
                                   device=chunk.device) % _CHECKSUM_MODULUS + 1
            total += torch.stack([chunk.sum(), (chunk * weights).sum()]).to(device)
        offset += data.numel()
    return total


class _Setup(NamedTuple):
    vocab_local: int
    vocab_start: int | None
    vocab_size: int | None
    rows: int
    k: int  # -1: no K dimension
    width: int  # H for the linear functions, -1 for token_logprobs
    dtype: torch.dtype | None
    shape_code: int
    settings_code: int
    targets: torch.Tensor | None
    ignore_index: int | None
    # the inputs every rank must hold identically, by argument name (checksummed when validating)
    replicated: dict | None = None
    # raises (TypeError, ValueError or RuntimeError) if this rank cannot run the op's backend
    check_backend: Callable[[], object] | None = None


# The columns of the exchanged table (one row of SETUP_FIELDS int64 per rank). vocab_size is
# compared through the settings code.
(_STATUS, _VOCAB_LOCAL, _START_GIVEN, _START, _ROWS, _K, _WIDTH, _DTYPE, _SHAPE, _SETTINGS,
 _ID_COUNT, _ID_MIN, _ID_MAX, _ID_CHECKSUM, _REPLICATED_SUM, _REPLICATED_WEIGHTED) = range(16)
SETUP_FIELDS = 16
# _STATUS: this rank's own checks passed, failed, or it cannot run its backend.
_OK, _INVALID_INPUTS, _NO_BACKEND = 1, 0, 2
# A failed rank sends no setup, only its status and, in this column, the backend asked for
# there: its index in BACKENDS, or one of the two codes below.
_BACKEND = _VOCAB_LOCAL
_DEFAULT_BACKEND, _UNKNOWN_BACKEND = -1, -2

_DTYPE_CODE = {None: -1, torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_FIELD_NAMES = {_ROWS: "the number of rows N", _K: "the number of targets per row K",
                _WIDTH: "the hidden size H", _DTYPE: "the dtype",
                _SHAPE: "the shape of the targets",
                _SETTINGS: "the scalar settings (temperature, softcap, logit_scale, ignore_index, "
                           "...)",
                _ID_CHECKSUM: "the target ids", _REPLICATED_SUM: "the hidden states"}
_SHOWN_FIELDS = (_ROWS, _K, _WIDTH)  # fields whose values the error message lists


def _requested_backend_code() -> int:
    try:
        name = _backend.requested_backend()
    except ValueError:
        return _UNKNOWN_BACKEND
    return _DEFAULT_BACKEND if name is None else _backend.BACKENDS.index(name)


def _backend_description(code: int) -> str:
    if code == _UNKNOWN_BACKEND:
        return "an unknown ALIGNKERN_BACKEND"
    if code == _DEFAULT_BACKEND:
        return "the default backend of its device"
    return repr(_backend.BACKENDS[code])


def _setup_row(local_error: BaseException | None, no_backend: bool, setup: _Setup | None,
               device: torch.device) -> torch.Tensor:
    """This rank's row of the table, on ``device``; the checksums stay on the device (no sync)."""
    row = [0] * SETUP_FIELDS
    if local_error is not None:
        row[_STATUS] = _NO_BACKEND if no_backend else _INVALID_INPUTS
        row[_BACKEND] = _requested_backend_code()
        return torch.tensor(row, dtype=torch.int64, device=device)
    row[:_REPLICATED_SUM] = [_OK, setup.vocab_local, int(setup.vocab_start is not None),
                             setup.vocab_start or 0, setup.rows, setup.k, setup.width,
                             _DTYPE_CODE[setup.dtype], setup.shape_code, setup.settings_code,
                             *_targets_summary(setup.targets, setup.ignore_index)]
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    if setup.replicated and _validating():
        mine[_REPLICATED_SUM:_REPLICATED_WEIGHTED + 1] = _replicated_checksum(
            setup.replicated.values(), device)
    return mine


def _raise_for_failed_ranks(fn: str, table: list, local_error: BaseException | None) -> None:
    """A rank whose own checks failed raises its own error; the others say which rank failed
    and, for a backend, which one it was asked for."""
    failed = [r for r, row in enumerate(table) if row[_STATUS] != _OK]
    if not failed:
        return
    if local_error is not None:
        raise local_error
    no_backend = [r for r in failed if table[r][_STATUS] == _NO_BACKEND]
    invalid = [r for r in failed if r not in no_backend]
    reasons = []
    if invalid:
        reasons.append(f"rank(s) {invalid} of the process group were given invalid inputs")
    if no_backend:
        asked = ", ".join(f"rank {r}: {_backend_description(table[r][_BACKEND])}"
                          for r in no_backend)
        reasons.append(f"rank(s) {no_backend} of the process group cannot run the alignkern "
                       f"backend asked for there ({asked})")
    raise RuntimeError(f"{fn}: {' and '.join(reasons)} (see the error raised there); no rank "
                       "went on")


def _check_agreement(fn: str, table: list, setup: _Setup) -> None:
    """The shapes, dtypes, settings, target ids and replicated inputs must agree (the vocab_size
    field is checked with the tiling)."""
    columns = (_ROWS, _K, _WIDTH, _DTYPE, _SHAPE, _SETTINGS, _ID_CHECKSUM, _REPLICATED_SUM)
    for field in columns:
        width = 2 if field == _REPLICATED_SUM else 1
        values = [tuple(row[field:field + width]) for row in table]
        differing = [r for r in range(len(table)) if values[r] != values[0]]
        if not differing:
            continue
        what = _FIELD_NAMES[field]
        if field in _SHOWN_FIELDS:
            what += f" {[value[0] for value in values]}"
        if field == _REPLICATED_SUM:
            what += f" (a checksum of the bytes of {', '.join(setup.replicated)})"
        raise ValueError(f"{fn}: the ranks of the process group disagree on {what}: rank(s) "
                         f"{differing} differ from rank 0; every rank must pass the same "
                         "(replicated) inputs")


def _tiling(fn: str, table: list, setup: _Setup) -> tuple[list[int], list[int], int]:
    """``(starts, sizes, V)`` of the shards, by rank; the shards must tile ``[0, V)``."""
    world = len(table)
    sizes = [row[_VOCAB_LOCAL] for row in table]
    given = [row[_START_GIVEN] for row in table]
    if 0 < sum(given) < world:
        raise ValueError(f"{fn}: vocab_start was given on rank(s) "
                         f"{[r for r in range(world) if given[r]]} but not on the others; give it "
                         "on every rank or on none (None: rank order is shard order)")
    starts = [row[_START] for row in table] if given[0] else \
        [sum(sizes[:r]) for r in range(world)]
    shards = [(r, starts[r], sizes[r]) for r in range(world)]
    end = 0
    for r in sorted(range(world), key=lambda r: (starts[r], sizes[r])):
        if starts[r] != end:
            what = "a gap" if starts[r] > end else "an overlap"
            raise ValueError(
                f"{fn}: the vocabulary shards do not tile [0, V): there is {what} at id "
                f"{min(end, starts[r])} (shards as (rank, start, size): {shards})")
        end = starts[r] + sizes[r]
    # vocab_size is part of the settings code (compared above), so this rank's value serves.
    if setup.vocab_size is not None and setup.vocab_size != end:
        raise ValueError(f"{fn}: the vocabulary shards cover [0, {end}) but vocab_size is "
                         f"{setup.vocab_size} (shards as (rank, start, size): {shards})")
    return starts, sizes, end


def _check_id_range(fn: str, table: list, vocab: int, ignore_index: int | None) -> None:
    for row in table:
        count, low, high = row[_ID_COUNT], row[_ID_MIN], row[_ID_MAX]
        if count and (low < 0 or high >= vocab):
            bad = low if low < 0 else high
            allowed = "" if ignore_index is None else f" or ignore_index ({ignore_index})"
            raise IndexError(f"{fn}: target id {bad} is outside every vocabulary shard: ids must "
                             f"be in [0, {vocab}){allowed}")


def _exchange(fn: str, group, device: torch.device, local_error: BaseException | None,
              setup: _Setup | None, *, no_backend: bool = False) -> ShardLayout:
    """All-gather every rank's setup (one collective), check it identically on every rank, and
    return this rank's layout; raise the same error on every rank when anything is wrong (a rank
    whose own inputs were invalid, or that cannot run its backend (``no_backend``), raises its
    own error, the others say which rank failed)."""
    rank, world = _group_rank(fn, group)
    mine = _setup_row(local_error, no_backend, setup, device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).tolist()
    _raise_for_failed_ranks(fn, table, local_error)
    _check_agreement(fn, table, setup)
    starts, sizes, vocab = _tiling(fn, table, setup)
    _check_id_range(fn, table, vocab, setup.ignore_index)
    return ShardLayout(starts[rank], sizes[rank], vocab, rank, world)


def _backend_failure(fn: str, group, exc: Exception) -> Exception:
    """``exc`` (why the backend cannot run here) as the same kind of error, naming ``fn`` and
    this rank."""
    kind = next(k for k in (TypeError, ValueError, RuntimeError) if isinstance(exc, k))
    error = kind(f"{fn}: rank {_group_rank(fn, group)[0]} cannot run its alignkern backend: "
                 f"{exc}")
    error.__cause__ = exc
    return error


def _layout(fn: str, group, device, vocab_start, vocab_size, make_setup) -> ShardLayout:
    """Run the local checks (``make_setup`` returns a ``_Setup`` or raises) and resolve the
    backend, then the exchange, so that a failure of either on one rank raises on every rank.
    Without the exchange (``_skips_exchange``) a failure raises on this rank only."""
    local_error = None
    setup = None
    no_backend = False
    try:
        vocab_start = _optional_int(fn, "vocab_start", vocab_start)
        vocab_size = _optional_int(fn, "vocab_size", vocab_size)
        setup = make_setup(vocab_start, vocab_size)
        if setup.vocab_local <= 0:
            raise ValueError(f"{fn}: this rank's vocabulary shard is empty (every rank must hold "
                             "at least one id)")
        if vocab_start is not None and vocab_start < 0:
            raise ValueError(f"{fn}: vocab_start must be >= 0, got {vocab_start}")
    except (TypeError, ValueError, IndexError) as exc:
        local_error = exc
    if local_error is None and setup.check_backend is not None:
        try:
            setup.check_backend()
        except (TypeError, ValueError, RuntimeError) as exc:
            local_error, no_backend = _backend_failure(fn, group, exc), True
    if _skips_exchange(vocab_start, vocab_size):
        if local_error is not None:
            raise local_error
        rank, world = _group_rank(fn, group)
        return ShardLayout(vocab_start, setup.vocab_local, vocab_size, rank, world)
    return _exchange(fn, group, device, local_error, setup, no_backend=no_backend)


def shard_layout(vocab_local: int, *, vocab_start: int | None = None,
                 vocab_size: int | None = None, process_group=None) -> ShardLayout:
    """Check that the shards of ``process_group`` tile the vocabulary (a collective: call it on
    every rank) and return this rank's ``ShardLayout``; raises the same error on every rank."""
    fn = "shard_layout"

    def make(start, size):
        local = _checks.integer(fn, "vocab_local", vocab_local)
        return _Setup(local, start, size, 0, -1, -1, None, 0, _settings_code(size), None, None)

    device = _collective_device(process_group)
    return _exchange(fn, process_group, device, *_try(make, fn, vocab_start, vocab_size))


def _try(make, fn, vocab_start, vocab_size):
    try:
        return None, make(_optional_int(fn, "vocab_start", vocab_start),
                          _optional_int(fn, "vocab_size", vocab_size))
    except (TypeError, ValueError) as exc:
        return exc, None


def _checked_on_every_rank(fn: str, group, check, vocab_start, vocab_size) -> None:
    """Run a function's own argument checks; if they fail on this rank, still meet the other
    ranks at the setup exchange, so that every rank raises (none waits for the group timeout).
    Without the exchange (``_skips_exchange``: the other ranks will not come) raise here only."""
    try:
        check()
    except (TypeError, ValueError, IndexError) as exc:
        if _skips_exchange(vocab_start, vocab_size):
            raise
        _exchange(fn, group, _collective_device(group), exc, None)


def _collective_device(group) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- combination


def _localise(targets: torch.Tensor, layout: ShardLayout, ignore_index: int | None):
    """``(local_ids, owned, ignored)``: ids of this shard shifted to ``[0, V_local)``, every other
    slot ``_LOCAL_IGNORE``. An id outside the whole vocabulary ``[0, V)`` that is not
    ``ignore_index`` (only with ``ALIGNKERN_VALIDATE=0``: the exchange refuses it otherwise) is
    owned by every rank, as the local id ``V_local``, outside every shard: each shard's op gives
    NaN there and NaN gradients in its row, so the combined value and every shard's gradient are
    NaN as the single-process op gives on the full vocabulary."""
    ids = targets.to(torch.int64)
    ignored = torch.zeros_like(ids, dtype=torch.bool) if ignore_index is None \
        else ids == ignore_index
    shifted = ids - layout.vocab_start
    outside = ((ids < 0) | (ids >= layout.vocab_size)) & ~ignored
    inside = (shifted >= 0) & (shifted < layout.vocab_local) & ~ignored
    local_ids = torch.where(inside, shifted, torch.where(outside, layout.vocab_local,
                                                         _LOCAL_IGNORE))
    return local_ids, inside | outside, ignored


def _global_max(row_max: torch.Tensor, log_sum: torch.Tensor, group) -> torch.Tensor:
    """The largest of the ranks' row maxima (constants, no gradient) among the shards that hold
    some mass (``log_sum > -inf``); 0 where none does (``_logit_stats.merge_parts``' rule)."""
    top = _all_reduce_max(torch.where(log_sum > -math.inf, row_max.detach(), -math.inf), group)
    return torch.where(torch.isfinite(top), top, 0.0)


def _combine(local, owned, ignored, has_k: bool, group):
    """Global ``(logprobs, row_max, log_sum)`` from this shard's ``local`` op outputs: the
    log-probabilities ``(z_t - c_r) - l_r`` at the owned slots and the shard's log-sum-exp in two
    parts ``(c_r, l_r)`` (ops/token_logprobs.py). With ``C = max_r c_r`` (a constant) and
    ``d_r = (c_r - C) + l_r`` (small: a log-sum-exp is never formed as one float, whose rounding
    would lose every bit below the spacing of ``|z|``): ``S = sum_r exp(d_r)``, ``z_t - C =
    sum_r [owned] (local_logprobs + d_r)``, ``logprobs = (z_t - C) - log S`` and the row's
    ``lse = C + log S``. The gradient reaches each shard through ``local_logprobs`` and ``l_r``."""
    top = _global_max(local.row_max, local.log_sum, group)
    relative = (local.row_max - top) + local.log_sum
    shift = relative[..., None] if has_k else relative
    partial = torch.where(owned, local.logprobs + shift, 0.0)
    packed = torch.cat([torch.exp(relative)[..., None],
                        partial if has_k else partial[..., None]], dim=-1)
    total = _ReduceFromShards.apply(packed, group)
    log_s = torch.log(total[..., 0])
    target = total[..., 1:] if has_k else total[..., 1]
    logprobs = torch.where(ignored, 0.0, target - (log_s[..., None] if has_k else log_s))
    return logprobs, top, log_s


class _Local(NamedTuple):
    """One shard's op outputs: log-probabilities, the log-sum-exp's two parts, and the
    statistics (those not asked for are 0-element tensors)."""

    logprobs: torch.Tensor
    row_max: torch.Tensor
    log_sum: torch.Tensor
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    max_logits: torch.Tensor | None = None


def _local_linear(fn, hidden, weight, local_ids, bias, temperature, softcap, logit_scale,
                  group, stats=None) -> _Local:
    """This shard's ``linear_logprobs`` through the registered op (the public function would add
    the log-sum-exp's parts into one float), with ``hidden`` entering as replicated."""
    from ..ops import linear_logprobs as _linear_op

    with _tokens.ids_already_checked():
        outputs = _linear_op._call(fn, _CopyToShards.apply(hidden, group), weight, local_ids,
                                   bias, temperature, softcap, logit_scale, _LOCAL_IGNORE,
                                   check_ids=False, stats=stats)
    return _Local(*outputs[:-1])  # the kept logits stay with the op's autograd


# ----------------------------------------------------------------------------- public ops


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, vocab_start: int | None = None,
                   vocab_size: int | None = None, process_group=None, temperature: float = 1.0,
                   ignore_index: int = -100, return_lse: bool = False):
    """``alignkern.token_logprobs`` over a vocabulary split across ``process_group``.

    ``logits (..., V_local)`` is this rank's shard (ids ``[vocab_start, vocab_start + V_local)``);
    ``targets (...)`` or ``(..., K)`` holds global ids (or ``ignore_index``) and is the same on
    every rank. Returns what ``alignkern.token_logprobs`` returns on the full logits, on every
    rank; the gradient of each rank's logits shard is that shard of the full gradient (no
    communication in the backward). A collective: call it on every rank of the group.

    Every rank must pass the same ``targets`` and settings: the setup exchange compares them (and
    the shard layout, and whether each rank's backend can run) unless ``ALIGNKERN_VALIDATE=0``,
    which turns every cross-rank check off (see the module docstring). An id outside ``[0, V)``
    that is not ``ignore_index``: ``IndexError`` on every rank; NaN with ``ALIGNKERN_VALIDATE=0``.
    """
    fn = "token_logprobs"

    def make(start, size):
        temperature_, ignore = _tokens._check_inputs(fn, logits, targets, temperature,
                                                     ignore_index)
        has_k = targets.dim() == logits.dim()
        rows = math.prod(logits.shape[:-1])
        return _Setup(logits.shape[-1], start, size, rows,
                      targets.shape[-1] if has_k else -1, -1, logits.dtype,
                      _settings_code(*targets.shape),
                      _settings_code(temperature_, ignore, size, bool(return_lse)),
                      targets, ignore,
                      check_backend=lambda: _tokens._check_backend("auto", logits, fn))

    device = logits.device if isinstance(logits, torch.Tensor) else torch.device("cpu")
    layout = _layout(fn, process_group, device, vocab_start, vocab_size, make)
    local_ids, owned, ignored = _localise(targets, layout, ignore_index)
    backend = "auto" if torch.compiler.is_compiling() else _tokens._check_backend("auto", logits)
    with _tokens.ids_already_checked():
        local = _Local(*_tokens._token_logprobs_op(logits, local_ids, float(temperature),
                                                   _LOCAL_IGNORE, backend))
    logprobs, row_max, log_sum = _combine(local, owned, ignored, targets.dim() == logits.dim(),
                                          process_group)
    return alignkern.TokenLogprobs(logprobs, row_max + log_sum) if return_lse else logprobs


def _linear_setup(fn, hidden, weight, targets, bias, temperature, softcap, logit_scale,
                  ignore_index, extra=()):
    """The local checks of the linear functions (those of the single-process op, on this rank's
    shard); returns a ``make_setup`` for ``_layout``."""
    from ..ops import linear_logprobs as _linear

    def make(start, size):
        _, _, _, ignore = _linear._check_inputs(fn, hidden, weight, targets, bias, temperature,
                                                softcap, logit_scale,
                                                _NO_IGNORED_ID if ignore_index is None
                                                else ignore_index)
        has_k = targets.dim() == hidden.dim()
        return _Setup(weight.shape[0], start, size, math.prod(hidden.shape[:-1]),
                      targets.shape[-1] if has_k else -1, hidden.shape[-1], hidden.dtype,
                      _settings_code(*targets.shape),
                      _settings_code(float(temperature), softcap, float(logit_scale),
                                     ignore_index, size, bias is not None, *extra),
                      targets, None if ignore_index is None else ignore, {"hidden": hidden},
                      lambda: _linear._check_backend("auto", hidden, fn))

    return make


def _linear(fn, hidden, weight, targets, bias, temperature, softcap, logit_scale, ignore_index,
            vocab_start, vocab_size, process_group, extra=()):
    """``(logprobs, lse)`` of the linear functions; ``ignore_index=None``: no id is ignored."""
    make = _linear_setup(fn, hidden, weight, targets, bias, temperature, softcap, logit_scale,
                         ignore_index, extra)
    device = hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
    layout = _layout(fn, process_group, device, vocab_start, vocab_size, make)
    local_ids, owned, ignored = _localise(targets, layout, ignore_index)
    local = _local_linear(fn, hidden, weight, local_ids, bias, temperature, softcap, logit_scale,
                          process_group)
    logprobs, row_max, log_sum = _combine(local, owned, ignored, targets.dim() == hidden.dim(),
                                          process_group)
    return logprobs, row_max + log_sum


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: torch.Tensor | None = None, vocab_start: int | None = None,
                    vocab_size: int | None = None, process_group=None, temperature: float = 1.0,
                    softcap: float | None = None, logit_scale: float = 1.0,
                    ignore_index: int = -100, return_lse: bool = False,
                    stats: tuple[str, ...] | None = None):
    """``alignkern.linear_logprobs`` with the LM head split by vocabulary across ``process_group``.

    ``hidden (..., H)`` and ``targets`` (global ids) are the same on every rank; ``weight
    (V_local, H)`` and ``bias (V_local,)`` are this rank's rows ``[vocab_start, vocab_start +
    V_local)`` of the head. Returns what the single-process op returns on the full head, on every
    rank. Gradients: ``weight``/``bias`` get their shard of the full gradient (local);
    ``hidden`` gets the full gradient on every rank (one all-reduce of N·H numbers). A collective:
    call it on every rank of the group.

    **Every rank must hold the same ``hidden`` (and ``targets``)**: vocabulary parallelism scores
    one set of rows over the shards of the head, so ranks with different rows would give wrong
    numbers. The setup exchange compares an exact checksum of ``hidden`` (and the targets, shapes,
    settings and shard layout, and whether each rank's backend can run) and raises on every rank
    when they differ; ``ALIGNKERN_VALIDATE=0`` turns all of that off (see the module docstring).
    An id outside ``[0, V)`` that is not ``ignore_index``: ``IndexError`` on every rank; NaN with
    ``ALIGNKERN_VALIDATE=0``, as the single-process op gives.

    ``stats`` (the single-process op's statistics: entropy, log_sum_sq_probs, mean_logits,
    is_top1, max_logits) returns a ``LinearLogprobsStats`` of the full distribution, from each
    shard's statistics of the same local pass: one more all-reduce (max) of N·(1 + K) numbers and
    one (sum) of at most N·(5 + K); the entropy is differentiable (its gradient reaches the
    shards like the log-probabilities').
    """
    if stats is not None:
        return _linear_stats(hidden, weight, targets, bias, temperature, softcap, logit_scale,
                             ignore_index, vocab_start, vocab_size, process_group, stats)
    logprobs, lse = _linear("linear_logprobs", hidden, weight, targets, bias, temperature, softcap,
                            logit_scale, ignore_index, vocab_start, vocab_size, process_group,
                            (bool(return_lse),))
    return alignkern.LinearLogprobs(logprobs, lse) if return_lse else logprobs


def _linear_stats(hidden, weight, targets, bias, temperature, softcap, logit_scale, ignore_index,
                  vocab_start, vocab_size, group, stats):
    """``linear_logprobs(..., stats=...)`` over the shards. With the row's global log-sum-exp as
    the reference ``M = C + log S`` (``_combine``; a constant here) and each shard's
    ``e_r = lse_r - M = (c_r - C) + l_r - log S`` (never formed from one-float log-sum-exps) and
    ``a_r = exp(e_r)``: ``A = sum_r a_r``, entropy ``= sum_r a_r (H_r - e_r) / A + log A``,
    ``log sum p^2 = log sum_r exp(2 e_r + lss_r) - 2 log A``, mean ``= sum_r V_r mean_r / V``.
    The target is the first maximum where its shard says so locally (its ``z_t`` is then that
    shard's maximum), no shard before it reaches ``z_t`` and none after it exceeds it."""
    from ..ops import linear_logprobs as _linear_op

    fn = "linear_logprobs"
    checked = {}
    _checked_on_every_rank(fn, group, lambda: checked.update(
        stats=_linear_op._check_stats(fn, stats)), vocab_start, vocab_size)
    stats = checked["stats"]
    make = _linear_setup(fn, hidden, weight, targets, bias, temperature, softcap, logit_scale,
                         ignore_index, ("stats", *sorted(stats)))
    device = hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
    layout = _layout(fn, group, device, vocab_start, vocab_size, make)
    local_ids, owned, ignored = _localise(targets, layout, ignore_index)
    has_k = targets.dim() == hidden.dim()
    wanted = set(stats) | ({"is_top1", "max_logits"} if "is_top1" in stats else set())
    local = _local_linear(fn, hidden, weight, local_ids, bias, temperature, softcap, logit_scale,
                          group, frozenset(wanted))
    logprobs, top, log_s = _combine(local, owned, ignored, has_k, group)
    row_max = z_t = beaten = None
    if "is_top1" in wanted:
        # with a K dimension throughout: (..., K) slots
        as_slots = (lambda x: x) if has_k else (lambda x: x[..., None])
        row_max, z_t, beaten = _first_maximum(local.max_logits, as_slots(local.is_top1),
                                              as_slots(targets), as_slots(owned), layout, group)
    elif "max_logits" in wanted:
        row_max = _all_reduce_max(local.max_logits.detach(), group)
    relative = (local.row_max - top) + local.log_sum - log_s.detach()  # e_r
    a = torch.exp(relative)
    rows = {"a": a}
    if "entropy" in stats:
        rows["entropy"] = a * (local.entropy - relative)
    if "log_sum_sq_probs" in stats:
        rows["sq"] = torch.exp(2 * relative + local.log_sum_sq_probs)
    if "mean_logits" in stats:
        rows["mean"] = local.mean_logits * layout.vocab_local
        rows["vocab"] = torch.full_like(a, layout.vocab_local)
    total, beaten = _reduce_sums(rows, beaten, group)
    log_a = torch.log(total["a"])
    is_top1 = None
    if "is_top1" in stats:
        is_top1 = (z_t > -math.inf) & (beaten == 0)
        is_top1 = is_top1 if has_k else is_top1[..., 0]
    return alignkern.LinearLogprobsStats(
        logprobs, top + log_s,
        total["entropy"] / total["a"] + log_a if "entropy" in stats else None,
        (torch.log(total["sq"]) - 2 * log_a).detach() if "log_sum_sq_probs" in stats else None,
        (total["mean"] / total["vocab"]).detach() if "mean_logits" in stats else None,
        is_top1, row_max if "max_logits" in stats else None)


def _first_maximum(local_max, is_local_top1, targets, owned, layout, group):
    """``(max_logits (...), z_t (..., K), beaten (..., K))`` from this shard's maximum ``(...)``
    and, for ``targets`` ``(..., K)``, whether each is the shard's first maximum and ``owned`` by
    it: the row's maximum over all shards, the exact ``z_t`` of each target that is its own
    shard's first maximum (-inf for the others), and whether this shard beats it (reaches it from
    before the target's id, or exceeds it from after) as 0 or 1, to be summed."""
    shard_max = local_max.detach()[..., None]
    candidate = torch.where(is_local_top1 & owned, shard_max, -math.inf)
    packed = _all_reduce_max(torch.cat([shard_max, candidate], -1), group)
    z_t = packed[..., 1:]
    before = layout.vocab_start + layout.vocab_local <= targets.to(torch.int64)
    beaten = torch.where(before, shard_max >= z_t, shard_max > z_t) & ~owned
    return packed[..., 0], z_t, beaten.to(shard_max.dtype)


def _reduce_sums(rows: dict, slots: torch.Tensor | None, group):
    """One all-reduce (sum, identity backward) of named per-row values ``(...)`` and, if given,
    per-slot values ``(..., K)``; returns them summed, in the same form."""
    parts = [value[..., None] for value in rows.values()]
    total = _ReduceFromShards.apply(torch.cat(parts + ([] if slots is None else [slots]), -1),
                                    group)
    summed = dict(zip(rows, total[..., :len(rows)].unbind(-1)))
    return summed, None if slots is None else total[..., len(rows):]


def _options(fn, hidden, weight, options, bias, temperature, softcap, logit_scale, vocab_start,
             vocab_size, process_group):
    def check():
        _checks.tensor(fn, "options", options, dtypes=_checks.INDEX_DTYPES)
        if options.dim() != 1 or options.shape[0] == 0:
            raise ValueError(f"{fn}: options must be a non-empty 1-D tensor of K token ids, got "
                             f"shape {tuple(options.shape)}")
        _checks.tensor(fn, "hidden", hidden)

    _checked_on_every_rank(fn, process_group, check, vocab_start, vocab_size)
    targets = options.expand(*hidden.shape[:-1], options.shape[0])
    return _linear(fn, hidden, weight, targets, bias, temperature, softcap, logit_scale, None,
                   vocab_start, vocab_size, process_group)[0]


def option_logprobs(hidden: torch.Tensor, weight: torch.Tensor, options: torch.Tensor, *,
                    bias: torch.Tensor | None = None, vocab_start: int | None = None,
                    vocab_size: int | None = None, process_group=None, temperature: float = 1.0,
                    softcap: float | None = None, logit_scale: float = 1.0) -> torch.Tensor:
    """``alignkern.option_logprobs`` with a vocabulary-parallel head (see ``linear_logprobs``):
    ``(..., K)`` log-probabilities of the same ``options (K,)`` global ids at every row. The
    options may live on different ranks. ``hidden`` must be the same on every rank (checked, with
    the options, while validating; see ``linear_logprobs``). A collective."""
    return _options("option_logprobs", hidden, weight, options, bias, temperature, softcap,
                    logit_scale, vocab_start, vocab_size, process_group)


def self_eval_scores(hidden: torch.Tensor, weight: torch.Tensor, options: torch.Tensor,
                     values: torch.Tensor | None = None, *, bias: torch.Tensor | None = None,
                     vocab_start: int | None = None, vocab_size: int | None = None,
                     process_group=None, temperature: float = 1.0, softcap: float | None = None,
                     logit_scale: float = 1.0) -> alignkern.SelfEvalScores:
    """``alignkern.self_eval_scores`` with a vocabulary-parallel head (see ``linear_logprobs``);
    ``values`` defaults to ``(+1, -1)`` for K = 2, as there. ``hidden`` must be the same on every
    rank (checked, with the options, while validating; see ``linear_logprobs``). A collective."""
    fn = "self_eval_scores"

    def check():
        _checks.tensor(fn, "options", options, dtypes=_checks.INDEX_DTYPES)
        k = options.shape[0] if options.dim() == 1 else 0
        if values is None and k != 2:
            raise ValueError(f"{fn}: values must be given for K = {k} options (the default "
                             "(+1, -1) is defined for K = 2 only)")
        if values is not None:
            _checks.tensor(fn, "values", values)
            if values.is_complex() or values.dtype == torch.bool:
                raise TypeError(f"{fn}: values must be a real tensor, got {values.dtype}")
            _checks.shape(fn, "values", values, (k,), "one value per option")

    _checked_on_every_rank(fn, process_group, check, vocab_start, vocab_size)
    if values is None:
        values = torch.tensor([1.0, -1.0], device=options.device)
    logprobs = _options(fn, hidden, weight, options, bias, temperature, softcap, logit_scale,
                        vocab_start, vocab_size, process_group)
    p = torch.softmax(logprobs, dim=-1)
    score = (p * values.to(device=p.device, dtype=p.dtype)).sum(-1)
    return alignkern.SelfEvalScores(score, torch.logsumexp(logprobs, dim=-1).exp())


def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      mask: torch.Tensor | None = None, *, reduction: str = "sum",
                      bias: torch.Tensor | None = None, vocab_start: int | None = None,
                      vocab_size: int | None = None, process_group=None,
                      temperature: float = 1.0, softcap: float | None = None,
                      logit_scale: float = 1.0, ignore_index: int = -100) -> torch.Tensor:
    """``alignkern.sequence_logprobs`` with a vocabulary-parallel head (see ``linear_logprobs``):
    ``(B,)`` sum (or mean) of the log-probabilities of the counted targets. ``hidden``,
    ``targets`` and ``mask`` must be the same on every rank (checked while validating; see
    ``linear_logprobs``). A collective."""
    fn = "sequence_logprobs"

    def check():
        _scoring.check_sequence_arguments(fn, hidden, targets, mask, reduction, ignore_index)

    _checked_on_every_rank(fn, process_group, check, vocab_start, vocab_size)
    targets, counted = _scoring.counted_targets(targets, mask, ignore_index)
    logprobs = _linear(fn, hidden, weight, targets, bias, temperature, softcap, logit_scale,
                       ignore_index, vocab_start, vocab_size, process_group, (reduction,))[0]
    return _scoring.reduce_sequence(logprobs, counted, reduction)


def fused_linear_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          mask: torch.Tensor | None = None, *,
                          ref_logps: torch.Tensor | None = None,
                          ref_hidden: torch.Tensor | None = None,
                          ref_weight: torch.Tensor | None = None,
                          average_log_prob: bool = False, logit_scale: float = 1.0,
                          vocab_start: int | None = None, vocab_size: int | None = None,
                          process_group=None, **dpo_options) -> _losses.DPOOutput:
    """``alignkern.losses.fused_linear_dpo_loss`` with vocabulary-parallel heads: ``weight`` (and
    ``ref_weight``, sharded the same way, same ``vocab_start``) are this rank's rows of the
    policy's (and reference's) LM head; ``hidden (2B, T, H)`` chosen rows then rejected rows,
    ``targets``, ``mask``, ``ref_logps``/``ref_hidden`` are replicated. ``dpo_options`` (``beta``,
    ``loss_type``, ``label_smoothing``, ``reduction``, ...) go to ``alignkern.losses.dpo_loss``
    unchanged, with the completion lengths taken from ``mask`` as the single-process function
    does. The loss and metrics are the same on every rank. ``hidden``/``ref_hidden``, ``targets``
    and ``mask`` are checked to be the same on every rank while validating (see
    ``linear_logprobs``); ``ref_logps`` is not compared. A collective."""
    name = "fused_linear_dpo_loss"

    def check():
        _checks.tensor(name, "hidden", hidden, floating=True)
        _checks.optional_tensor(name, "ref_logps", ref_logps, floating=True)
        _checks.optional_tensor(name, "ref_hidden", ref_hidden, floating=True)
        _losses.check_fused_dpo_arguments(name, hidden, ref_logps, ref_hidden, ref_weight,
                                          average_log_prob, logit_scale)

    _checked_on_every_rank(name, process_group, check, vocab_start, vocab_size)
    kind = "mean" if average_log_prob else "sum"
    shard = dict(vocab_start=vocab_start, vocab_size=vocab_size, process_group=process_group)
    policy = sequence_logprobs(hidden, weight, targets, mask, reduction=kind,
                               logit_scale=logit_scale, **shard)
    if ref_logps is None:
        with torch.no_grad():
            ref_logps = sequence_logprobs(ref_hidden, ref_weight, targets, mask, reduction=kind,
                                          logit_scale=logit_scale, **shard)
    lengths = _losses.completion_lengths(targets, mask, average_log_prob).to(policy.dtype)
    half = hidden.shape[0] // 2
    ref_logps = ref_logps.to(policy.dtype)
    return _losses.dpo_loss(policy[:half], policy[half:], ref_logps[:half], ref_logps[half:],
                            chosen_lengths=lengths[:half], rejected_lengths=lengths[half:],
                            **dpo_options)


class _ShardedKL(torch.autograd.Function):
    """Global per-row ``KL(pi || pi_ref)`` from this rank's shard of both heads, in the one pass
    over the shard that the single-process op makes. The registered ``alignkern::linear_kl`` gives,
    per shard ``r``: each side's log-sum-exp in two parts, ``(c_r, l_r)`` for the policy and
    ``(c'_r, l'_r)`` for the reference (ops/token_logprobs.py says why they stay apart), and
    ``E_r = sum_{v in r} p^r_v (z_v - y_v)`` (``p^r``: the softmax of the shard's logits). With
    ``C``, ``C'`` the maxima over ranks of ``c_r``, ``c'_r`` (constants), ``d_r = (c_r - C) + l_r``,
    ``d'_r = (c'_r - C') + l'_r`` and one all-reduce (sum) of ``(exp(d_r), exp(d_r) E_r,
    exp(d'_r))``: ``lse = C + log S``, ``w_r = exp(d_r) / S``, ``E = sum_r w_r E_r = E_pi[z - y]``,
    ``lse' = C' + log S'`` and ``KL = (E - (C - C')) - (log S - log S')``.

    Backward: ``dKL/dz_v = p_v (z_v - y_v - E)`` with ``p_v = w_r p^r_v``, which is exactly what
    ``alignkern::linear_kl_backward`` computes on the shard when handed ``grad * w_r`` and the
    global ``E`` in place of ``E_r`` (it forms ``grad exp((z - c_r) - l_r) (z - y - expect)``). So
    the backward is one local pass too; ``dweight`` is this shard's part of the full gradient and
    ``dhidden`` this shard's contribution, summed over ranks by ``_CopyToShards``."""

    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, temperature, logit_scale, backend,
                group):
        from ..ops.linear_kl import kl_from_parts

        # (keep_gradient=False: the backward needs the global E, which the shard's kept
        # direction p (z - y - E_r) does not carry)
        _, row_max, log_sum, expect_r, ref_row_max, ref_log_sum, _ = torch.ops.alignkern.linear_kl(
            hidden, weight, ref_hidden, ref_weight, temperature, logit_scale, False, backend)
        top, ref_top = _global_max(torch.stack([row_max, ref_row_max]),
                                   torch.stack([log_sum, ref_log_sum]), group)
        scaled = torch.exp((row_max - top) + log_sum)
        ref_scaled = torch.exp((ref_row_max - ref_top) + ref_log_sum)
        total = _all_reduce_sum(torch.stack([scaled, scaled * expect_r, ref_scaled]), group)
        weight_r = scaled / total[0]
        expect = total[1] / total[0]
        kl = kl_from_parts(expect, top, torch.log(total[0]), ref_top, torch.log(total[2]))
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, row_max, log_sum, expect,
                              weight_r)
        ctx.scalars = (temperature, logit_scale, backend)
        return kl

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, ref_hidden, ref_weight, row_max, log_sum, expect, weight_r = \
            ctx.saved_tensors
        temperature, logit_scale, backend = ctx.scalars
        need_weight = ctx.needs_input_grad[1]
        grad_hidden, grad_weight = torch.ops.alignkern.linear_kl_backward(
            grad * weight_r, hidden, weight, ref_hidden, ref_weight, row_max, log_sum, expect,
            temperature, logit_scale, need_weight, backend)
        return (grad_hidden, grad_weight if need_weight else None, None, None, None, None, None,
                None)


def linear_kl(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
              ref_weight: torch.Tensor, mask: torch.Tensor | None = None, *,
              temperature: float = 1.0, logit_scale: float = 1.0, vocab_start: int | None = None,
              vocab_size: int | None = None, process_group=None) -> torch.Tensor:
    """``alignkern.losses.linear_kl`` (per-token ``KL(pi || pi_ref)``) with vocabulary-parallel
    heads: ``weight (V_local, H)`` and ``ref_weight (V_local, H_ref)`` are this rank's rows
    ``[vocab_start, vocab_start + V_local)`` of the policy's and the reference's LM heads (the same
    shard of both); ``hidden (..., H)``, ``ref_hidden (..., H_ref)`` and ``mask (...)`` are the same
    on every rank. Returns ``(...)`` float32 (float64 for float64), the same on every rank, zero
    where ``mask`` is false; differentiable in ``hidden`` (full gradient on every rank) and
    ``weight`` (this shard's rows), the reference side detached, as in the single-process op.

    Cost: the single-process op's one pass over this rank's shard (both heads) in the forward and
    one in the backward, no extra pass (see ``_ShardedKL`` for the formula). Communication: the
    setup all-gather, an all-reduce (max) of 2·N and one all-reduce (sum) of 3·N numbers in the
    forward, the all-reduce (sum) of ``dhidden`` (N·H) in the backward. A collective.

    **Every rank must hold the same ``hidden``, ``ref_hidden`` and ``mask``**: the setup exchange
    compares an exact checksum of them and raises on every rank when they differ, unless
    ``ALIGNKERN_VALIDATE=0``, which turns every cross-rank check off (see the module docstring)."""
    fn = "linear_kl"
    from ..ops import linear_kl as _kl

    def make(start, size):
        temperature_, logit_scale_ = _kl._check_inputs(fn, hidden, weight, ref_hidden, ref_weight,
                                                       temperature, logit_scale)
        _kl._check_mask(fn, mask, hidden)
        return _Setup(weight.shape[0], start, size, math.prod(hidden.shape[:-1]), -1,
                      hidden.shape[-1], hidden.dtype,
                      _settings_code(*hidden.shape[:-1], ref_hidden.shape[-1]),
                      _settings_code(temperature_, logit_scale_, size, mask is not None),
                      None, None, {"hidden": hidden, "ref_hidden": ref_hidden, "mask": mask},
                      lambda: _backend.backend_for(fn, "auto", hidden.device))

    device = hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
    _layout(fn, process_group, device, vocab_start, vocab_size, make)
    temperature, logit_scale = float(temperature), float(logit_scale)
    backend = "auto" if torch.compiler.is_compiling() else _backend.resolve_backend(hidden.device)
    ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    # The op's own autocast policy, applied here so that autograd records the casts and the
    # backward sees the operands the forward used.
    hidden, weight, ref_hidden, ref_weight = _autocast.cast_operands(hidden, weight, ref_hidden,
                                                                     ref_weight)
    replicated = _CopyToShards.apply(hidden, process_group)
    kl = _ShardedKL.apply(replicated, weight, ref_hidden, ref_weight, temperature, logit_scale,
                          backend, process_group)
    return kl if mask is None else torch.where(mask.to(torch.bool), kl, 0.0)


__all__ = ["ShardLayout", "fused_linear_dpo_loss", "linear_kl", "linear_logprobs",
           "option_logprobs", "self_eval_scores", "sequence_logprobs", "shard_layout",
           "token_logprobs"]
