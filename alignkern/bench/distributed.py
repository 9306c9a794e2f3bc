"""Vocabulary-parallel scoring on gloo ranks: alignkern against gathering the logits.

``python -m alignkern.bench.distributed [--world 2 4] [--sizes 512 2048] [--out DIR]`` starts
``world`` CPU processes with ``torch.multiprocessing`` (gloo, a ``file://`` store, a collective
timeout) and times one training step, forward + backward, of two ways to score N tokens when the
LM head (or the logits) is split by vocabulary across the ranks:

* ``alignkern``: ``alignkern.distributed.linear_logprobs`` (or ``token_logprobs``) on this rank's
  shard: all-reduces of O(N·(K + 1)) numbers in the forward, of ``dhidden`` (N·H) in the
  backward (``linear`` only);
* ``naive``: each rank computes its logits shard ``hidden @ W_shard.T``, all-gathers the
  ``(N, V_local)`` shards into ``(N, V)``, then ``log_softmax`` and ``gather``. Its backward is
  Megatron's ``gather_from_tensor_model_parallel_region``: the gradient of the gathered logits is
  split, each rank keeping its own slice (no communication: the loss is replicated), and the
  replicated hidden states get their gradient by an all-reduce (sum) of ``dhidden``, as in
  alignkern. (``torch.distributed.nn.functional.all_gather`` would instead sum the gathered
  gradient over the ranks, an all-to-all of N·V numbers that also multiplies the gradient by the
  world size for a replicated loss; we give the naive way its cheapest correct backward.)

What is counted as "bytes": in every rank, ``torch.distributed.all_reduce``, ``all_gather``,
``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``all_to_all`` and ``broadcast`` are
wrapped to add the **payload** of each call: the size of the tensor the collective leaves on the
rank (all-reduce / broadcast: the buffer; all-gather: the gathered result, ``world`` times the
input; reduce-scatter: its input). Not the bytes on the wire of the algorithm that carries it out
(a ring all-reduce sends about ``2·(p-1)/p`` times its buffer, a ring all-gather ``(p-1)/p`` of
its result); the ``ring_*`` columns give that estimate from the same calls. Barriers used for
timing are not counted. The bytes of rank 0 are reported (every rank moves the same).

Before timing, the values and gradients of both ways are compared (``torch.testing.assert_close``,
fp32 within 1e-4) on every rank. Time: the median over ``--steps`` steps after ``--warmup``
steps, each step between two barriers, on rank 0.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from alignkern.distributed._spawn import run_ranks

GROUP_TIMEOUT = datetime.timedelta(seconds=120)
OPS = ("linear_logprobs", "token_logprobs")
WAYS = ("alignkern", "naive")
DEFAULT_SIZES = (512, 2048)
COUNTED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
           "all_to_all", "broadcast")
FIELDS = ["op", "world", "N", "H", "V", "V_local", "K", "dtype", "way", "ms_median", "ms_min",
          "steps", "fwd_bytes", "bwd_bytes", "step_bytes", "ring_fwd_bytes", "ring_bwd_bytes",
          "collectives_fwd", "collectives_bwd"]

__all__ = ["FIELDS", "OPS", "WAYS", "expected_bytes", "main", "run"]


# ----------------------------------------------------------------------------- byte counting


class _Counter:
    """Per-phase payload bytes, ring wire-byte estimates and call counts of the wrapped
    collectives in this process."""

    def __init__(self):
        self.phase = None
        self.bytes: dict[str, int] = {}
        self.ring: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def reset(self):
        self.bytes, self.ring, self.calls = {}, {}, {}

    def add(self, payload: int, ring: float):
        if self.phase is None:
            return
        self.bytes[self.phase] = self.bytes.get(self.phase, 0) + payload
        self.ring[self.phase] = self.ring.get(self.phase, 0.0) + ring
        self.calls[self.phase] = self.calls.get(self.phase, 0) + 1


COUNTER = _Counter()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _world(kwargs, args, position) -> int:
    group = kwargs.get("group", args[position] if len(args) > position else None)
    return dist.get_world_size(group)


def _instrument() -> None:
    """Wrap the collectives of ``torch.distributed`` (module attributes, looked up at call time
    by alignkern and by the naive way alike) to count their payload."""
    if getattr(dist, "_alignkern_counted", False):
        return
    originals = {name: getattr(dist, name) for name in COUNTED}

    def all_reduce(tensor, *args, **kwargs):
        p = _world(kwargs, args, 1)
        COUNTER.add(_nbytes(tensor), 2 * (p - 1) / p * _nbytes(tensor))
        return originals["all_reduce"](tensor, *args, **kwargs)

    def all_gather(tensor_list, tensor, *args, **kwargs):
        out = sum(_nbytes(t) for t in tensor_list)
        p = len(tensor_list)
        COUNTER.add(out, (p - 1) / p * out)
        return originals["all_gather"](tensor_list, tensor, *args, **kwargs)

    def all_gather_into_tensor(output, tensor, *args, **kwargs):
        p = _world(kwargs, args, 0)
        COUNTER.add(_nbytes(output), (p - 1) / p * _nbytes(output))
        return originals["all_gather_into_tensor"](output, tensor, *args, **kwargs)

    def reduce_scatter_tensor(output, tensor, *args, **kwargs):
        p = _world(kwargs, args, 1)
        COUNTER.add(_nbytes(tensor), (p - 1) / p * _nbytes(tensor))
        return originals["reduce_scatter_tensor"](output, tensor, *args, **kwargs)

    def all_to_all(output_list, input_list, *args, **kwargs):
        sent = sum(_nbytes(t) for t in input_list)
        p = len(input_list)
        COUNTER.add(sent, (p - 1) / p * sent)
        return originals["all_to_all"](output_list, input_list, *args, **kwargs)

    def broadcast(tensor, *args, **kwargs):
        COUNTER.add(_nbytes(tensor), float(_nbytes(tensor)))
        return originals["broadcast"](tensor, *args, **kwargs)

    for name, fn in dict(all_reduce=all_reduce, all_gather=all_gather,
                         all_gather_into_tensor=all_gather_into_tensor,
                         reduce_scatter_tensor=reduce_scatter_tensor, all_to_all=all_to_all,
                         broadcast=broadcast).items():
        setattr(dist, name, fn)
    dist._alignkern_counted = True


def expected_bytes(op: str, way: str, n: int, h: int, v_local: int, world: int, k: int = 1,
                   element_size: int = 4, setup: bool = True) -> tuple[int, int]:
    """``(forward, backward)`` payload bytes per rank and step, from what the code does: alignkern
    forward = the setup all-gather (16 int64 per rank, gathered) + an all-reduce (max) of N
    numbers + an all-reduce (sum) of N·(K + 1) numbers; backward = an all-reduce of N·H numbers
    (``linear`` only). Naive forward = the all-gather of the logits, N·V_local·world numbers;
    backward = the same N·H all-reduce (``linear`` only)."""
    dhidden = n * h * element_size if op == "linear_logprobs" else 0
    if way == "naive":
        return n * v_local * world * element_size, dhidden
    from alignkern.distributed.vocab_parallel import SETUP_FIELDS

    exchange = world * SETUP_FIELDS * 8 if setup else 0
    return exchange + n * element_size + n * (k + 1) * element_size, dhidden


# ----------------------------------------------------------------------------- the naive way


class _GatherLogits(torch.autograd.Function):
    """All-gather the ``(N, V_local)`` logits shards (equal sizes) into ``(N, V)``; the backward
    keeps this rank's slice of the gradient (Megatron's gather-from-tensor-parallel region)."""

    @staticmethod
    def forward(ctx, shard, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.rank, ctx.width = rank, shard.shape[-1]
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        start = ctx.rank * ctx.width
        return grad[..., start:start + ctx.width].contiguous(), None


def naive_token_logprobs(logits_shard, targets, group=None):
    full = _GatherLogits.apply(logits_shard, group)
    return torch.log_softmax(full.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def naive_linear_logprobs(hidden, weight_shard, targets, group=None):
    # The same dhidden all-reduce as alignkern's functions: only the forward differs.
    from alignkern.distributed.vocab_parallel import _CopyToShards

    logits = _CopyToShards.apply(hidden, group) @ weight_shard.T
    return naive_token_logprobs(logits, targets, group)


# ----------------------------------------------------------------------------- one rank


def _inputs(op, n, h, v, world, rank, dtype):
    gen = torch.Generator().manual_seed(1234 + n)
    v_local = v // world
    start = rank * v_local
    targets = torch.randint(0, v, (n,), generator=gen)
    grad = torch.randn(n, generator=gen)
    if op == "linear_logprobs":
        hidden = torch.randn(n, h, generator=gen).to(dtype)
        weight = (torch.randn(v, h, generator=gen) / h ** 0.5).to(dtype)
        return dict(hidden=hidden, shard=weight[start:start + v_local].clone(), targets=targets,
                    grad=grad)
    logits = (3 * torch.randn(n, v, generator=gen)).to(dtype)
    return dict(shard=logits[:, start:start + v_local].clone(), targets=targets, grad=grad)


def _step_fn(op, way, data):
    """A step: fresh leaves, forward (phase 'fwd'), backward (phase 'bwd'); returns the
    log-probs and the gradients."""
    import alignkern.distributed as akd

    def step():
        shard = data["shard"].detach().requires_grad_()
        hidden = data["hidden"].detach().requires_grad_() if "hidden" in data else None
        COUNTER.phase = "fwd"
        if op == "linear_logprobs":
            out = (akd.linear_logprobs(hidden, shard, data["targets"]) if way == "alignkern"
                   else naive_linear_logprobs(hidden, shard, data["targets"]))
        else:
            out = (akd.token_logprobs(shard, data["targets"]) if way == "alignkern"
                   else naive_token_logprobs(shard, data["targets"]))
        COUNTER.phase = "bwd"
        (out * data["grad"].to(out.dtype)).sum().backward()
        COUNTER.phase = None
        return out.detach(), shard.grad, None if hidden is None else hidden.grad

    return step


def _measure(rank, world, op, n, h, v, dtype, warmup, steps):
    data = _inputs(op, n, h, v, world, rank, dtype)
    fns = {way: _step_fn(op, way, data) for way in WAYS}
    # correctness first: both ways give the same values and gradients on every rank
    results = {way: fn() for way, fn in fns.items()}
    for name, got, want in zip(("logprobs", "dshard", "dhidden"), results["alignkern"],
                               results["naive"]):
        if got is not None or want is not None:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4,
                                       msg=lambda m, name=name: f"{op} N={n} {name}: {m}")
    rows = []
    for way, fn in fns.items():
        for _ in range(warmup):
            fn()
        COUNTER.reset()
        fn()  # the counted step
        counted = (dict(COUNTER.bytes), dict(COUNTER.ring), dict(COUNTER.calls))
        times = []
        for _ in range(steps):
            dist.barrier()
            start = time.perf_counter()
            fn()
            dist.barrier()
            times.append((time.perf_counter() - start) * 1e3)
        payload, ring, calls = counted
        rows.append(dict(op=op, world=world, N=n, H=h if op == "linear_logprobs" else 0, V=v,
                         V_local=v // world, K=1, dtype=str(dtype).removeprefix("torch."),
                         way=way, ms_median=round(statistics.median(times), 3),
                         ms_min=round(min(times), 3), steps=steps,
                         fwd_bytes=payload.get("fwd", 0), bwd_bytes=payload.get("bwd", 0),
                         step_bytes=payload.get("fwd", 0) + payload.get("bwd", 0),
                         ring_fwd_bytes=round(ring.get("fwd", 0.0)),
                         ring_bwd_bytes=round(ring.get("bwd", 0.0)),
                         collectives_fwd=calls.get("fwd", 0), collectives_bwd=calls.get("bwd", 0)))
    return rows


def _worker(rank, world, store, result_file, plan, warmup, steps, threads):
    os.environ.setdefault("ALIGNKERN_BACKEND", "cpu")
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=GROUP_TIMEOUT)
    _instrument()
    try:
        rows = []
        for op, n, h, v in plan:
            rows += _measure(rank, world, op, n, h, v, torch.float32, warmup, steps)
        if rank == 0:
            Path(result_file).write_text(json.dumps(rows))
        dist.barrier()
    except BaseException as exc:
        raise RuntimeError(f"rank {rank}/{world} failed:\n{traceback.format_exc()}") from exc
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- driver


def run(world: int, plan: list[tuple[str, int, int, int]], *, warmup: int = 1, steps: int = 5,
        threads: int = 1, limit_s: float = 600.0) -> list[dict]:
    """Start ``world`` gloo ranks, measure every ``(op, N, H, V)`` of ``plan`` and return the rows
    (V must divide by ``world``). Raises if a rank fails or the ranks outlive ``limit_s``."""
    for _, _, _, v in plan:
        if v % world:
            raise ValueError(f"V = {v} does not divide by world = {world}")
    with tempfile.TemporaryDirectory(prefix="alignkern-dist-bench-") as tmp:
        result = os.path.join(tmp, "rows.json")
        run_ranks(_worker, (world, os.path.join(tmp, "store"), result, plan, warmup, steps,
                            threads), world, limit_s)
        return json.loads(Path(result).read_text())


def _mb(b: float) -> str:
    return f"{b / 1e6:.3f}" if b < 1e7 else f"{b / 1e6:.0f}"


def table(rows: list[dict]) -> str:
    """One line per (op, world, size): both ways' times and bytes, and naive / alignkern."""
    head = (f"{'op':<16}{'ranks':>6}{'N':>6}{'H':>5}{'V':>7}  {'ms ak':>8}{'ms naive':>9}"
            f"{'time x':>7}  {'MB ak fwd/bwd':>15}{'MB naive fwd/bwd':>18}{'fwd x':>8}{'step x':>8}")
    lines = [head, "-" * len(head)]
    keyed = {(r["op"], r["world"], r["N"], r["way"]): r for r in rows}
    for r in rows:
        if r["way"] != "alignkern":
            continue
        a, b = r, keyed[(r["op"], r["world"], r["N"], "naive")]
        ak = f"{_mb(a['fwd_bytes'])}/{_mb(a['bwd_bytes'])}"
        nv = f"{_mb(b['fwd_bytes'])}/{_mb(b['bwd_bytes'])}"
        lines.append(f"{a['op']:<16}{a['world']:>6}{a['N']:>6}{a['H']:>5}{a['V']:>7}  "
                     f"{a['ms_median']:>8.1f}{b['ms_median']:>9.1f}"
                     f"{b['ms_median'] / a['ms_median']:>7.2f}  {ak:>15}{nv:>18}"
                     f"{b['fwd_bytes'] / a['fwd_bytes']:>8.0f}"
                     f"{b['step_bytes'] / a['step_bytes']:>8.1f}")
    lines.append("ms: median per step (fwd+bwd); x: naive / alignkern; MB: payload per rank "
                 "(see the module docstring)")
    return "\n".join(lines)


def write_csv(rows: list[dict], folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "distributed.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignkern.bench.distributed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                        help="numbers of tokens N")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", default=None, help="folder for distributed.csv")
    args = parser.parse_args(argv)
    plan = [(op, n, args.hidden, args.vocab) for op in args.ops for n in args.sizes]
    rows: list[dict] = []
    for world in args.world:
        started = time.perf_counter()
        rows += run(world, plan, warmup=args.warmup, steps=args.steps, threads=args.threads)
        print(f"{world} ranks: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print(table(rows))
    if args.out:
        print(f"CSV: {write_csv(rows, args.out)}")
    return 0


if __name__ == "__main__":
    # run the importable module's main, so that the spawned ranks find _worker by its name
    from alignkern.bench.distributed import main as _main

    sys.exit(_main())
