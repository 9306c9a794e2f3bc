"""alignkern.distributed's setup exchange on 2 gloo CPU ranks: a rank that cannot run its backend,
hidden states that differ between ranks, and out-of-range ids with ``ALIGNKERN_VALIDATE=0``.

Every check runs in one group (starting ranks costs seconds): ``_worker`` runs them in order and
raises on the first failure, which fails the spawn. The group's collective timeout is short, so
that a rank left waiting in a collective (the bug these checks guard against) turns into an error
within seconds instead of a wait for the spawn's wall-clock limit.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist

from alignkern.distributed._spawn import run_ranks

GROUP_TIMEOUT = datetime.timedelta(seconds=15)
SPAWN_LIMIT_S = 120
WORLD = 2
SIZES = [9, 6]  # rank 0 holds ids [0, 9), rank 1 ids [9, 15)
VOCAB = sum(SIZES)
HIDDEN_SIZE = 5


@contextlib.contextmanager
def _env(**values):
    """Set (or, for None, remove) environment variables inside the block, on this rank only."""
    saved = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def _expect_error(rank, name, kinds, words, call):
    """``call()`` must raise one of ``kinds`` whose message contains every one of ``words``."""
    try:
        call()
    except kinds as exc:
        missing = [word for word in words if word not in str(exc)]
        assert not missing, f"{name} (rank {rank}): {missing} not in {exc!r}"
        return
    except Exception as exc:
        raise AssertionError(f"{name} (rank {rank}): expected {kinds}, got {exc!r}") from exc
    raise AssertionError(f"{name} (rank {rank}): no error raised")


def _inputs(seed=3):
    """Replicated full inputs: logits (4, V), hidden (4, H), the full head, targets (4,)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, VOCAB, generator=gen)
    hidden = torch.randn(4, HIDDEN_SIZE, generator=gen)
    weight = torch.randn(VOCAB, HIDDEN_SIZE, generator=gen)
    targets = torch.tensor([0, VOCAB - 1, SIZES[0], -100])
    return logits, hidden, weight, targets


def _shard(rank):
    start = sum(SIZES[:rank])
    return start, SIZES[rank]


# ----------------------------------------------------------------------------- the checks


def _check_backend_on_one_rank(rank):
    """Rank 1 cannot run its backend (an unknown ALIGNKERN_BACKEND; the triton backend on CPU
    tensors without the interpreter): every rank raises, rank 1 saying why, rank 0 naming rank 1,
    for each kind of function; the group is still usable afterwards."""
    import alignkern
    import alignkern.distributed as akd

    logits, hidden, weight, targets = _inputs()
    start, size = _shard(rank)
    calls = {
        "token_logprobs": lambda: akd.token_logprobs(logits[:, start:start + size], targets),
        "linear_logprobs": lambda: akd.linear_logprobs(hidden, weight[start:start + size],
                                                       targets),
        "option_logprobs": lambda: akd.option_logprobs(hidden, weight[start:start + size],
                                                       torch.tensor([1, VOCAB - 1])),
        "linear_kl": lambda: akd.linear_kl(hidden, weight[start:start + size], hidden,
                                           weight[start:start + size]),
    }
    ways = {
        "bogus": (lambda: _env(ALIGNKERN_BACKEND="bogus"), ValueError, ["'bogus'"],
                  "an unknown ALIGNKERN_BACKEND"),
        "triton": (lambda: _triton_without_interpreter(alignkern), RuntimeError,
                   ["'triton' is not available", "TRITON_INTERPRET"], "'triton'"),
    }
    for way, (misconfigure, kind, why, shown) in ways.items():
        for fn, call in calls.items():
            name = f"{fn} with {way} on rank 1"
            if rank == 1:
                with misconfigure():
                    _expect_error(rank, name, kind, [fn, "rank 1", *why], call)
            else:
                _expect_error(rank, name, RuntimeError,
                              [fn, "rank(s) [1]", "cannot run the alignkern backend",
                               f"rank 1: {shown}"], call)
    # nothing is left pending: the next call works on every rank
    got = akd.token_logprobs(logits[:, start:start + size], targets)
    torch.testing.assert_close(got, alignkern.token_logprobs(logits, targets))


