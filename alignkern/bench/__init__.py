"""The benchmark runner behind ``alignkern bench``: every op family's cases against its peers on the
present device; a table on stdout, a CSV and a PNG under the output directory."""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass

import torch

from . import fused_linear_dpo as fused_linear_dpo_cases
from . import linear_kl as linear_kl_cases
from . import linear_logprobs as linear_logprobs_cases
from . import measure, report
from . import plackett_luce as plackett_luce_cases
from . import reward_attention as reward_attention_cases
from . import token_logprobs as token_logprobs_cases

FAMILIES = {"token_logprobs": token_logprobs_cases, "linear_logprobs": linear_logprobs_cases,
            "reward_attention": reward_attention_cases,
            "fused_linear_dpo_loss": fused_linear_dpo_cases, "linear_kl": linear_kl_cases,
            "plackett_luce_loss": plackett_luce_cases}
OPS = tuple(FAMILIES)


@dataclass
class Result:
    kernel: str
    provider: str
    mode: str
    config: str
    x: int
    bytes_moved: int
    ms: tuple[float, float, float] | None = None  # p50, p20, p80
    peak_bytes: int | None = None
    note: str = ""
    flops: int = 0  # compute-bound kernels report TFLOP/s instead of GB/s

    @property
    def gbps(self) -> float | None:
        return None if self.ms is None else self.bytes_moved / (self.ms[0] * 1e-3) / 1e9

    @property
    def tflops(self) -> float | None:
        return None if self.ms is None else self.flops / (self.ms[0] * 1e-3) / 1e12


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled and total > 0

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 30
        filled = width * self.done // self.total
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {label[:60]:<60}")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_family(module, device: torch.device, quick: bool, only: set[str] | None,
                 progress_enabled: bool) -> list[Result]:
    """Every (case, mode, provider) of one op family's benchmark module."""
    cases = module.cases(device, quick)
    found = module.providers(device)
    if only:
        found = {k: v for k, v in found.items() if k in only or k == "alignkern"}
    pairs = module.runs(found)
    progress = Progress(len(cases) * len(pairs), progress_enabled)
    results: list[Result] = []
    for case in cases:
        inputs = case.make_inputs(device)
        for mode, name in pairs:
            provider = found[name]
            progress.step(f"{case.label} {mode} {name}")
            result = Result(module.KERNEL, name, mode, case.label, case.x, case.bytes_moved(mode),
                            flops=case.flops(mode))
            results.append(result)
            if isinstance(provider, str):
                result.note = provider
                continue
            make = module.forward_fn if mode == "fwd" else module.forward_backward_fn
            try:
                fn = make(provider, *inputs)
                result.ms = measure.time_ms(fn, device)
                if measure.sees_allocations_of(name, device):
                    result.peak_bytes = measure.peak_memory_bytes(fn, device)
            except Exception as exc:  # a peer that fails here (OOM, compile error) is reported
                result.ms = None
                result.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            fn = None
            _release(device)
        del inputs
        _release(device)
    return results


def run(device: torch.device, *, quick: bool = False, ops: tuple[str, ...] = OPS,
        providers: set[str] | None = None, out_dir: str = "benchmarks/results",
        plot: bool = True, progress: bool = True) -> list[Result]:
    """Run the benchmarks, print the table, write the CSV (and the PNG when matplotlib exists)."""
    results: list[Result] = []
    for op in ops:
        if op not in FAMILIES:
            raise ValueError(f"alignkern bench: unknown op {op!r}; expected one of {OPS}")
        results += bench_family(FAMILIES[op], device, quick, providers, progress)
    print(report.table(results, device))
    csv_path = report.write_csv(results, device, out_dir)
    print(f"\nwrote {csv_path} and {report.write_markdown(results, device, out_dir)}")
    if plot:
        png = report.write_plot(results, device, out_dir)
        print(f"wrote {png}" if png.endswith(".png") else png)
    return results
