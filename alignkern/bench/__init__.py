"""The benchmark runner behind ``alignkern bench``: every op family's cases against its peers on the
present device; a table on stdout; a CSV, a Markdown table, a PNG and a JSON of the environment in a
new folder (``./alignkern-bench/<device>-<UTC time>/`` unless told otherwise).

An op family is a module with:

* ``KERNEL`` (its name), ``providers(device) -> {name: function or 'missing: why'}``,
  ``cases(device, quick) -> [Case]`` (``quick=False``: every case), ``runs(found) -> [(mode,
  name)]``, ``forward_fn(provider, *inputs)`` and ``forward_backward_fn(provider, *inputs)``
  returning a no-argument step to time;
* a ``Case`` with ``label``, ``x`` (the swept size), ``make_inputs(device)``, ``bytes_moved(mode)``
  and ``flops(mode)``, optionally ``dtype`` and ``items(mode) -> (count, noun)`` (a loss's
  throughput: tokens or candidates per second);
* optionally ``PROVIDERS`` (every name ``providers`` can return, for ``--help`` and ``--providers``
  checks), ``GPU_ONLY`` (those that run only on a GPU), ``default_cases(device)`` (the CPU default
  run's representative cases) and ``SWEPT = (key, axis title)``.
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import fused_linear_dpo as fused_linear_dpo_cases
from . import linear_kl as linear_kl_cases
from . import linear_logprobs as linear_logprobs_cases
from . import linear_logprobs_entropy as linear_logprobs_entropy_cases
from . import measure, report
from . import plackett_luce as plackett_luce_cases
from . import reward_attention as reward_attention_cases
from . import token_logprobs as token_logprobs_cases
from .report import BOUNDS, Result

FAMILIES = {"token_logprobs": token_logprobs_cases, "linear_logprobs": linear_logprobs_cases,
            "linear_logprobs_entropy": linear_logprobs_entropy_cases,
            "reward_attention": reward_attention_cases,
            "fused_linear_dpo_loss": fused_linear_dpo_cases, "linear_kl": linear_kl_cases,
            "plackett_luce_loss": plackett_luce_cases}
OPS = tuple(FAMILIES)
SCOPES = ("quick", "default", "full")
# CPU: seconds of timed runs per case and mode (GPU: do_bench decides). The default run times one
# representative case per op family and mode, so that it ends within 3 minutes on 2 cores.
BUDGET_S = {"quick": 0.5, "default": 4.0, "full": 8.0}
# CPU, default run: when it runs late (a slow or busy machine), the remaining cases share what is
# left of this many seconds (at least MIN_BUDGET_S of timed runs each).
TARGET_S = {"default": 120.0}
MIN_BUDGET_S = 0.5
OUT_ROOT = "alignkern-bench"

__all__ = ["BUDGET_S", "FAMILIES", "OPS", "SCOPES", "BenchError", "Result", "RunOutput",
           "bench_family", "default_out_dir", "prepare_out_dir", "provider_names", "run",
           "select_cases"]


class BenchError(ValueError):
    """A request the bench cannot carry out (unknown names, no checkout to save results into)."""


def provider_names(module) -> tuple[str, ...]:
    """Every provider a family can have, on any device."""
    names = getattr(module, "PROVIDERS", None)
    return tuple(names) if names else tuple(module.providers(torch.device("cpu")))


def select_cases(module, device: torch.device, scope: str) -> list:
    """quick: the smallest cases; full: all of them; default: on GPU all of them (the sizes of
    the design), on CPU the family's representative cases (``default_cases``)."""
    if scope not in SCOPES:
        raise BenchError(f"unknown scope {scope!r}; choose from {', '.join(SCOPES)}")
    if scope == "quick":
        return module.cases(device, True)
    if scope == "full" or device.type == "cuda" or not hasattr(module, "default_cases"):
        return module.cases(device, False)
    return module.default_cases(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _failure(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return f"failed: {type(exc).__name__}: {text[:500]}"


def _result(module, case, mode: str, name: str) -> Result:
    items = case.items(mode) if hasattr(case, "items") else None
    dtype = getattr(case, "dtype", None)
    return Result(module.KERNEL, name, mode, case.label, case.x, case.bytes_moved(mode),
                  flops=case.flops(mode), work=items[0] if items else 0.0,
                  work_unit=items[1] if items else "",
                  dtype=str(dtype).removeprefix("torch.") if dtype is not None else "")


class _Progress:
    """tqdm over (case, mode) steps on stderr when it is a terminal; else one plain line per op
    family (a log gets no carriage-return frames); nothing with ``enabled=False``."""

    def __init__(self, total: int, enabled: bool):
        self.bar, self.total, self.completed = None, total, 0
        self.lines = enabled and not sys.stderr.isatty()
        if enabled and not self.lines:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self.lines = True
            else:
                self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True,
                                leave=False, disable=None)

    def family(self, text: str) -> None:
        if self.lines:
            print(f"alignkern bench: {text}", file=sys.stderr, flush=True)

    def step(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(label[:60], refresh=False)

    def done(self) -> None:
        self.completed += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def bench_family(module, device: torch.device, cases: list, only: set[str] | None = None,
                 budget_s: float | Callable[[], float] = BUDGET_S["default"],
                 progress: _Progress | None = None) -> list[Result]:
    """Every (case, mode, provider) of one op family. For each case and mode the providers are
    warmed up (compiled) and then timed together, taking turns (measure.time_interleaved)."""
    if hasattr(module, "SWEPT"):
        report.SWEPT.setdefault(module.KERNEL, tuple(module.SWEPT))
    found = module.providers(device)
    if only:
        found = {k: v for k, v in found.items()
                 if k in only or report.is_ours(k) or k in BOUNDS}
    pairs = module.runs(found)
    modes = list(dict.fromkeys(mode for mode, _ in pairs))
    results: list[Result] = []
    for case in cases:
        inputs = case.make_inputs(device)
        for mode in modes:
            if progress is not None:
                progress.step(f"{module.KERNEL} {case.label} {mode}")
            make = module.forward_fn if mode == "fwd" else module.forward_backward_fn
            rows: dict[str, Result] = {}
            fns, first_ms = {}, {}
            for name in (n for m, n in pairs if m == mode):
                result = rows[name] = _result(module, case, mode, name)
                results.append(result)
                provider = found[name]
                if isinstance(provider, str):
                    result.note = provider
                    continue
                try:
                    start = time.perf_counter()
                    fn = make(provider, *inputs)
                    fn()  # warm-up: compilation, first-call allocations
                    measure.synchronize(device)
                    result.warmup_s = time.perf_counter() - start
                    # the second call measures peak memory, and is the first timed run
                    elapsed: list[float] = []

                    def timed(fn=fn, elapsed=elapsed):
                        start = time.perf_counter()
                        fn()
                        measure.synchronize(device)
                        elapsed.append((time.perf_counter() - start) * 1e3)

                    if measure.sees_allocations_of(name, device):
                        result.peak_bytes = measure.peak_memory_bytes(timed, device)
                    else:
                        timed()
                    if device.type == "cuda" or measure.measures_resident_set():
                        first_ms[name] = elapsed[0]  # (the profiler would slow that call)
                    fns[name] = fn
                except Exception as exc:  # noqa: BLE001 - a peer that fails is reported
                    result.note, result.peak_bytes = _failure(exc), None
                    _release(device)
            budget = budget_s() if callable(budget_s) else budget_s
            timings = (measure.time_interleaved(fns, device, budget_s=budget, first_ms=first_ms)
                       if fns else {})
            for name, timing in timings.items():
                result = rows[name]
                if isinstance(timing, Exception):
                    result.note, result.peak_bytes = _failure(timing), None
                    continue
                result.ms, result.samples = timing.as_tuple(), timing.samples
            fns = None
            _release(device)
            if progress is not None:
                progress.done()
        del inputs
        _release(device)
    return results


def default_out_dir(device: torch.device, now: datetime.datetime | None = None) -> Path:
    """./alignkern-bench/<device>-<UTC time>/, made unique if that folder exists already."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    base = Path.cwd() / OUT_ROOT / f"{report.device_slug(device)}-{now:%Y%m%dT%H%M%SZ}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def prepare_out_dir(folder: str | os.PathLike, what: str = "--out") -> Path:
    """Create ``folder`` (and its parents) and check that a file can be written in it, before
    anything is measured: a folder the results cannot go into is a BenchError naming it (``what``
    says which option gave it), not an OSError after the whole run."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        if path.exists() and not path.is_dir():
            reason = "it is a file, not a folder"
        else:
            reason = f"{type(exc).__name__}: {exc.strerror or exc}"
        raise BenchError(f"{what} {str(folder)!r}: cannot write the results there ({reason}); "
                         f"give a folder that can be created and written") from None
    return path


@dataclass
class RunOutput:
    results: list[Result]
    out_dir: Path
    files: list[str] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)  # copies under benchmarks/results/
    wall_s: float = 0.0
    interrupted: bool = False  # stopped early; the finished op families were written


def _write_all(results, device, folder: Path, env: dict, plot: bool) -> list[str]:
    files = [report.write_csv(results, device, folder, env),
             report.write_markdown(results, device, folder, env)]
    if plot:
        pngs = report.write_plots(results, device, folder, env)
        if isinstance(pngs, str):
            print(pngs)
        else:
            files += pngs
    files.append(report.write_json(env, device, folder))
    return files


def check_names(ops, providers) -> None:
    """Raise BenchError naming the valid choices for an unknown op family or provider."""
    unknown = [op for op in ops if op not in FAMILIES]
    if unknown:
        raise BenchError(f"unknown op {unknown[0]!r}; choose from: {', '.join(OPS)}")
    if providers:
        valid = list(dict.fromkeys(p for op in ops for p in provider_names(FAMILIES[op])))
        bad = [p for p in providers if p not in valid]
        if bad:
            scope = "" if set(ops) == set(OPS) else f" for {', '.join(ops)}"
            raise BenchError(f"unknown provider {bad[0]!r}{scope}; choose from: {', '.join(valid)}")


def run(device: torch.device, *, scope: str = "default", ops: tuple[str, ...] = OPS,
        providers: set[str] | None = None, out_dir: str | os.PathLike | None = None,
        save_results: bool = False, plot: bool = True, progress: bool = True,
        budget_s: float | None = None, quick: bool = False,
        command: list[str] | None = None) -> RunOutput:
    """Run the benchmarks, print the table, write CSV, Markdown, PNG and JSON into ``out_dir``
    (default: a new ``./alignkern-bench/<device>-<UTC time>/``) and, with ``save_results``, the
    same files into the checkout's ``benchmarks/results/``. Raises BenchError, before anything
    is measured, for unknown names and for an output folder that cannot be created or written."""
    scope = "quick" if quick else scope
    ops = tuple(ops)
    check_names(ops, providers)
    repo = report.repository_root() if save_results else None
    if save_results and repo is None:
        raise BenchError("--save-results writes into an alignkern checkout's benchmarks/results/; "
                         "run it from the repository (none found here or above)")
    # Where the results go is checked (and created) before minutes of measuring, not after.
    folder = prepare_out_dir(out_dir if out_dir is not None else default_out_dir(device),
                             "--out" if out_dir is not None else "the default output folder")
    if save_results:
        prepare_out_dir(repo / "benchmarks" / "results", "--save-results")
    started = time.perf_counter()
    budget = BUDGET_S[scope] if budget_s is None else budget_s
    env = report.environment(device, scope=scope, ops=list(ops),
                             providers=sorted(providers) if providers else "all",
                             budget_s_per_case=budget if device.type != "cuda" else None,
                             target_s=TARGET_S.get(scope) if budget_s is None else None,
                             command=command)
    plan = [(op, select_cases(FAMILIES[op], device, scope)) for op in ops]
    steps = sum(len(cases) * len({m for m, _ in FAMILIES[op].runs(FAMILIES[op].providers(device))})
                for op, cases in plan)
    bar = _Progress(steps, progress)
    target = TARGET_S.get(scope) if budget_s is None and device.type != "cuda" else None

    def case_budget() -> float:
        """The fixed budget, or less when the run is behind its target time."""
        if target is None:
            return budget
        left = target - (time.perf_counter() - started)
        return max(MIN_BUDGET_S, min(budget, left / max(1, bar.total - bar.completed)))

    results: list[Result] = []
    interrupted = False
    try:
        for index, (op, cases) in enumerate(plan, 1):
            elapsed = time.perf_counter() - started
            bar.family(f"[{elapsed // 60:.0f}:{elapsed % 60:02.0f}] {op} ({index}/{len(plan)}), "
                       f"{len(cases)} case(s)")
            results += bench_family(FAMILIES[op], device, cases, providers, case_budget, bar)
    except KeyboardInterrupt:
        # Ctrl-C, or a time limit's SIGINT (benchmarks/gpu_check.sh): keep the finished families.
        interrupted = True
        print("\nInterrupted: writing the op families finished so far.", file=sys.stderr)
    finally:
        bar.close()
    wall = time.perf_counter() - started
    env["run"]["wall_s"] = round(wall, 1)
    env["run"]["interrupted"] = interrupted
    env["run"]["warmup_s"] = round(sum(r.warmup_s for r in results), 1)
    env["run"]["warmup_s_by_provider"] = {
        f"{r.kernel} {r.mode} {r.provider}": round(r.warmup_s, 2) for r in results
        if r.warmup_s >= 1}
    try:
        env["cpu"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    print(report.table(results, device, env))
    output = RunOutput(results, folder.resolve(), wall_s=wall, interrupted=interrupted)
    output.files = _write_all(results, device, folder, env, plot)
    if save_results:
        output.saved = _write_all(results, device, repo / "benchmarks" / "results", env, plot)
    names = ", ".join(os.path.basename(f) for f in output.files)
    warmup = env["run"]["warmup_s"]
    print(f"\nTook {wall / 60:.1f} min ({warmup:.0f} s of it first calls: compilation, warm-up).")
    print(f"Results in {output.out_dir}{os.sep} ({names})")
    if output.saved:
        saved = ", ".join(os.path.basename(f) for f in output.saved)
        print(f"Saved as the committed results in {os.path.dirname(output.saved[0])}{os.sep} ({saved})")
    print(f"\n{report.summary(results).line()}")
    return output
