"""alignkern.distributed on the gloo backend: 2 and 4 CPU ranks, each started by
``torch.multiprocessing``; every result and gradient equals the single-process op on the full
vocabulary, and a bad setup raises the same clear error on every rank without hanging.

All checks of one world size run in one group (starting ranks costs seconds each): ``_worker``
runs them in order and raises on the first mismatch, which fails the spawn. Each group has a
30 s collective timeout and each spawn a wall-clock limit, so a bug cannot hang the suite.
"""

from __future__ import annotations

import datetime
import math
import os
import traceback

import pytest
import torch
import torch.distributed as dist

from alignkern.distributed._spawn import run_ranks

GROUP_TIMEOUT = datetime.timedelta(seconds=30)
SPAWN_LIMIT_S = 150

# (vocabulary sizes of the shards, in rank order): uneven, odd.
SHARDS = {2: [20, 17], 4: [7, 20, 13, 13]}


def _tolerance(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-11, rtol=1e-11)


def _close(name, got, want, dtype):
    torch.testing.assert_close(got, want, **_tolerance(dtype), msg=lambda m: f"{name}: {m}")


def _bounds(rank, sizes, order=None):
    """(start, size) of this rank's shard; ``order`` lists the ranks from the start of the
    vocabulary (default: rank order)."""
    order = list(range(len(sizes))) if order is None else order
    start = 0
    for r in order:
        if r == rank:
            return start, sizes[r]
        start += sizes[r]
    raise AssertionError("rank not in order")


def _targets(gen, lead, vocab, sizes, k=None, ignore_index=-100):
    """Random ids with, in every row, ids from different shards, and some ignored slots/rows."""
    shape = (*lead, k) if k else lead
    ids = torch.randint(0, vocab, shape, generator=gen)
    flat = ids.view(-1)
    # the first and last id of the vocabulary (first and last shard), and each shard's first id
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    for i, value in enumerate([0, vocab - 1, *starts]):
        if i < flat.numel():
            flat[(7 * i + 3) % flat.numel()] = value
    flat[1::5] = ignore_index
    return ids


# ----------------------------------------------------------------------------- the checks


def _check_token_logprobs(rank, world, dtype, k, explicit_start):
    import alignkern
    import alignkern.distributed as akd

    sizes = SHARDS[world]
    vocab = sum(sizes)
    order = list(reversed(range(world))) if explicit_start else None
    start, size = _bounds(rank, sizes, order)
    gen = torch.Generator().manual_seed(11 + world)
    lead = (3, 5)
    logits = (3 * torch.randn(*lead, vocab, generator=gen)).to(dtype)
    targets = _targets(gen, lead, vocab, sizes, k)
    g_out = torch.randn(targets.shape, generator=gen, dtype=torch.float64)
    g_lse = torch.randn(lead, generator=gen, dtype=torch.float64)

    full = logits.clone().requires_grad_()
    want = alignkern.token_logprobs(full, targets, temperature=0.7, return_lse=True)
    ((want.logprobs * g_out.to(want.logprobs.dtype)).sum()
     + (want.lse * g_lse.to(want.lse.dtype)).sum()).backward()

    shard = logits[..., start:start + size].clone().requires_grad_()
    got = akd.token_logprobs(shard, targets, temperature=0.7, return_lse=True,
                             vocab_start=start if explicit_start else None, vocab_size=vocab)
    ((got.logprobs * g_out.to(got.logprobs.dtype)).sum()
     + (got.lse * g_lse.to(got.lse.dtype)).sum()).backward()
    name = f"token_logprobs[{dtype}, k={k}]"
    _close(f"{name} logprobs", got.logprobs, want.logprobs, dtype)
    _close(f"{name} lse", got.lse, want.lse, dtype)
    _close(f"{name} dlogits", shard.grad, full.grad[..., start:start + size], dtype)
    assert bool((got.logprobs[targets == -100] == 0).all()), f"{name}: ignored slots not 0"
    # plain call (no lse), int32 targets
    plain = akd.token_logprobs(shard.detach(), targets.to(torch.int32), temperature=0.7,
                               vocab_start=start if explicit_start else None)
    _close(f"{name} int32", plain, want.logprobs.detach(), dtype)


