"""Start ranks in fresh processes and never wait on them forever (the communication benchmark and
the distributed tests)."""

from __future__ import annotations

import time

import torch.multiprocessing as mp


def run_ranks(fn, args: tuple, nprocs: int, limit_s: float) -> None:
    """``fn(rank, *args)`` in ``nprocs`` spawned processes; re-raises a rank's failure, and kills
    the ranks and raises ``TimeoutError`` when they outlive ``limit_s`` seconds."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + limit_s
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{nprocs} ranks did not finish within {limit_s:.0f} s")
