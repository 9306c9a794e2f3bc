"""Plain-PyTorch definitions of every alignkern op.

These are the specifications the kernels are tested against (evaluated in float64 by the tests) and
the ``reference`` backend. They materialise whatever they need and are not meant to be fast.
"""

from __future__ import annotations

import torch


def _scaled_logits_and_ids(logits, targets, temperature):
    """``(z, ids, single)``: ``logits / temperature`` in float32 (float64 for float64 logits),
    the targets as ``(..., K)`` int64, and whether they came without the K dimension."""
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    single = targets.dim() == logits.dim() - 1
    ids = (targets.unsqueeze(-1) if single else targets).long()
    return logits.to(out_dtype) / temperature, ids, single


def shifted_logsumexp(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_max, log_sum)`` of ``z (..., V)``: the maximum over the last dimension (0 where it is
    infinite or NaN) and ``log sum exp(z - row_max)``, so that ``logsumexp(z) = row_max +
    log_sum`` with ``log_sum`` kept to full precision however large ``|row_max|`` is."""
    row_max = z.amax(-1)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    return row_max, torch.logsumexp(z - row_max[..., None], dim=-1)


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of chosen tokens and each row's log-sum-exp in two parts.

    Args:
        logits: ``(..., V)`` floating point.
        targets: ``(...)`` or ``(..., K)`` integer token ids; ``ignore_index`` marks ids to skip.
    Returns:
        ``out`` shaped like ``targets`` with ``log_softmax(z)[t]``, ``z = logits / temperature``
        (0 where ``t == ignore_index``, NaN where ``t`` is outside ``[0, V)``), and ``row_max``,
        ``log_sum`` of shape ``(...)`` (``shifted_logsumexp``; ``logsumexp(z) = row_max +
        log_sum``). All float32, or float64 for float64 logits.
    """
    z, ids, single = _scaled_logits_and_ids(logits, targets, temperature)
    row_max, log_sum = shifted_logsumexp(z)
    vocab = logits.shape[-1]
    ignored = ids == ignore_index
    out_of_range = ~ignored & ((ids < 0) | (ids >= vocab))
    shifted = torch.gather(z, -1, ids.clamp(0, vocab - 1)) - row_max[..., None]
    picked = (shifted - log_sum[..., None]).masked_fill(ignored, 0.0)
    picked = picked.masked_fill(out_of_range, float("nan"))
    return (picked.squeeze(-1) if single else picked), row_max, log_sum