def _head(gen, world, dtype, hidden_size=19, bias=True):
    sizes = SHARDS[world]
    vocab = sum(sizes)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / 2).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    return vocab, weight, b


def _leaf(t):
    return None if t is None else t.clone().requires_grad_()


def _full_and_sharded(loss, hidden, weight, b, targets, start, size, **settings):
    """``(want, got, full leaves, shard leaves)``: the single-process op on the full head and the
    vocabulary-parallel op on this rank's rows ``[start, start + size)``, each backpropagated
    through ``loss``; the leaves are (hidden, weight, bias or None) with their ``.grad``."""
    import alignkern
    import alignkern.distributed as akd

    full = (_leaf(hidden), _leaf(weight), _leaf(b))
    want = alignkern.linear_logprobs(full[0], full[1], targets, bias=full[2], **settings)
    loss(want).backward()
    shard = (_leaf(hidden), _leaf(weight[start:start + size]),
             None if b is None else _leaf(b[start:start + size]))
    got = akd.linear_logprobs(shard[0], shard[1], targets, bias=shard[2], **settings)
    loss(got).backward()
    return want, got, full, shard


def _check_linear_logprobs(rank, world, dtype, k, bias, softcap):
    sizes = SHARDS[world]
    start, size = _bounds(rank, sizes)
    gen = torch.Generator().manual_seed(23 + world)
    vocab, weight, b = _head(gen, world, dtype, bias=bias)
    lead = (2, 7)
    hidden = torch.randn(*lead, weight.shape[1], generator=gen).to(dtype)
    targets = _targets(gen, lead, vocab, sizes, k)
    g_out = torch.randn(targets.shape, generator=gen, dtype=torch.float64)
    g_lse = torch.randn(lead, generator=gen, dtype=torch.float64)
    settings = dict(temperature=1.3, softcap=softcap, logit_scale=0.8, return_lse=True)

    def loss(result):
        return ((result.logprobs * g_out.to(result.logprobs.dtype)).sum()
                + (result.lse * g_lse.to(result.lse.dtype)).sum())

    want, got, (h_full, w_full, b_full), (h, w, b_shard) = _full_and_sharded(
        loss, hidden, weight, b, targets, start, size, **settings)
    name = f"linear_logprobs[{dtype}, k={k}, bias={bias}, softcap={softcap}]"
    _close(f"{name} logprobs", got.logprobs, want.logprobs, dtype)
    _close(f"{name} lse", got.lse, want.lse, dtype)
    _close(f"{name} dhidden", h.grad, h_full.grad, dtype)
    _close(f"{name} dweight", w.grad, w_full.grad[start:start + size], dtype)
    if b is not None:
        _close(f"{name} dbias", b_shard.grad, b_full.grad[start:start + size], dtype)