@contextlib.contextmanager
def _triton_without_interpreter(alignkern):
    with _env(TRITON_INTERPRET="0", ALIGNKERN_BACKEND=None), alignkern.use_backend("triton"):
        yield


def _check_hidden_differs(rank):
    """Hidden states (and linear_kl's reference hidden states and mask) that differ between the
    ranks, by one ulp of one element, raise on every rank when validating; equal ones pass; with
    ALIGNKERN_VALIDATE=0 they are not checked."""
    import alignkern
    import alignkern.distributed as akd

    _, hidden, weight, targets = _inputs()
    start, size = _shard(rank)
    w = weight[start:start + size]
    nudged = hidden.clone()
    if rank == 1:
        nudged[2, 3] = torch.nextafter(nudged[2, 3], torch.tensor(1e9))
    words = ["disagree on the hidden states", "rank(s) [1]"]
    _expect_error(rank, "linear_logprobs, hidden differs", ValueError,
                  ["linear_logprobs", *words],
                  lambda: akd.linear_logprobs(nudged, w, targets))
    _expect_error(rank, "sequence_logprobs, hidden differs", ValueError,
                  ["sequence_logprobs", *words],
                  lambda: akd.sequence_logprobs(nudged[None], w, targets[None]))
    _expect_error(rank, "self_eval_scores, hidden differs", ValueError,
                  ["self_eval_scores", *words],
                  lambda: akd.self_eval_scores(nudged, w, torch.tensor([1, 10])))
    _expect_error(rank, "linear_kl, hidden differs", ValueError, ["linear_kl", *words],
                  lambda: akd.linear_kl(nudged, w, hidden, w))
    _expect_error(rank, "linear_kl, ref_hidden differs", ValueError, ["linear_kl", *words],
                  lambda: akd.linear_kl(hidden, w, nudged, w))
    mask = torch.tensor([True, True, rank == 0, True])
    _expect_error(rank, "linear_kl, mask differs", ValueError, ["linear_kl", *words],
                  lambda: akd.linear_kl(hidden, w, hidden, w, mask))
    # a row permutation keeps every sum of the elements: the checksum still sees it
    swapped = hidden[[1, 0, 2, 3]] if rank == 1 else hidden
    _expect_error(rank, "linear_logprobs, rows swapped", ValueError, ["linear_logprobs", *words],
                  lambda: akd.linear_logprobs(swapped, w, targets))
    # equal hidden states (a non-contiguous view on one rank, a copy on the other) pass
    view = torch.stack([hidden, -hidden], -1)[..., 0] if rank == 0 else hidden.clone()
    assert torch.equal(view, hidden) and view.is_contiguous() == (rank == 1)
    got = akd.linear_logprobs(view, w, targets)
    torch.testing.assert_close(got, alignkern.linear_logprobs(hidden, weight, targets))
    with _env(ALIGNKERN_VALIDATE="0"):
        akd.linear_logprobs(nudged, w, targets)  # not checked: no error