def token_logprobs_backward(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Gradient of ``token_logprobs`` in closed form, in the logits' dtype.

    ``dlogits_v = (sum_k g_k [t_k = v] - (sum_{k valid} g_k - g_lse) softmax(z)_v) / temperature``
    with ``softmax(z) = exp((z - row_max) - log_sum)``; a row with an out-of-range id gets NaN.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    single = targets.dim() == logits.dim() - 1
    ids = (targets.unsqueeze(-1) if single else targets).long()
    g = (grad_out.unsqueeze(-1) if single else grad_out).to(acc)
    vocab = logits.shape[-1]
    ignored = ids == ignore_index
    out_of_range = ~ignored & ((ids < 0) | (ids >= vocab))
    g_valid = g.masked_fill(ignored, 0.0).masked_fill(out_of_range, float("nan"))
    coef = g_valid.sum(-1, keepdim=True)
    if grad_lse is not None:
        coef = coef - grad_lse.to(acc).unsqueeze(-1)
    shifted = logits.to(acc) / temperature - row_max.to(acc).unsqueeze(-1)
    softmax = torch.exp(shifted - log_sum.to(acc).unsqueeze(-1))
    picked = torch.zeros_like(softmax).scatter_add_(
        -1, ids.clamp(0, vocab - 1), g.masked_fill(ignored | out_of_range, 0.0)
    )
    return ((picked - coef * softmax) / temperature).to(logits.dtype)


def linear_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """``logit_scale * (hidden @ weight.T + bias)``, then ``softcap * tanh(logits / softcap)`` if
    given, computed in float32 (float64 for float64 inputs). ``hidden (..., H)``, ``weight (V, H)``
    → ``(..., V)``. (Cohere multiplies its logits by ``config.logit_scale``; Granite divides them
    by ``config.logits_scaling``, i.e. ``logit_scale = 1 / logits_scaling``.)"""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(acc) @ weight.to(acc).T
    if bias is not None:
        logits = logits + bias.to(acc)
    logits = logit_scale * logits
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``token_logprobs`` of ``linear_logits(hidden, weight, bias, softcap, logit_scale)``:
    log-probabilities of ``targets`` (``(...)`` or ``(..., K)``) and the log-sum-exp's two parts
    ``row_max``, ``log_sum`` ``(...)``, float32 (float64 for float64)."""
    return token_logprobs(linear_logits(hidden, weight, bias, softcap, logit_scale), targets,
                          temperature, ignore_index)


def logit_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """The per-row statistics of ``z = logits / temperature`` that TRL logs, from the materialised
    logits ``(..., V)``: ``entropy`` = -sum_v p_v log p_v, ``log_sum_sq_probs`` = log sum_v p_v^2
    and ``mean_logits`` = mean_v z_v, each ``(...)`` float32 (float64 for float64), and
    ``is_top1`` shaped like ``targets``: the target is the first maximum of ``z`` (False for
    ``ignore_index`` and out-of-range ids), and ``max_logits`` = max_v z_v ``(...)``."""
    z, ids, single = _scaled_logits_and_ids(logits, targets, temperature)
    log_p = torch.log_softmax(z, dim=-1)
    vocab = logits.shape[-1]
    valid = (ids != ignore_index) & (ids >= 0) & (ids < vocab)
    first_max = torch.argmax(z, dim=-1, keepdim=True)  # torch.argmax returns the first maximum
    is_top1 = (ids == first_max) & valid
    return {
        "entropy": -(log_p.exp() * log_p).sum(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * log_p, dim=-1),
        "mean_logits": z.mean(-1),
        "is_top1": is_top1.squeeze(-1) if single else is_top1,
        "max_logits": z.amax(-1),
    }


def linear_logprobs_stats(hidden, weight, targets, bias=None, temperature=1.0, softcap=None,
                          ignore_index=-100, logit_scale=1.0):
    """``(logprobs, row_max, log_sum, stats)``: ``linear_logprobs`` and ``logit_stats`` of the
    same logits."""
    logits = linear_logits(hidden, weight, bias, softcap, logit_scale)
    out, row_max, log_sum = token_logprobs(logits, targets, temperature, ignore_index)
    return out, row_max, log_sum, logit_stats(logits, targets, temperature, ignore_index)


def option_logprobs(hidden, weight, options, **kwargs) -> torch.Tensor:
    """Log-probabilities ``(..., K)`` of the same ``options (K,)`` token ids at every row."""
    targets = options.expand(*hidden.shape[:-1], options.shape[0])
    return linear_logprobs(hidden, weight, targets, **kwargs)[0]


def self_eval_scores(hidden, weight, options, values=None, **kwargs):
    """``(score, mass)``: the expected value of the options under the model's probabilities
    renormalised over the options, and the total probability the options received."""
    logprobs = option_logprobs(hidden, weight, options, **kwargs)
    if values is None:
        values = torch.tensor([1.0, -1.0])
    p = torch.softmax(logprobs, dim=-1)
    score = (p * values.to(p)).sum(-1)
    mass = torch.exp(logprobs).sum(-1)
    return score, mass


def sequence_logprobs(hidden, weight, targets, mask=None, reduction="sum", **kwargs):
    """Per-sequence log-likelihood ``(B,)``: the sum (or mean over counted tokens) of
    ``linear_logprobs`` over ``T``, counting positions where ``mask`` is true and the target is not
    ``ignore_index``."""
    ignore_index = kwargs.get("ignore_index", -100)
    counted = targets != ignore_index
    if mask is not None:
        counted = counted & mask.bool()
    targets = targets.masked_fill(~counted, ignore_index)
    logprobs = linear_logprobs(hidden, weight, targets, **kwargs)[0]
    total = torch.where(counted, logprobs, 0.0).sum(-1)
    if reduction == "mean":
        return total / counted.sum(-1).clamp(min=1)
    return total


def visible_keys(len_q: int, len_k: int, key_rank=None, query_rank=None, causal=False,
                 device=None) -> torch.Tensor:
    """``(1 or B, 1, Lq, Lk)`` bool: key j is visible to query i iff (causal ⇒ j <= i + Lk - Lq)
    and (ranks given ⇒ key_rank_j <= query_rank_i)."""
    i = torch.arange(len_q, device=device)[:, None]
    j = torch.arange(len_k, device=device)[None, :]
    visible = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if causal:
        visible = visible & (j <= i + len_k - len_q)
    visible = visible[None, None]
    if key_rank is not None:
        visible = visible & (key_rank[:, None, None, :] <= query_rank[:, None, :, None])
    return visible


def reward_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None = None,
    key_rank: torch.Tensor | None = None,
    query_rank: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with a key bias and a reward-ordering mask, materialised.

    ``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)`` (``Hq % Hkv == 0``), ``key_bias (B, Lk)`` or
    ``(B, Hq, Lk)``, ranks ``(B, Lk)`` / ``(B, Lq)``. ``S = scale * q k^T + key_bias``, masked to the
    visible keys (``visible_keys``). Returns ``out`` in q's dtype (0 for a row with no visible key)
    and ``lse (B, Hq, Lq)`` (-inf for such a row), float32 or float64 for float64 inputs.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys, values, probs, lse = _attention_probabilities(q, k, v, key_bias, key_rank, query_rank,
                                                        causal, scale)
    return (probs @ values).to(q.dtype), lse


def _attention_probabilities(q, k, v, key_bias, key_rank, query_rank, causal, scale):
    """(keys, values, P, lse): k and v repeated over each kv head's query heads, and the
    probabilities P (B, Hq, Lq, Lk), all in the accumulation dtype."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    keys = k.to(acc).repeat_interleave(group, dim=1)
    values = v.to(acc).repeat_interleave(group, dim=1)
    scores = scale * (q.to(acc) @ keys.transpose(-1, -2))
    if key_bias is not None:
        bias = key_bias.to(acc)
        scores = scores + (bias[:, None, None, :] if bias.dim() == 2 else bias[:, :, None, :])
    visible = visible_keys(q.shape[2], k.shape[2], key_rank, query_rank, causal, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # Rows with no visible key: exp(-inf - 0) = 0 everywhere, so out = 0 and no NaN gradient.
    safe_lse = torch.where(torch.isneginf(lse), 0.0, lse)
    return keys, values, torch.exp(scores - safe_lse[..., None]), lse


def segment_bias(rewards: torch.Tensor, segment_ids: torch.Tensor, beta: float) -> torch.Tensor:
    """``(B, L)``: ``beta * rewards[b, segment_ids[b, t]]``, 0 where the segment id is negative."""
    inside = segment_ids >= 0
    picked = torch.gather(rewards, 1, segment_ids.clamp(min=0).long())
    return torch.where(inside, beta * picked, 0.0)


def reward_attention_backward(grad_out, grad_lse, q, k, v, key_bias=None, key_rank=None,
                              query_rank=None, causal=False, scale=None):
    """Closed-form gradients of ``reward_attention``: ``(dq, dk, dv, dbias)`` with dbias per query
    head ``(B, Hq, Lk)`` (sum over heads for a shared bias), all in the accumulation dtype.

    ``dS = P * (dO v^T - rowsum(dO * O) + dlse)``, ``dq = scale dS k``, ``dk = scale dS^T q``,
    ``dv = P^T dO`` (summed over the query heads of each kv head), ``dbias = sum_i dS``."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    keys, values, probs, _ = _attention_probabilities(q, k, v, key_bias, key_rank, query_rank,
                                                      causal, scale)
    d_out = grad_out.to(acc)
    out = probs @ values
    delta = (d_out * out).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(acc)
    d_scores = probs * (d_out @ values.transpose(-1, -2) - delta[..., None])
    batch, heads_q, _, head_dim = q.shape
    dq = scale * (d_scores @ keys)
    dk = scale * (d_scores.transpose(-1, -2) @ q.to(acc))
    dv = probs.transpose(-1, -2) @ d_out
    regroup = (batch, k.shape[1], group, k.shape[2], head_dim)
    return dq, dk.reshape(regroup).sum(2), dv.reshape(regroup).sum(2), d_scores.sum(2)


def linear_kl(hidden, weight, ref_hidden, ref_weight, temperature=1.0, logit_scale=1.0):
    """Per-row ``KL(pi || pi_ref)`` with ``pi = softmax(logit_scale * hidden @ weight.T / T)`` and
    ``pi_ref`` likewise from the reference side; ``(...)`` float32 (float64 for float64 inputs)."""
    log_p = torch.log_softmax(
        linear_logits(hidden, weight, logit_scale=logit_scale) / temperature, dim=-1)
    log_q = torch.log_softmax(
        linear_logits(ref_hidden, ref_weight, logit_scale=logit_scale) / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def plackett_luce_loss(scores, rewards, mask=None):
    """Per-list Plackett–Luce loss ``(B,)`` from ``scores, rewards (B, N)``, written from the
    definition with no sort: candidate k is still available when candidate i is chosen iff k
    ranks no higher (``r_k < r_i``, or ``r_k == r_i`` and ``k >= i``); the loss is
    ``sum_i [-s_i + logsumexp_{k available at i} s_k]`` over kept candidates. O(B·N²) memory."""
    n = scores.shape[-1]
    kept = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    r_i, r_k = rewards[..., :, None], rewards[..., None, :]
    index = torch.arange(n, device=scores.device)
    available = (r_k < r_i) | ((r_k == r_i) & (index[None, :] >= index[:, None]))
    available &= kept[..., None, :] & kept[..., :, None]
    pooled = torch.logsumexp(scores[..., None, :].masked_fill(~available, float("-inf")), dim=-1)
    per_choice = torch.where(kept, pooled - scores, 0.0)
    return per_choice.sum(-1).masked_fill((rewards.isnan() & kept).any(-1), float("nan"))