def _check_linear_logprobs_stats(rank, world, dtype, k, softcap):
    """The fused statistics over the shards equal the single-process op's, the entropy's gradient
    (with the log-probabilities', random upstream) included; targets include each row's first
    maximum, and a copy of it in another shard (a tie the first shard must win)."""
    import alignkern
    import alignkern.distributed as akd

    sizes = SHARDS[world]
    start, size = _bounds(rank, sizes)
    gen = torch.Generator().manual_seed(31 + world)
    vocab, weight, b = _head(gen, world, dtype)
    weight[vocab - 1], b[vocab - 1] = weight[2], b[2]  # ids 2 and V - 1 tie, in different shards
    lead = (3, 5)
    hidden = torch.randn(*lead, weight.shape[1], generator=gen).to(dtype)
    hidden[0, :3] = weight[2] * 4  # rows where id 2 (and so V - 1) is the maximum
    targets = _targets(gen, lead, vocab, sizes, k)
    first_max = alignkern.reference.linear_logits(hidden, weight, b, softcap, 0.8).argmax(-1)
    slot = targets[..., 0] if k else targets
    slot[1:] = first_max[1:]
    if k:
        targets[0, :, 1] = vocab - 1
    g_out = torch.randn(targets.shape, generator=gen, dtype=torch.float64)
    g_entropy = torch.randn(lead, generator=gen, dtype=torch.float64)
    stats = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "max_logits")
    settings = dict(temperature=1.3, softcap=softcap, logit_scale=0.8, stats=stats)

    def loss(result):
        return ((result.logprobs * g_out.to(result.logprobs.dtype)).sum()
                + (result.entropy * g_entropy.to(result.entropy.dtype)).sum())

    want, got, (h_full, w_full, b_full), (h, w, b_shard) = _full_and_sharded(
        loss, hidden, weight, b, targets, start, size, **settings)
    name = f"linear_logprobs stats[{dtype}, k={k}, softcap={softcap}]"
    for field in ("logprobs", "lse", "entropy", "log_sum_sq_probs", "mean_logits", "max_logits"):
        _close(f"{name} {field}", getattr(got, field), getattr(want, field), dtype)
    assert torch.equal(got.is_top1, want.is_top1), f"{name} is_top1"
    assert want.is_top1.any() and not want.is_top1.all(), f"{name}: a weak is_top1 check"
    _close(f"{name} dhidden", h.grad, h_full.grad, dtype)
    _close(f"{name} dweight", w.grad, w_full.grad[start:start + size], dtype)
    _close(f"{name} dbias", b_shard.grad, b_full.grad[start:start + size], dtype)
    only_max = akd.linear_logprobs(hidden, weight[start:start + size], targets,
                                   bias=b[start:start + size], stats=("max_logits",))
    _close(f"{name} max_logits alone", only_max.max_logits,
           alignkern.linear_logprobs(hidden, weight, targets, bias=b,
                                     stats=("max_logits",)).max_logits, dtype)