def _check_out_of_range_without_validation(rank):
    """With ALIGNKERN_VALIDATE=0, ids outside [0, V) that are not ignore_index give NaN in their
    own element (and NaN gradients in their row), as the single-process ops give on the full
    inputs; every other element equals them. With and without an explicit vocab_start and
    vocab_size."""
    import alignkern
    import alignkern.distributed as akd

    logits, hidden, weight, _ = _inputs()
    start, size = _shard(rank)
    targets = torch.tensor([[VOCAB, 2], [-3, -100], [VOCAB + 7, SIZES[0]], [VOCAB - 1, 0]])
    g = torch.randn(targets.shape, generator=torch.Generator().manual_seed(7))
    placements = {"rank order": {}, "vocab_start": dict(vocab_start=start),
                  "vocab_start and vocab_size": dict(vocab_start=start, vocab_size=VOCAB)}
    with _env(ALIGNKERN_VALIDATE="0"):
        full_logits, full_hidden, full_weight = (t.clone().requires_grad_()
                                                 for t in (logits, hidden, weight))
        want_tokens = alignkern.token_logprobs(full_logits, targets, return_lse=True)
        (want_tokens.logprobs * g).sum().backward()
        want_linear = alignkern.linear_logprobs(full_hidden, full_weight, targets)
        (want_linear * g).sum().backward()
        want_options = alignkern.option_logprobs(hidden, weight, torch.tensor([3, VOCAB]))
        stats = ("entropy", "is_top1", "max_logits")
        want_stats = alignkern.linear_logprobs(hidden, weight, targets, stats=stats)
        assert want_linear.isnan().sum() == 3 and not want_linear[3].isnan().any()
        for placement, where in placements.items():
            name = f"out of range, {placement}"
            shard_logits = logits[:, start:start + size].clone().requires_grad_()
            got = akd.token_logprobs(shard_logits, targets, return_lse=True, **where)
            (got.logprobs * g).sum().backward()
            _same(f"{name}: token_logprobs", got.logprobs, want_tokens.logprobs)
            _same(f"{name}: token_logprobs lse", got.lse, want_tokens.lse)
            _same(f"{name}: token_logprobs dlogits", shard_logits.grad,
                  full_logits.grad[:, start:start + size])
            h, w = hidden.clone().requires_grad_(), weight[start:start + size].clone()
            w.requires_grad_()
            got = akd.linear_logprobs(h, w, targets, **where)
            (got * g).sum().backward()
            _same(f"{name}: linear_logprobs", got, want_linear)
            _same(f"{name}: linear_logprobs dhidden", h.grad, full_hidden.grad)
            _same(f"{name}: linear_logprobs dweight", w.grad,
                  full_weight.grad[start:start + size])
            got = akd.linear_logprobs(hidden, weight[start:start + size], targets, stats=stats,
                                      **where)
            for field in ("logprobs", "lse", "entropy", "max_logits"):
                _same(f"{name}: stats {field}", getattr(got, field), getattr(want_stats, field))
            assert torch.equal(got.is_top1, want_stats.is_top1), f"{name}: stats is_top1"
            _same(f"{name}: option_logprobs",
                  akd.option_logprobs(hidden, weight[start:start + size],
                                      torch.tensor([3, VOCAB]), **where), want_options)


def _same(name, got, want):
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True,
                               msg=lambda m: f"{name}: {m}")


def _check_local_error_without_exchange(rank):
    """With ALIGNKERN_VALIDATE=0, vocab_start and vocab_size there is no setup exchange: a rank
    whose own arguments are invalid raises its own error at once, without entering a collective
    that the other ranks never join (here rank 0 makes no call at all)."""
    import alignkern.distributed as akd

    logits, hidden, weight, targets = _inputs()
    start, size = _shard(rank)
    with _env(ALIGNKERN_VALIDATE="0"):
        if rank == 1:
            where = dict(vocab_start=start, vocab_size=VOCAB)
            _expect_error(rank, "local error, no exchange", TypeError, ["targets must be int"],
                          lambda: akd.token_logprobs(logits[:, start:], targets.float(), **where))
            _expect_error(rank, "local options error, no exchange", ValueError, ["non-empty 1-D"],
                          lambda: akd.option_logprobs(hidden, weight[start:],
                                                      torch.tensor([[1, 2]]), **where))


# ----------------------------------------------------------------------------- the group


def _worker(rank, world, init_file, checks):
    os.environ["ALIGNKERN_BACKEND"] = "cpu"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=GROUP_TIMEOUT)
    try:
        for check in checks:
            try:
                globals()[check](rank)
            except BaseException as exc:
                raise AssertionError(f"rank {rank}/{world}: {check} failed:\n"
                                     f"{traceback.format_exc()}") from exc
            dist.barrier()
    finally:
        dist.destroy_process_group()


def test_setup_exchange(tmp_path):
    """A rank that cannot run its backend, hidden states that differ between ranks and a local
    error without the exchange raise on every rank (no rank waits in a collective); out-of-range
    ids without validation give NaN as the single-process ops do."""
    checks = ["_check_backend_on_one_rank", "_check_hidden_differs",
              "_check_out_of_range_without_validation", "_check_local_error_without_exchange"]
    try:
        run_ranks(_worker, (WORLD, str(tmp_path / "store"), checks), WORLD, SPAWN_LIMIT_S)
    except TimeoutError as exc:
        pytest.fail(str(exc))
