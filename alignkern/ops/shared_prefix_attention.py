"""``shared_prefix_attention``: ``reward_attention`` for N rows that follow one shared prefix, with
the prefix's keys and values held once (Hydragen's split; FlashInfer's cascade attention); and
``merge_attention``, which combines two partial attention results by their log-sum-exps.

Self-correction loops score or sample N candidates after one shared text (a judge template, a
prompt, a committed answer). Repeating that text's KV per row costs N copies and N reads; here
the prefix part runs once for all rows (their queries batched into one ``(m·Lq)``-row problem per
prefix, a matrix product against the single copy), the suffix part per row, and the two are
merged exactly:

    out = (e^{lse_p} out_p + e^{lse_s} out_s) / (e^{lse_p} + e^{lse_s}),
    lse = log(e^{lse_p} + e^{lse_s}).

The backward needs no partial results: for each part, ``P_ij = exp(S_ij - lse)`` with the merged
``lse`` is that key's share of the whole softmax and ``dS = P (dP - rowsum(dO * out) + dlse)`` with
the merged ``out``, so reward_attention's backward kernels run on each part with the merged
``(out, lse)``; the prefix's gradients come out summed over the rows that share it.

Registered ops:
  ``alignkern::shared_prefix_attention(q, prefix_k, prefix_v, suffix_k, suffix_v,
  prefix_key_bias, suffix_key_bias, prefix_key_rank, suffix_key_rank, query_rank, causal, scale,
  backend) -> (out, lse)``
  ``alignkern::shared_prefix_attention_backward(grad_out, grad_lse, <the forward's tensors>, out,
  lse, causal, scale, need_prefix_bias_grad, need_suffix_bias_grad, backend)
  -> (dq, dprefix_k, dprefix_v, dsuffix_k, dsuffix_v, dprefix_bias, dsuffix_bias)``; a bias
  gradient has the bias's shape, or 0 elements when not asked for.

Backends: each part runs on reward_attention's kernels of the chosen backend (``cpu``, ``triton``,
``cuda``); ``reference`` computes plain attention over the concatenated keys with the prefix
repeated per row (what the shared form must equal).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _autocast, _checks
from . import reward_attention as attention

FN = "shared_prefix_attention"
BACKWARD_FN = "shared_prefix_attention_backward"


class MergedAttention(NamedTuple):
    """What ``merge_attention`` and ``shared_prefix_attention(..., return_lse=True)`` return."""

    out: torch.Tensor
    lse: torch.Tensor


# ----------------------------------------------------------------------------- merge


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> MergedAttention:
    """Attention over the union of two disjoint key sets, from the attention over each.

    With ``out_x = softmax(S_x) V_x`` and ``lse_x = logsumexp(S_x)`` over key set x,
    ``out = w_a out_a + w_b out_b`` with ``w_x = exp(lse_x - lse)`` and
    ``lse = logaddexp(lse_a, lse_b)``: exactly the attention over both sets. A row that sees no
    key in either set (both lse ``-inf``) gives ``out = 0`` and ``lse = -inf`` with zero
    gradients, as ``reward_attention`` does. Differentiable in all four inputs.

    Args:
        out_a, out_b: ``(..., L, D)`` of one floating dtype.
        lse_a, lse_b: ``(..., L)``, real floating point (float32 from ``reward_attention``).

    Returns:
        ``MergedAttention(out, lse)``: ``out`` in ``out_a``'s dtype (the arithmetic in float32, or
        float64 when any input is float64), ``lse`` in the wider of the two lse dtypes.

    Raises:
        TypeError: a non-tensor, a non-float tensor, or outs of different dtypes.
        ValueError: shapes that do not match, or mixed devices.

    Example:
        >>> prefix = alignkern.reward_attention(q, pk, pv, return_lse=True)
        >>> suffix = alignkern.reward_attention(q, sk, sv, causal=True, return_lse=True)
        >>> out, lse = alignkern.merge_attention(*prefix, *suffix)
    """
    fn = "merge_attention"
    for arg, value in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        _checks.tensor(fn, arg, value, floating=True)
    if out_b.dtype != out_a.dtype:
        raise TypeError(f"{fn}: out_b must have out_a's dtype ({out_a.dtype}), got {out_b.dtype}")
    if tuple(out_a.shape) != tuple(out_b.shape) or out_a.dim() < 1:
        raise ValueError(f"{fn}: out_a and out_b must have one shape (..., L, D), got "
                         f"{tuple(out_a.shape)} and {tuple(out_b.shape)}")
    rows = tuple(out_a.shape[:-1])
    _checks.shape(fn, "lse_a", lse_a, rows, "out_a's shape without its last dim")
    _checks.shape(fn, "lse_b", lse_b, rows, "out_a's shape without its last dim")
    _checks.same_device(fn, out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    return _merge(out_a, lse_a, out_b, lse_b)


def _merge(out_a, lse_a, out_b, lse_b) -> MergedAttention:
    """``merge_attention`` without the checks (also run inside the forward op)."""
    wide = torch.float64 in (out_a.dtype, lse_a.dtype, lse_b.dtype)
    acc = torch.float64 if wide else torch.float32
    lse_dtype = torch.promote_types(lse_a.dtype, lse_b.dtype)
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    top = torch.maximum(lse_a, lse_b)
    # A row with no key in either part has top = -inf: shift by 0 there, so that every exp is
    # exp(-inf) = 0 and no inf - inf (NaN) appears, forward or backward.
    shift = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    weight_a, weight_b = torch.exp(lse_a - shift), torch.exp(lse_b - shift)
    total = weight_a + weight_b
    seen = total > 0
    safe_total = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, shift + torch.log(safe_total), top)
    out = (out_a.to(acc) * (weight_a / safe_total)[..., None]
           + out_b.to(acc) * (weight_b / safe_total)[..., None])
    return MergedAttention(out.to(out_a.dtype), lse.to(lse_dtype))


# ----------------------------------------------------------------------------- validation


class _Sizes(NamedTuple):
    rows: int      # N
    groups: int    # G: prefixes; rows [g m, (g + 1) m) share prefix g
    per_group: int  # m = N / G


def _check_keys(fn: str, q, k, v, names: tuple[str, str], batch: int, what: str) -> None:
    """k and v ``(batch, Hkv, L, D)`` in q's dtype, Hq a multiple of Hkv, D equal to q's."""
    for arg, value in zip(names, (k, v)):
        _checks.tensor(fn, arg, value)
        if value.dtype != q.dtype:
            raise TypeError(f"{fn}: {arg} must have q's dtype ({q.dtype}), got {value.dtype}")
        if value.dim() != 4:
            raise ValueError(f"{fn}: {arg} must be 4-D ({what}, Hkv, L, D), got shape "
                             f"{tuple(value.shape)}")
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"{fn}: {names[0]} and {names[1]} must have the same shape, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch:
        raise ValueError(f"{fn}: {names[0]} must have {what} = {batch} rows in dim 0, got shape "
                         f"{tuple(k.shape)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{fn}: head dims differ: q has D = {q.shape[3]}, {names[0]} has D = "
                         f"{k.shape[3]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"{fn}: the query heads Hq = {q.shape[1]} must be a multiple of "
                         f"{names[0]}'s heads Hkv = {k.shape[1]} (both positive)")


def _check_structure(fn: str, q, prefix_k, prefix_v, suffix_k, suffix_v) -> _Sizes:
    """q ``(N, Hq, Lq, D)``; prefix ``(G, Hkv, Lp, D)`` with G dividing N; suffix
    ``(N, Hkv, Ls, D)`` with the prefix's heads."""
    _checks.tensor(fn, "q", q, dtypes=attention.SUPPORTED_DTYPES)
    if q.dim() != 4:
        raise ValueError(f"{fn}: q must be 4-D (N, Hq, Lq, D), got shape {tuple(q.shape)}")
    if not 1 <= q.shape[3] <= attention.MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head dim D must be in [1, {attention.MAX_HEAD_DIM}], got "
                         f"{q.shape[3]}")
    for arg, value in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        _checks.tensor(fn, arg, value)
        if value.dim() != 4 or value.shape[0] < 1:
            raise ValueError(f"{fn}: {arg} must be 4-D (G, Hkv, Lp, D) with G >= 1 prefixes, "
                             f"got shape {tuple(value.shape)}")
    rows, groups = q.shape[0], prefix_k.shape[0]
    if rows % groups:
        raise ValueError(f"{fn}: the rows N = {rows} (q's dim 0) must be a multiple of the "
                         f"prefixes G = {groups} (prefix_k's dim 0): rows [g*m, (g+1)*m) "
                         "share prefix g")
    _check_keys(fn, q, prefix_k, prefix_v, ("prefix_k", "prefix_v"), groups, "G")
    _check_keys(fn, q, suffix_k, suffix_v, ("suffix_k", "suffix_v"), rows, "N")
    if suffix_k.shape[1] != prefix_k.shape[1]:
        raise ValueError(f"{fn}: prefix and suffix must have the same key/value heads, got "
                         f"prefix_k Hkv = {prefix_k.shape[1]} and suffix_k Hkv = "
                         f"{suffix_k.shape[1]}")
    return _Sizes(rows, groups, rows // groups)


def _check_bias(fn: str, arg: str, bias, batch: int, heads: int, length: int,
                what: str) -> None:
    if bias is None:
        return
    _checks.tensor(fn, arg, bias, dtypes=attention.SUPPORTED_DTYPES)
    if tuple(bias.shape) not in ((batch, length), (batch, heads, length)):
        raise ValueError(f"{fn}: {arg} must have shape ({what}, L) = {(batch, length)} or "
                         f"({what}, Hq, L) = {(batch, heads, length)}, got {tuple(bias.shape)}")


def _check_ranks(fn: str, ranks: dict, shapes: dict) -> None:
    """All three ranks or none; each a real tensor of its shape."""
    given = [arg for arg, value in ranks.items() if value is not None]
    if given and len(given) != len(ranks):
        missing = [arg for arg in ranks if arg not in given]
        raise ValueError(f"{fn}: prefix_key_rank, suffix_key_rank and query_rank go together: "
                         f"got {', '.join(given)} without {', '.join(missing)}")
    for arg in given:
        value = ranks[arg]
        _checks.tensor(fn, arg, value)
        if value.dtype not in attention.RANK_DTYPES:
            raise TypeError(f"{fn}: {arg} must be a real-valued tensor, got {value.dtype}")
        if tuple(value.shape) != shapes[arg]:
            raise ValueError(f"{fn}: {arg} must have shape {shapes[arg]}, got "
                             f"{tuple(value.shape)}")


def _check_inputs(fn: str, q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_key_bias,
                  suffix_key_bias, prefix_key_rank, suffix_key_rank, query_rank, causal,
                  scale) -> tuple[bool, float]:
    """The error contract for the forward's arguments (public function and both ops). Returns
    ``(causal, scale)`` with the default scale filled in."""
    sizes = _check_structure(fn, q, prefix_k, prefix_v, suffix_k, suffix_v)
    heads, len_q = q.shape[1], q.shape[2]
    len_p, len_s = prefix_k.shape[2], suffix_k.shape[2]
    _check_bias(fn, "prefix_key_bias", prefix_key_bias, sizes.groups, heads, len_p, "G")
    _check_bias(fn, "suffix_key_bias", suffix_key_bias, sizes.rows, heads, len_s, "N")
    _check_ranks(fn, {"prefix_key_rank": prefix_key_rank, "suffix_key_rank": suffix_key_rank,
                      "query_rank": query_rank},
                 {"prefix_key_rank": (sizes.groups, len_p), "suffix_key_rank": (sizes.rows, len_s),
                  "query_rank": (sizes.rows, len_q)})
    _checks.same_device(fn, q=q, prefix_k=prefix_k, prefix_v=prefix_v, suffix_k=suffix_k,
                        suffix_v=suffix_v, prefix_key_bias=prefix_key_bias,
                        suffix_key_bias=suffix_key_bias, prefix_key_rank=prefix_key_rank,
                        suffix_key_rank=suffix_key_rank, query_rank=query_rank)
    causal, scale = attention._check_scalars(fn, q.shape[3], causal, scale)
    if causal and len_q > len_s:
        raise ValueError(f"{fn}: with causal=True the queries must be the last Lq of the suffix's "
                         f"keys (Lq <= Ls), got Lq = {len_q} and Ls = {len_s}: a query before the "
                         "suffix would not see the whole prefix")
    return causal, scale


def _fake_checks(fn: str, q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_key_bias,
                 suffix_key_bias, prefix_key_rank, suffix_key_rank, query_rank) -> None:
    """The shape checks of ``_check_inputs`` as ``torch._check`` (fake tensors, symbolic sizes)."""
    _checks.same_device_in_fake(fn, q=q, prefix_k=prefix_k, prefix_v=prefix_v, suffix_k=suffix_k,
                                suffix_v=suffix_v, prefix_key_bias=prefix_key_bias,
                                suffix_key_bias=suffix_key_bias, prefix_key_rank=prefix_key_rank,
                                suffix_key_rank=suffix_key_rank, query_rank=query_rank)
    four_d = all(t.dim() == 4 for t in (q, prefix_k, prefix_v, suffix_k, suffix_v))
    torch._check(four_d, lambda: f"{fn}: q and the keys and values must be 4-D")
    torch._check(all(t.dtype == q.dtype for t in (prefix_k, prefix_v, suffix_k, suffix_v))
                 and q.dtype in attention.SUPPORTED_DTYPES,
                 lambda: f"{fn}: q and the keys and values must have one float dtype")
    rows, heads, len_q, head_dim = q.shape
    groups, heads_kv, len_p = prefix_k.shape[0], prefix_k.shape[1], prefix_k.shape[2]
    len_s = suffix_k.shape[2]
    torch._check(groups >= 1 and rows % groups == 0,
                 lambda: f"{fn}: N must be a multiple of G >= 1")
    torch._check(tuple(prefix_v.shape) == tuple(prefix_k.shape)
                 and tuple(suffix_v.shape) == tuple(suffix_k.shape),
                 lambda: f"{fn}: keys and values must have the same shapes")
    torch._check(suffix_k.shape[0] == rows and suffix_k.shape[1] == heads_kv
                 and suffix_k.shape[3] == head_dim and prefix_k.shape[3] == head_dim,
                 lambda: f"{fn}: the suffix must be (N, Hkv, Ls, D) with the prefix's Hkv and D")
    torch._check(heads_kv > 0 and heads % heads_kv == 0,
                 lambda: f"{fn}: Hq must be a multiple of Hkv")
    for bias, batch, length in ((prefix_key_bias, groups, len_p),
                                (suffix_key_bias, rows, len_s)):
        if bias is not None:
            torch._check(tuple(bias.shape) in ((batch, length), (batch, heads, length)),
                         lambda: f"{fn}: a key bias has the wrong shape")
    if query_rank is not None:
        torch._check(prefix_key_rank is not None and suffix_key_rank is not None,
                     lambda: f"{fn}: the ranks go together")
        torch._check(tuple(prefix_key_rank.shape) == (groups, len_p)
                     and tuple(suffix_key_rank.shape) == (rows, len_s)
                     and tuple(query_rank.shape) == (rows, len_q),
                     lambda: f"{fn}: a rank has the wrong shape")


# ----------------------------------------------------------------------------- the two parts


def _queries_by_prefix(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(N, Hq, Lq, ...)`` → ``(G, Hq, m·Lq, ...)``: each prefix's rows as one long query block
    (row-major over (row, position)), so that its part is one attention problem."""
    rows, heads, len_q = x.shape[:3]
    per_group = rows // groups
    grouped = x.reshape(groups, per_group, heads, len_q, *x.shape[3:]).transpose(1, 2)
    return grouped.reshape(groups, heads, per_group * len_q, *x.shape[3:]).contiguous()


def _rows_from_prefix(x: torch.Tensor, rows: int, len_q: int) -> torch.Tensor:
    """The inverse of ``_queries_by_prefix``: ``(G, Hq, m·Lq, ...)`` → ``(N, Hq, Lq, ...)``."""
    groups, heads = x.shape[:2]
    per_group = rows // groups
    grouped = x.reshape(groups, heads, per_group, len_q, *x.shape[3:]).transpose(1, 2)
    return grouped.reshape(rows, heads, len_q, *x.shape[3:])


def _ranks_by_prefix(query_rank: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """``(N, Lq)`` → ``(G, m·Lq)`` in the order of ``_queries_by_prefix``."""
    return None if query_rank is None else query_rank.reshape(groups, -1)


def _concatenated(q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_key_bias, suffix_key_bias,
                  prefix_key_rank, suffix_key_rank):
    """The reference's problem: keys ``[prefix of the row's group, the row's suffix]`` per row,
    ``(N, Hkv, Lp + Ls, D)``, and the bias and key ranks over them (0 bias where one part has
    none)."""
    per_group = q.shape[0] // prefix_k.shape[0]
    repeat = lambda x: x.repeat_interleave(per_group, dim=0)  # noqa: E731
    k = torch.cat([repeat(prefix_k), suffix_k], dim=2)
    v = torch.cat([repeat(prefix_v), suffix_v], dim=2)
    bias = None
    if prefix_key_bias is not None or suffix_key_bias is not None:
        rows, heads = q.shape[:2]
        parts = []
        for part, length in ((None if prefix_key_bias is None else repeat(prefix_key_bias),
                              prefix_k.shape[2]), (suffix_key_bias, suffix_k.shape[2])):
            if part is None:
                part = q.new_zeros((rows, heads, length), dtype=torch.float32)
            parts.append(part if part.dim() == 3 else part[:, None].expand(-1, heads, -1))
        bias = torch.cat([p.to(torch.promote_types(parts[0].dtype, parts[1].dtype))
                          for p in parts], dim=2)
    key_rank = None
    if prefix_key_rank is not None:
        dtype = torch.promote_types(prefix_key_rank.dtype, suffix_key_rank.dtype)
        key_rank = torch.cat([repeat(prefix_key_rank).to(dtype), suffix_key_rank.to(dtype)],
                             dim=1)
    return k, v, bias, key_rank


def _run_forward(q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_key_bias, suffix_key_bias,
                 prefix_key_rank, suffix_key_rank, query_rank, causal, scale, backend):
    if backend == "reference":
        k, v, bias, key_rank = _concatenated(q, prefix_k, prefix_v, suffix_k, suffix_v,
                                             prefix_key_bias, suffix_key_bias, prefix_key_rank,
                                             suffix_key_rank)
        return attention._run_forward(q, k, v, bias, key_rank, query_rank, causal, scale,
                                      backend)
    groups = prefix_k.shape[0]
    out_p, lse_p = attention._run_forward(
        _queries_by_prefix(q, groups), prefix_k, prefix_v, prefix_key_bias, prefix_key_rank,
        _ranks_by_prefix(query_rank, groups), False, scale, backend)
    out_s, lse_s = attention._run_forward(q, suffix_k, suffix_v, suffix_key_bias,
                                          suffix_key_rank, query_rank, causal, scale, backend)
    rows, len_q = q.shape[0], q.shape[2]
    out, lse = _merge(_rows_from_prefix(out_p, rows, len_q), _rows_from_prefix(lse_p, rows, len_q),
                      out_s, lse_s)
    return out.contiguous(), lse.contiguous()


def _run_backward(grad_out, grad_lse, q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_key_bias,
                  suffix_key_bias, prefix_key_rank, suffix_key_rank, query_rank, out, lse, causal,
                  scale, need_prefix_bias_grad, need_suffix_bias_grad, backend):
    if backend == "reference":
        return _reference_backward(grad_out, grad_lse, q, prefix_k, prefix_v, suffix_k, suffix_v,
                                   prefix_key_bias, suffix_key_bias, prefix_key_rank,
                                   suffix_key_rank, query_rank, out, lse, causal, scale,
                                   need_prefix_bias_grad, need_suffix_bias_grad)
    groups, rows = prefix_k.shape[0], q.shape[0]
    by_prefix = lambda x: None if x is None else _queries_by_prefix(x, groups)  # noqa: E731
    # Both parts see the merged (out, lse): see the module docstring.
    dq_p, dk_p, dv_p, dbias_p = attention._run_backward(
        by_prefix(grad_out), by_prefix(grad_lse), by_prefix(q), prefix_k, prefix_v,
        prefix_key_bias, prefix_key_rank, _ranks_by_prefix(query_rank, groups), by_prefix(out),
        by_prefix(lse), False, scale, need_prefix_bias_grad, backend)
    dq_s, dk_s, dv_s, dbias_s = attention._run_backward(
        grad_out, grad_lse, q, suffix_k, suffix_v, suffix_key_bias, suffix_key_rank, query_rank,
        out, lse, causal, scale, need_suffix_bias_grad, backend)
    dq = (_rows_from_prefix(dq_p, rows, q.shape[2]).to(dq_s.dtype) + dq_s).contiguous()
    return dq, dk_p, dv_p, dk_s, dv_s, dbias_p, dbias_s


def _reference_backward(grad_out, grad_lse, q, prefix_k, prefix_v, suffix_k, suffix_v,
                        prefix_key_bias, suffix_key_bias, prefix_key_rank, suffix_key_rank,
                        query_rank, out, lse, causal, scale, need_prefix_bias_grad,
                        need_suffix_bias_grad):
    """The concatenated problem's gradients, split back: the prefix's summed over its rows."""
    k, v, bias, key_rank = _concatenated(q, prefix_k, prefix_v, suffix_k, suffix_v,
                                         prefix_key_bias, suffix_key_bias, prefix_key_rank,
                                         suffix_key_rank)
    need_bias = need_prefix_bias_grad or need_suffix_bias_grad
    dq, dk, dv, dbias = attention._run_backward(grad_out, grad_lse, q, k, v, bias, key_rank,
                                                query_rank, out, lse, causal, scale, need_bias,
                                                "reference")
    groups, len_p = prefix_k.shape[0], prefix_k.shape[2]
    per_group = q.shape[0] // groups
    summed = lambda x: x.reshape(groups, per_group, *x.shape[1:]).sum(1)  # noqa: E731
    dbias_p, dbias_s = q.new_empty((0,)), q.new_empty((0,))
    if need_prefix_bias_grad and prefix_key_bias is not None:
        part = summed(dbias[..., :len_p])
        dbias_p = (part if prefix_key_bias.dim() == 3 else part.sum(1)).to(prefix_key_bias.dtype)
    if need_suffix_bias_grad and suffix_key_bias is not None:
        part = dbias[..., len_p:]
        dbias_s = (part if suffix_key_bias.dim() == 3 else part.sum(1)).to(
            suffix_key_bias.dtype).contiguous()
    return (dq, summed(dk[:, :, :len_p]), summed(dv[:, :, :len_p]),
            dk[:, :, len_p:].contiguous(), dv[:, :, len_p:].contiguous(), dbias_p, dbias_s)


# ----------------------------------------------------------------------------- registered ops


@torch.library.custom_op("alignkern::shared_prefix_attention", mutates_args=())
def _shared_prefix_attention_op(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    suffix_k: torch.Tensor,
    suffix_v: torch.Tensor,
    prefix_key_bias: torch.Tensor | None,
    suffix_key_bias: torch.Tensor | None,
    prefix_key_rank: torch.Tensor | None,
    suffix_key_rank: torch.Tensor | None,
    query_rank: torch.Tensor | None,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    causal, scale = _check_inputs(FN, q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_key_bias,
                                  suffix_key_bias, prefix_key_rank, suffix_key_rank, query_rank,
                                  causal, scale)
    backend = attention._check_backend(backend, q, FN)
    return _run_forward(q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_key_bias,
                        suffix_key_bias, prefix_key_rank, suffix_key_rank, query_rank, causal,
                        scale, backend)


@_shared_prefix_attention_op.register_fake
def _shared_prefix_attention_fake(q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_key_bias,
                                  suffix_key_bias, prefix_key_rank, suffix_key_rank, query_rank,
                                  causal, scale, backend):
    _fake_checks(FN, q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_key_bias, suffix_key_bias,
                 prefix_key_rank, suffix_key_rank, query_rank)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[:3], dtype=attention._accumulation_dtype(q.dtype)))


@torch.library.custom_op("alignkern::shared_prefix_attention_backward", mutates_args=())
def _shared_prefix_attention_backward_op(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    suffix_k: torch.Tensor,
    suffix_v: torch.Tensor,
    prefix_key_bias: torch.Tensor | None,
    suffix_key_bias: torch.Tensor | None,
    prefix_key_rank: torch.Tensor | None,
    suffix_key_rank: torch.Tensor | None,
    query_rank: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    need_prefix_bias_grad: bool,
    need_suffix_bias_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    causal, scale = _check_inputs(BACKWARD_FN, q, prefix_k, prefix_v, suffix_k, suffix_v,
                                  prefix_key_bias, suffix_key_bias, prefix_key_rank,
                                  suffix_key_rank, query_rank, causal, scale)
    attention._check_gradients(BACKWARD_FN, grad_out, grad_lse, out, lse, q)
    need_prefix = _checks.boolean(BACKWARD_FN, "need_prefix_bias_grad", need_prefix_bias_grad)
    need_suffix = _checks.boolean(BACKWARD_FN, "need_suffix_bias_grad", need_suffix_bias_grad)
    backend = attention._check_backend(backend, q, BACKWARD_FN)
    return _run_backward(grad_out, grad_lse, q, prefix_k, prefix_v, suffix_k, suffix_v,
                         prefix_key_bias, suffix_key_bias, prefix_key_rank, suffix_key_rank,
                         query_rank, out, lse, causal, scale,
                         need_prefix and prefix_key_bias is not None,
                         need_suffix and suffix_key_bias is not None, backend)


@_shared_prefix_attention_backward_op.register_fake
def _shared_prefix_attention_backward_fake(grad_out, grad_lse, q, prefix_k, prefix_v, suffix_k,
                                           suffix_v, prefix_key_bias, suffix_key_bias,
                                           prefix_key_rank, suffix_key_rank, query_rank, out, lse,
                                           causal, scale, need_prefix_bias_grad,
                                           need_suffix_bias_grad, backend):
    _fake_checks(BACKWARD_FN, q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_key_bias,
                 suffix_key_bias, prefix_key_rank, suffix_key_rank, query_rank)
    attention._fake_gradient_checks(BACKWARD_FN, grad_out, grad_lse, out, lse, q)

    def bias_grad(bias, needed):
        return bias.new_empty(bias.shape) if needed and bias is not None else q.new_empty((0,))

    contiguous = torch.contiguous_format
    return (torch.empty_like(q, memory_format=contiguous),
            *(torch.empty_like(t, memory_format=contiguous)
              for t in (prefix_k, prefix_v, suffix_k, suffix_v)),
            bias_grad(prefix_key_bias, need_prefix_bias_grad),
            bias_grad(suffix_key_bias, need_suffix_bias_grad))


def _setup_context(ctx, inputs, output):
    *tensors, causal, scale, backend = inputs
    ctx.save_for_backward(*tensors, *output)
    ctx.options = (causal, scale)
    ctx.backend = backend


def _backward(ctx, grad_out, grad_lse):
    *tensors, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    need_prefix_bias, need_suffix_bias = ctx.needs_input_grad[5], ctx.needs_input_grad[6]
    dq, dpk, dpv, dsk, dsv, dbias_p, dbias_s = _shared_prefix_attention_backward_op(
        grad_out, grad_lse, *tensors, out, lse, *ctx.options, need_prefix_bias, need_suffix_bias,
        ctx.backend)
    return (dq, dpk, dpv, dsk, dsv, dbias_p if need_prefix_bias else None,
            dbias_s if need_suffix_bias else None, None, None, None, None, None, None)


_shared_prefix_attention_op.register_autograd(_backward, setup_context=_setup_context)
_autocast.register("shared_prefix_attention",
                   ("q", "prefix_k", "prefix_v", "suffix_k", "suffix_v"))
_autocast.register("shared_prefix_attention_backward")


# ----------------------------------------------------------------------------- public API


def shared_prefix_attention(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    suffix_k: torch.Tensor,
    suffix_v: torch.Tensor,
    *,
    prefix_key_bias: torch.Tensor | None = None,
    suffix_key_bias: torch.Tensor | None = None,
    prefix_key_rank: torch.Tensor | None = None,
    suffix_key_rank: torch.Tensor | None = None,
    query_rank: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | MergedAttention:
    """``reward_attention`` for N rows whose keys are one shared prefix followed by each row's own
    suffix, with the prefix's keys and values held (and read) once.

    Row r attends to ``[prefix_k[r // m], suffix_k[r]]`` (``m = N / G``): the result equals
    ``reward_attention`` over those keys concatenated, with the prefix repeated per row, forward
    and backward, but the prefix part runs once per prefix for all its rows' queries (one matrix
    product against the single copy) and the prefix's gradients come out summed over its rows.

    Args:
        q: ``(N, Hq, Lq, D)``, the queries of N rows; float32, float16, bfloat16 (float64 off the
            cuda backend); D <= 256.
        prefix_k, prefix_v: ``(G, Hkv, Lp, D)``, G >= 1 prefixes; rows ``[g m, (g + 1) m)`` share
            prefix g (G = 1: one prefix for all rows). ``Hq % Hkv == 0`` (grouped-query).
        suffix_k, suffix_v: ``(N, Hkv, Ls, D)``, each row's own keys after the prefix.
        prefix_key_bias: ``(G, Lp)`` or ``(G, Hq, Lp)``, shared by the prefix's rows.
        suffix_key_bias: ``(N, Ls)`` or ``(N, Hq, Ls)``. Both biases differentiable.
        prefix_key_rank, suffix_key_rank, query_rank: ``(G, Lp)``, ``(N, Ls)``, ``(N, Lq)`` real
            numbers, all three together: key j is visible to query i only if
            ``key_rank_j <= query_rank_i`` (as in ``reward_attention``).
        causal: causal within the suffix, bottom-right aligned (the queries are the suffix's last
            Lq keys, so ``Lq <= Ls``); the prefix is always visible (up to the ranks).
        scale: default ``D ** -0.5``.
        return_lse: also return ``lse (N, Hq, Lq)`` (float32; float64 for float64), differentiable.

    Returns:
        ``out (N, Hq, Lq, D)`` in q's dtype, or ``MergedAttention(out, lse)``. A row with no
        visible key gives 0 (lse ``-inf``).

    Raises:
        TypeError: a non-tensor, non-float or mismatched dtypes, non-real ranks, a ``causal`` or
            ``return_lse`` that is not a bool, a ``scale`` that is not a real number.
        ValueError: shapes (N not a multiple of G, heads or head dims that differ, a bias or rank
            of the wrong shape, only some of the ranks, ``Lq > Ls`` with ``causal``), mixed
            devices, a non-finite scale.
        RuntimeError: the backend cannot run here.

    Example:
        >>> # 8 candidates of 5 tokens after one 100-token prompt, 4 heads of 64
        >>> q, sk, sv = (torch.randn(8, 4, 5, 64) for _ in range(3))
        >>> pk, pv = torch.randn(1, 4, 100, 64), torch.randn(1, 4, 100, 64)
        >>> out = alignkern.shared_prefix_attention(q, pk, pv, sk, sv, causal=True)
    """
    causal, scale = _check_inputs(FN, q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_key_bias,
                                  suffix_key_bias, prefix_key_rank, suffix_key_rank, query_rank,
                                  causal, scale)
    return_lse = _checks.boolean(FN, "return_lse", return_lse)
    backend = "auto" if torch.compiler.is_compiling() else attention._check_backend("auto", q, FN)
    out, lse = _shared_prefix_attention_op(q, prefix_k, prefix_v, suffix_k, suffix_v,
                                           prefix_key_bias, suffix_key_bias, prefix_key_rank,
                                           suffix_key_rank, query_rank, causal, scale, backend)
    return MergedAttention(out, lse) if return_lse else out