def _check_scoring(rank, world, dtype):
    """option_logprobs, self_eval_scores, sequence_logprobs and fused_linear_dpo_loss."""
    import alignkern
    import alignkern.distributed as akd

    sizes = SHARDS[world]
    start, size = _bounds(rank, sizes)
    gen = torch.Generator().manual_seed(37 + world)
    vocab, weight, b = _head(gen, world, dtype)
    w_shard = weight[start:start + size]
    b_shard = b[start:start + size]
    hidden = torch.randn(5, weight.shape[1], generator=gen).to(dtype)
    # options on the first, last and middle shards
    options = torch.tensor([vocab - 1, 0, sizes[0], vocab // 2])
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])

    # option_logprobs + self_eval_scores, with gradients
    h_full, w_full = _leaf(hidden), _leaf(weight)
    want_opt = alignkern.option_logprobs(h_full, w_full, options, bias=b, softcap=4.0)
    want_eval = alignkern.self_eval_scores(h_full, w_full, options, values, bias=b, softcap=4.0)
    g1 = torch.randn(want_opt.shape, generator=gen).to(want_opt.dtype)
    g2 = torch.randn(want_eval.score.shape, generator=gen).to(want_opt.dtype)
    ((want_opt * g1).sum() + (want_eval.score * g2).sum() + want_eval.mass.sum()).backward()
    h, w = _leaf(hidden), _leaf(w_shard)
    got_opt = akd.option_logprobs(h, w, options, bias=b_shard, softcap=4.0)
    got_eval = akd.self_eval_scores(h, w, options, values, bias=b_shard, softcap=4.0)
    ((got_opt * g1).sum() + (got_eval.score * g2).sum() + got_eval.mass.sum()).backward()
    _close("option_logprobs", got_opt, want_opt, dtype)
    _close("self_eval_scores.score", got_eval.score, want_eval.score, dtype)
    _close("self_eval_scores.mass", got_eval.mass, want_eval.mass, dtype)
    _close("option/self_eval dhidden", h.grad, h_full.grad, dtype)
    _close("option/self_eval dweight", w.grad, w_full.grad[start:start + size], dtype)
    two = torch.tensor([1, vocab - 2])  # default values (+1, -1)
    _close("self_eval_scores default values",
           akd.self_eval_scores(hidden, w_shard, two, bias=b_shard).score,
           alignkern.self_eval_scores(hidden, weight, two, bias=b).score, dtype)

    # sequence_logprobs (mask, mean) and fused_linear_dpo_loss (reference from a head)
    seq_hidden = torch.randn(4, 9, weight.shape[1], generator=gen).to(dtype)
    targets = _targets(gen, (4, 9), vocab, sizes)
    mask = torch.rand(4, 9, generator=gen) > 0.3
    for reduction in ("sum", "mean"):
        h_full, w_full = _leaf(seq_hidden), _leaf(weight)
        want = alignkern.sequence_logprobs(h_full, w_full, targets, mask, reduction=reduction,
                                           temperature=0.9)
        g = torch.randn(want.shape, generator=gen).to(want.dtype)
        (want * g).sum().backward()
        h, w = _leaf(seq_hidden), _leaf(w_shard)
        got = akd.sequence_logprobs(h, w, targets, mask, reduction=reduction, temperature=0.9)
        (got * g).sum().backward()
        _close(f"sequence_logprobs[{reduction}]", got, want, dtype)
        _close(f"sequence_logprobs[{reduction}] dhidden", h.grad, h_full.grad, dtype)
        _close(f"sequence_logprobs[{reduction}] dweight", w.grad,
               w_full.grad[start:start + size], dtype)

    ref_weight = weight + 0.1 * torch.randn(weight.shape, generator=gen).to(dtype)
    ref_hidden = seq_hidden + 0.1
    h_full, w_full = _leaf(seq_hidden), _leaf(weight)
    want = alignkern.losses.fused_linear_dpo_loss(h_full, w_full, targets, mask,
                                                  ref_hidden=ref_hidden, ref_weight=ref_weight,
                                                  beta=0.3, logit_scale=1.1)
    want.loss.backward()
    h, w = _leaf(seq_hidden), _leaf(w_shard)
    got = akd.fused_linear_dpo_loss(h, w, targets, mask, ref_hidden=ref_hidden,
                                    ref_weight=ref_weight[start:start + size], beta=0.3,
                                    logit_scale=1.1)
    got.loss.backward()
    for field in got._fields:
        _close(f"fused_linear_dpo_loss.{field}", getattr(got, field), getattr(want, field), dtype)
    _close("fused_linear_dpo_loss dhidden", h.grad, h_full.grad, dtype)
    _close("fused_linear_dpo_loss dweight", w.grad, w_full.grad[start:start + size], dtype)


def _check_linear_kl(rank, world, dtype):
    """linear_kl: values and gradients (hidden, weight shard; the reference side gets none, as in
    the single-process op) with a mask, temperature and logit_scale, and a reference head with
    another hidden size."""
    import alignkern
    import alignkern.distributed as akd

    sizes = SHARDS[world]
    start, size = _bounds(rank, sizes)
    gen = torch.Generator().manual_seed(41 + world)
    vocab, weight, _ = _head(gen, world, dtype, bias=False)
    ref_weight = torch.randn(vocab, 11, generator=gen).to(dtype)
    hidden = torch.randn(3, 6, weight.shape[1], generator=gen).to(dtype)
    ref_hidden = torch.randn(3, 6, 11, generator=gen).to(dtype)
    mask = torch.rand(3, 6, generator=gen) > 0.25
    for masked, settings in ((False, dict(temperature=0.9)),
                             (True, dict(temperature=1.6, logit_scale=1.2))):
        m = mask if masked else None
        h_full, w_full, rh_full, rw_full = (_leaf(t) for t in (hidden, weight, ref_hidden,
                                                               ref_weight))
        want = alignkern.losses.linear_kl(h_full, w_full, rh_full, rw_full, m, **settings)
        g = torch.randn(want.shape, generator=gen).to(want.dtype)
        (want * g).sum().backward()
        h, w = _leaf(hidden), _leaf(weight[start:start + size])
        rh, rw = _leaf(ref_hidden), _leaf(ref_weight[start:start + size])
        got = akd.linear_kl(h, w, rh, rw, m, vocab_size=vocab, **settings)
        (got * g).sum().backward()
        name = f"linear_kl[{dtype}, mask={masked}, {settings}]"
        assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
        assert bool((want.detach() > 0.05).any()), f"{name}: degenerate test (KL ~ 0)"
        _close(f"{name} kl", got, want, dtype)
        _close(f"{name} dhidden", h.grad, h_full.grad, dtype)
        _close(f"{name} dweight", w.grad, w_full.grad[start:start + size], dtype)
        assert rh.grad is None and rw.grad is None and rh_full.grad is None, \
            f"{name}: the reference side got a gradient"
        if masked:
            assert bool((got[~mask] == 0).all()), f"{name}: masked positions not 0"


def _check_near_the_maximum(rank, world):
    """Three tied top logits, two in the first shard and one in the last, at T = 2^-17 (|z| ~ 1e6):
    each is log 1/3 on every rank, as float64 log_softmax says (the first shard's log-sum-exp,
    max + log 2 rounded to one float, lost every bit below its spacing of 1/16), and the entropy
    is log 3; linear_kl of logits shifted by a constant per row is 0."""
    import alignkern.distributed as akd

    sizes = SHARDS[world]
    vocab = sum(sizes)
    start, size = _bounds(rank, sizes)
    gen = torch.Generator().manual_seed(53)
    hidden = torch.randint(-3, 4, (4, 12), generator=gen).float() / 4
    weight = torch.randint(-3, 4, (vocab, 12), generator=gen).float() / 4
    tied = (0, 1, vocab - 1)  # two in the first shard, one in the last
    weight[list(tied)] = torch.sign(hidden[0]) * 3 / 4  # row 0's maximum, exact in any order
    targets = torch.tensor([list(tied)] * 4)
    temperature = 2.0**-17
    shard = slice(start, start + size)
    got = akd.linear_logprobs(hidden, weight[shard], targets, temperature=temperature,
                              stats=("entropy",))
    log_p = torch.log_softmax(hidden.double() @ weight.double().T / temperature, -1)
    torch.testing.assert_close(got.logprobs.double(), log_p.gather(-1, targets), rtol=1e-6,
                               atol=1e-6)
    assert (got.logprobs[0] + math.log(3)).abs().max() < 1e-6, got.logprobs[0]
    torch.testing.assert_close(got.entropy.double(), -(log_p.exp() * log_p).sum(-1), rtol=1e-6,
                               atol=1e-6)
    logits = hidden @ weight[shard].T
    tokens = akd.token_logprobs(logits, targets, temperature=temperature)
    torch.testing.assert_close(tokens.double(), log_p.gather(-1, targets), rtol=1e-6, atol=1e-6)
    shift = torch.arange(1.0, 5.0)[:, None] / 4
    ref_hidden = torch.cat([hidden, shift], 1)
    ref_weight = torch.cat([weight, torch.full((vocab, 1), 2.0)], 1)
    kl = akd.linear_kl(hidden, weight[shard], ref_hidden, ref_weight[shard],
                       temperature=temperature)
    assert float(kl.abs().max()) < 1e-6, kl


def _check_compiled(rank, world):
    """torch.compile (inductor) of linear_logprobs and linear_kl gives the eager values on every
    rank (linear_kl's forward once reduced a stacked tensor in place, which inductor got wrong)."""
    import alignkern.distributed as akd

    sizes = SHARDS[world]
    start, size = _bounds(rank, sizes)
    gen = torch.Generator().manual_seed(59)
    vocab, weight, _ = _head(gen, world, torch.float32, bias=False)
    hidden = torch.randn(3, weight.shape[1], generator=gen)
    targets = torch.randint(0, vocab, (3,), generator=gen)
    shard = weight[start:start + size]
    torch._dynamo.reset()
    compiled_logprobs = torch.compile(lambda h, w: akd.linear_logprobs(h, w, targets))
    compiled_kl = torch.compile(lambda h, w: akd.linear_kl(h, w, 0.5 * h, w))
    _close("compiled linear_logprobs", compiled_logprobs(hidden, shard),
           akd.linear_logprobs(hidden, shard, targets), torch.float32)
    _close("compiled linear_kl", compiled_kl(hidden, shard),
           akd.linear_kl(hidden, shard, 0.5 * hidden, shard), torch.float32)


def _expect_error(rank, name, kinds, words, call):
    """``call()`` must raise one of ``kinds`` whose message contains every one of ``words``."""
    try:
        call()
    except kinds as exc:
        missing = [word for word in words if word not in str(exc)]
        assert not missing, f"{name} (rank {rank}): {missing} not in {exc!r}"
        return
    raise AssertionError(f"{name} (rank {rank}): no error raised")


def _check_bad_setups(rank, world):
    """Each bad setup raises a clear error on every rank; the group stays usable after each."""
    import alignkern.distributed as akd

    sizes = SHARDS[world]
    vocab = sum(sizes)
    start, size = _bounds(rank, sizes)
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, vocab, generator=gen)
    shard = logits[:, start:start + size]
    targets = torch.tensor([0, vocab - 1, 3, -100])

    gap = start + (1 if rank == world - 1 else 0)
    _expect_error(rank, "gap", ValueError, ["do not tile", "a gap"],
                  lambda: akd.token_logprobs(shard, targets, vocab_start=gap))
    overlap = start - (1 if rank == world - 1 else 0)
    _expect_error(rank, "overlap", ValueError, ["do not tile", "an overlap"],
                  lambda: akd.token_logprobs(shard, targets, vocab_start=overlap))
    _expect_error(rank, "vocab_size", ValueError, [f"cover [0, {vocab})", "vocab_size"],
                  lambda: akd.token_logprobs(shard, targets, vocab_size=vocab + 1))
    _expect_error(rank, "start on some ranks", ValueError, ["vocab_start was given on rank(s) [0]"],
                  lambda: akd.token_logprobs(shard, targets,
                                             vocab_start=start if rank == 0 else None))
    rows = 4 if rank else 3
    _expect_error(rank, "N disagrees", ValueError, ["disagree on the number of rows N"],
                  lambda: akd.token_logprobs(shard[:rows], targets[:rows]))
    k = 2 if rank else 3
    _expect_error(rank, "K disagrees", ValueError, ["disagree on the number of targets per row K"],
                  lambda: akd.token_logprobs(shard, targets[:, None].expand(4, k)))
    hidden = torch.randn(4, 6, generator=gen)
    weight = torch.randn(vocab, 6, generator=gen)[start:start + size]
    _expect_error(rank, "K disagrees (linear)", ValueError, ["disagree on the number of targets"],
                  lambda: akd.linear_logprobs(hidden, weight, targets[:, None].expand(4, k)))
    bad = targets.clone()
    bad[2] = vocab
    _expect_error(rank, "id outside every shard", IndexError,
                  [f"target id {vocab} is outside every vocabulary shard", f"[0, {vocab})"],
                  lambda: akd.token_logprobs(shard, bad))
    _expect_error(rank, "negative id", IndexError, ["target id -3 is outside every"],
                  lambda: akd.linear_logprobs(hidden, weight, torch.tensor([-3, 0, 1, 2])))
    _expect_error(rank, "option outside every shard", IndexError, [f"target id {vocab + 4}"],
                  lambda: akd.option_logprobs(hidden, weight, torch.tensor([1, vocab + 4])))
    differing = targets.clone()
    differing[0] = rank
    _expect_error(rank, "targets disagree", ValueError, ["disagree on the target ids"],
                  lambda: akd.token_logprobs(shard, differing))
    _expect_error(rank, "settings disagree", ValueError, ["disagree on the scalar settings"],
                  lambda: akd.token_logprobs(shard, targets, temperature=1.0 + rank))
    # invalid inputs on one rank only: that rank's own error, "rank(s) [1]" on the others
    if rank == 1:
        _expect_error(rank, "one rank invalid", TypeError, ["targets must be int32 or int64"],
                      lambda: akd.token_logprobs(shard, targets.float()))
    else:
        _expect_error(rank, "one rank invalid", RuntimeError, ["rank(s) [1]", "invalid inputs"],
                      lambda: akd.token_logprobs(shard, targets))
    if rank == 0:
        _expect_error(rank, "one rank's options invalid", ValueError, ["non-empty 1-D"],
                      lambda: akd.option_logprobs(hidden, weight, torch.tensor([[1, 2]])))
    else:
        _expect_error(rank, "one rank's options invalid", RuntimeError, ["rank(s) [0]"],
                      lambda: akd.option_logprobs(hidden, weight, torch.tensor([1, 2])))
    # linear_kl: ref_weight has one row fewer than weight on the last rank only
    last = world - 1
    ref_rows = size - 1 if rank == last else size
    _expect_error(rank, "linear_kl ref_weight shard", ValueError if rank == last else RuntimeError,
                  ["linear_kl", "ref_weight" if rank == last else f"rank(s) [{last}]"],
                  lambda: akd.linear_kl(hidden, weight, hidden, weight[:ref_rows]))
    # the group still works, and shard_layout reports the layout
    layout = akd.shard_layout(size, vocab_size=vocab)
    assert layout == akd.ShardLayout(start, size, vocab, rank, world), layout
    _expect_error(rank, "shard_layout gap", ValueError, ["do not tile"],
                  lambda: akd.shard_layout(size, vocab_start=gap))


def _worker(rank, world, init_file, checks):
    os.environ["ALIGNKERN_BACKEND"] = "cpu"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=GROUP_TIMEOUT)
    try:
        for check, args in checks:
            try:
                globals()[check](rank, world, *args)
            except BaseException as exc:
                raise AssertionError(f"rank {rank}/{world}: {check}{args} failed:\n"
                                     f"{traceback.format_exc()}") from exc
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world, tmp_path, checks):
    try:
        run_ranks(_worker, (world, str(tmp_path / "store"), checks), world, SPAWN_LIMIT_S)
    except TimeoutError as exc:
        pytest.fail(str(exc))


CORRECTNESS = [
    ("_check_token_logprobs", (torch.float32, 3, False)),
    ("_check_token_logprobs", (torch.float64, None, True)),
    ("_check_linear_logprobs", (torch.float32, 3, True, 5.0)),
    ("_check_linear_logprobs", (torch.float64, None, False, None)),
    ("_check_linear_logprobs_stats", (torch.float32, 3, 5.0)),
    ("_check_linear_logprobs_stats", (torch.float64, None, None)),
    ("_check_scoring", (torch.float32,)),
    ("_check_linear_kl", (torch.float32,)),
]


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_matches_single_process(world, tmp_path):
    """token_logprobs, linear_logprobs, option_logprobs, self_eval_scores, sequence_logprobs,
    fused_linear_dpo_loss and linear_kl on uneven odd shards equal the full-vocabulary op, values and
    gradients (hidden, weight and bias shards, logits shard), fp32 within 1e-5, fp64 1e-11; then
    every bad setup raises the same kind of error on every rank."""
    checks = list(CORRECTNESS) if world == 4 else CORRECTNESS[:6] + [
        ("_check_scoring", (torch.float64,)), ("_check_linear_kl", (torch.float64,)),
        ("_check_compiled", ())]
    _spawn(world, tmp_path, checks + [("_check_near_the_maximum", ()), ("_check_bad_setups", ())])


def test_not_initialised_is_a_clear_error():
    import alignkern.distributed as akd

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="not initialised"):
        akd.token_logprobs(torch.randn(2, 5), torch.tensor([1, 2]))
