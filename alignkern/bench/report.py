"""What `alignkern bench` shows and writes: the terminal table, a Markdown copy of it, a tidy CSV,
a JSON description of the machine, and one figure (a grid of panels, one per op and mode).

Every output starts from a list of :class:`Result` rows and from :func:`assess`, which decides
once, for all of them, what is a result and what is noise:

* a row whose p20-p80 spread is above ``measure.NOISY_SPREAD`` of its median is "noisy";
* a ratio that contradicts a hard bound — alignkern faster than the bare GEMMs it runs
  (``matmul-floor``), or reading its input faster than one plain read of it (``read-ceiling``) —
  is not printed as a result: the row is "noisy" and a note says why;
* a peer that is missing or failed gets a status and one note, printed once below the table.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import textwrap
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import measure

CSV_FIELDS = ["kernel", "provider", "mode", "metric", "unit", "x", "p50", "p20", "p80", "samples",
              "status", "note", "config", "dtype", "device", "torch", "triton", "git_sha",
              "timestamp"]
CEILING = "read-ceiling"  # the provider that times a plain read: a ceiling, not a peer
FLOOR = "matmul-floor"  # the provider that times the bare GEMMs: a floor, not a peer
FLASH = "flash-ceiling"  # SDPA without bias or mask: a speed reference, not a peer
BOUNDS = (CEILING, FLOOR, FLASH)
# The size each family sweeps (the x axis of its panel, taken out of the series name) and its
# axis title. A family module may declare its own as SWEPT = (key, title).
SWEPT = {"token_logprobs": ("V", "vocabulary size V"), "linear_logprobs": ("V", "vocabulary size V"),
         "reward_attention": ("L", "sequence length L"),
         "fused_linear_dpo_loss": ("B*T", "tokens B*T"), "linear_kl": ("V", "vocabulary size V"),
         "plackett_luce_loss": ("N", "candidates per list N")}
MAX_WIDTH = 120  # the terminal table's widest line
MAX_COLUMNS = 4  # panels per row of the figure: throughput and peak memory, forward and backward
MAX_ROWS = 8  # op families (rows of panels) in one PNG before the figure is split, one PNG each
ROW_HEIGHT_IN = 2.9  # inches per row of panels
LOG_SPAN = 100  # a panel whose values differ by more than this factor gets a logarithmic axis
FIGURE_WIDTH_PX = 1600
DPI = 100


@dataclass
class Result:
    """One (op, case, mode, provider) measurement, or why there is none."""

    kernel: str
    provider: str
    mode: str
    config: str
    x: int
    bytes_moved: int = 0
    ms: tuple[float, float, float] | None = None  # p50, p20, p80
    peak_bytes: int | None = None
    note: str = ""  # why it is missing or failed
    flops: int = 0
    samples: int = 0  # timed runs behind ms (0: do_bench quantiles)
    work: float = 0.0  # items per call when work_unit names them ("tokens", "candidates")
    work_unit: str = ""
    dtype: str = ""
    warmup_s: float = 0.0  # the first call's time: compilation, first-call allocations

    @property
    def status(self) -> str:
        """'ok', or 'missing' / 'failed' (the note says why)."""
        if self.ms is not None:
            return "ok"
        return "failed" if self.note.startswith("failed") else "missing"

    @property
    def spread(self) -> float | None:
        if self.ms is None:
            return None
        return measure.Timing(*self.ms, self.samples).spread

    @property
    def unit(self) -> str:
        """What the throughput counts: 'B' (compulsory traffic), 'FLOP', or items ('tokens')."""
        if self.work_unit:
            return self.work_unit
        return "FLOP" if self.flops else ("B" if self.bytes_moved else "")

    def amount(self) -> float:
        if self.work_unit:
            return self.work
        return self.flops or self.bytes_moved

    def throughput(self, ms: float | None = None) -> float | None:
        """Work per second at the median time (or at ``ms``); None without a unit or a time."""
        if self.ms is None or not self.unit:
            return None
        return self.amount() / ((self.ms[0] if ms is None else ms) * 1e-3)

    @property
    def gbps(self) -> float | None:
        return None if self.ms is None else self.bytes_moved / (self.ms[0] * 1e-3) / 1e9

    @property
    def tflops(self) -> float | None:
        return None if self.ms is None else self.flops / (self.ms[0] * 1e-3) / 1e12


@dataclass
class Verdict:
    """What the report says about one row."""

    status: str = ""  # "", "noisy", "missing", "failed"
    speedup: float | None = None  # best peer's median / ours (ours only)
    speedup_doubtful: bool = False  # ours or that peer is noisy
    bound: str = ""  # '87% of read', '1.21x floor', '92% of flash', or 'noise'
    bound_kind: str = ""  # 'floor', 'read', 'flash'
    notes: list[str] = field(default_factory=list)  # printed once below the table


def is_ours(provider: str) -> bool:
    return provider.startswith("alignkern")


def _same_case(a: Result, b: Result) -> bool:
    return a.kernel == b.kernel and a.config == b.config and a.mode == b.mode


def _noisy(r: Result) -> bool:
    return r.ms is not None and r.spread > measure.NOISY_SPREAD


def assess(results: list[Result]) -> dict[int, Verdict]:
    """id(result) -> Verdict for every result."""
    verdicts = {id(r): Verdict() for r in results}
    for r in results:
        v = verdicts[id(r)]
        if r.ms is None:
            v.status = r.status
            v.notes.append(r.note or "missing")
            continue
        if _noisy(r):
            v.status = "noisy"
    for r in results:
        if r.ms is None or not is_ours(r.provider):
            continue
        v = verdicts[id(r)]
        peers = [p for p in results if _same_case(p, r) and p.ms is not None
                 and not is_ours(p.provider) and p.provider not in BOUNDS]
        if peers:
            best = min(peers, key=lambda p: p.ms[0])
            v.speedup = best.ms[0] / r.ms[0]
            v.speedup_doubtful = _noisy(r) or _noisy(best)
        bound = next((b for b in results if _same_case(b, r) and b.provider in BOUNDS
                      and b.ms is not None), None)
        if bound is None:
            continue
        v.bound_kind = {FLOOR: "floor", CEILING: "read", FLASH: "flash"}[bound.provider]
        if bound.provider == FLOOR:
            ratio = r.ms[0] / bound.ms[0]
            if ratio < 1:
                v.bound, v.status = "noise", "noisy"
                v.notes.append(f"{r.kernel} {r.config} {r.mode}: {r.provider} timed at "
                               f"{ratio:.2f}x the bare GEMMs it runs (matmul-floor), which cannot "
                               "be: timing noise, ratio withheld; rerun on a quieter machine")
            else:
                v.bound = f"{ratio:.2f}x floor"
        elif bound.provider == CEILING:
            share = bound.ms[0] / r.ms[0] * (r.bytes_moved / bound.bytes_moved
                                             if bound.bytes_moved else 1.0)
            if share > 1:
                v.bound, v.status = "noise", "noisy"
                v.notes.append(f"{r.kernel} {r.config} {r.mode}: {r.provider} read its input at "
                               f"{100 * share:.0f}% of the speed of one plain read of it "
                               "(read-ceiling), which cannot be: timing noise, ratio withheld")
            else:
                v.bound = f"{100 * share:.0f}% of read"
        else:  # FLASH: a reference speed, not a hard bound (SDPA's CPU kernels may be slower)
            v.bound = f"{100 * bound.ms[0] / r.ms[0]:.0f}% of flash"
    return verdicts


@dataclass
class Summary:
    """The verdict of a run in counts. A row is one (op, case, mode) in which alignkern (its
    fastest backend) and at least one peer (not a bound) have a median time."""

    rows: int = 0
    ahead: int = 0  # alignkern's median time below every peer's
    ahead_in_noise: int = 0  # of those, rows whose ratio is doubtful (alignkern or the peer noisy)
    memory_rows: int = 0  # rows where alignkern's peak memory and at least one peer's are known
    less_memory: int = 0  # alignkern's peak below every peer's whose peak is known
    same_memory: int = 0  # alignkern's peak equal to the lowest peer's

    def line(self) -> str:
        """'alignkern ahead of every peer in X of Y rows ...; at less peak memory in Z of W'."""
        if not self.rows:
            return "Summary: no row has both an alignkern time and a peer's time to compare."
        noise = f" ({self.ahead_in_noise} of them within noise)" if self.ahead_in_noise else ""
        text = f"Summary: alignkern ahead of every peer in {self.ahead} of {self.rows} rows{noise}"
        if self.memory_rows:
            same = f" (the same in {self.same_memory})" if self.same_memory else ""
            text += (f"; at less peak memory than every peer in {self.less_memory} of "
                     f"{self.memory_rows}{same}")
        return text + "."


SUMMARY_DEFINITION = (
    "Summary: a row is one op, shape and mode; alignkern is ahead in it when its fastest backend's "
    "median time is below the fastest peer's (the 'vs best peer' column above 1x; bounds are not "
    "peers), and at less peak memory when its peak is below that of every peer whose peak was "
    "measured.")


def summary(results: list[Result]) -> Summary:
    """Count the rows alignkern wins on time and on peak memory (see Summary)."""
    verdicts = assess(results)
    out = Summary()
    seen: set[tuple[str, str, str]] = set()
    for r in results:
        key = (r.kernel, r.config, r.mode)
        if key in seen or r.ms is None or not is_ours(r.provider):
            continue
        ours = min((o for o in results if _same_case(o, r) and o.ms is not None and is_ours(o.provider)),
                   key=lambda o: o.ms[0])
        verdict = verdicts[id(ours)]
        if verdict.speedup is None:  # no peer measured in this row
            continue
        seen.add(key)
        out.rows += 1
        if verdict.speedup > 1:
            out.ahead += 1
            out.ahead_in_noise += verdict.speedup_doubtful or verdict.status == "noisy"
        peaks = [p.peak_bytes for p in results if _same_case(p, r) and p.ms is not None
                 and p.peak_bytes is not None and not is_ours(p.provider) and p.provider not in BOUNDS]
        if ours.peak_bytes is None or not peaks:
            continue
        out.memory_rows += 1
        out.less_memory += ours.peak_bytes < min(peaks)
        out.same_memory += ours.peak_bytes == min(peaks)
    return out


# ------------------------------------------------------------------------------------ formatting

_PREFIXES = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")]


def scale(unit: str, values: list[float]) -> tuple[float, str]:
    """(divisor, label) that puts the largest of ``values`` in [1, 1000): 'GB/s', 'GFLOP/s',
    'k tokens/s'."""
    top = max((v for v in values if v is not None and math.isfinite(v)), default=0.0)
    allowed = _PREFIXES if unit not in ("B", "FLOP") else _PREFIXES[:-1]
    factor, prefix = next((p for p in allowed if top >= p[0]), allowed[-1])
    if unit in ("B", "FLOP"):
        return factor, f"{prefix}{unit}/s"
    return factor, f"{prefix + ' ' if prefix else ''}{unit}/s"


def unit_title(unit: str) -> str:
    """What a family's throughput counts, for the legend and the axis."""
    return {"B": "compulsory memory traffic", "FLOP": "matrix-product FLOPs"}.get(unit, unit)


def fmt_ms(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.1f}"
    if ms >= 10:
        return f"{ms:.2f}"
    if ms >= 0.1:
        return f"{ms:.3f}"
    return f"{ms:.4f}"


def fmt_value(value: float) -> str:
    """Three significant digits, no exponent for the values a table shows."""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


# ------------------------------------------------------------------------------------ environment

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """File-name form: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3', CPU -> 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "missing"


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def repository_root() -> Path | None:
    """The alignkern source checkout this package comes from (an editable install), else the
    current directory or one above it if it is an alignkern checkout; None when neither is."""
    here = Path(__file__).resolve().parents[2]
    candidates = [here, *[p for p in [Path.cwd(), *Path.cwd().parents]]]
    for root in candidates:
        pyproject = root / "pyproject.toml"
        try:
            if (root / "benchmarks").is_dir() and 'name = "alignkern"' in pyproject.read_text():
                return root
        except OSError:
            continue
    return None


def _git(*args: str) -> str:
    root = repository_root()
    if root is None:
        return ""
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=5, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def git_sha() -> str:
    return _git("rev-parse", "--short", "HEAD") or "unknown"


def environment(device: torch.device, **run: object) -> dict:
    """Versions, device, git, CPU model, threads and load: what the JSON next to the CSV holds."""
    import alignkern

    env: dict = {
        "alignkern": alignkern.__version__, "python": platform.python_version(),
        "torch": torch.__version__, "triton": triton_version(),
        "numpy": _package_version("numpy"), "matplotlib": _package_version("matplotlib"),
        "peers": {name: _package_version(name) for name in ("liger-kernel", "cut-cross-entropy")},
        "git_sha": git_sha(), "git_dirty": bool(_git("status", "--porcelain",
                                                      "--untracked-files=no")),
        "device": {"type": device.type, "name": device_name(device)},
        "cpu": {"model": cpu_model(), "logical_cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                "os": platform.platform()},
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        env["cpu"]["load_average_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"].update(cuda=torch.version.cuda, memory_gib=round(props.total_memory / 2**30, 1),
                             multiprocessors=props.multi_processor_count,
                             capability=f"{props.major}.{props.minor}")
    env["timing"] = {
        "method": ("triton.testing.do_bench quantiles (L2 flushed between runs)"
                   if device.type == "cuda" else
                   "time.perf_counter; the providers of a case take turns, one run each per round"),
        "target_spread": measure.TARGET_SPREAD, "noisy_spread": measure.NOISY_SPREAD,
        "min_runs": measure.MIN_REPS}
    env["run"] = run
    return env


def _dtypes(results: list[Result]) -> str:
    seen = list(dict.fromkeys(r.dtype for r in results if r.dtype))
    return ", ".join(seen) or "float32"


def title(results: list[Result], device: torch.device, env: dict | None = None) -> str:
    env = env or {}
    where = device_name(device)
    if device.type != "cuda":
        where += f", {cpu_model()}"
    return (f"alignkern bench on {where} · {_dtypes(results)} · alignkern "
            f"{env.get('alignkern', _alignkern_version())}, torch {torch.__version__}, "
            f"triton {triton_version()} · git {env.get('git_sha') or git_sha()}")


def _alignkern_version() -> str:
    import alignkern

    return alignkern.__version__


# ------------------------------------------------------------------------------------ the table

def _families(results: list[Result]) -> dict[str, list[Result]]:
    grouped: dict[str, list[Result]] = {}
    for r in results:
        grouped.setdefault(r.kernel, []).append(r)
    return grouped


def _cases(rows: list[Result]) -> dict[str, list[Result]]:
    grouped: dict[str, list[Result]] = {}
    for r in rows:
        grouped.setdefault(r.config, []).append(r)
    return grouped


class _Notes:
    """Numbered notes: each distinct text once, with the providers (per op) it applies to."""

    def __init__(self):
        self.texts: dict[str, int] = {}
        self.where: dict[str, dict[str, list[str]]] = defaultdict(dict)

    def ref(self, text: str, kernel: str, provider: str) -> str:
        number = self.texts.setdefault(text, len(self.texts) + 1)
        providers = self.where[text].setdefault(kernel, [])
        if provider not in providers:
            providers.append(provider)
        return f"[{number}]"

    def lines(self, width: int = MAX_WIDTH) -> list[str]:
        out = []
        for text, number in self.texts.items():
            if text.startswith(("missing", "failed")):
                where = "; ".join(f"{', '.join(providers)} in {kernel}"
                                  for kernel, providers in self.where[text].items())
                text = f"{text} ({where})"
            out += textwrap.wrap(text, width, initial_indent=f"[{number}] ",
                                 subsequent_indent="    ", break_on_hyphens=False)
        return out


def _family_columns(rows: list[Result], verdicts: dict[int, Verdict]) -> tuple[list[str], float, str]:
    """The columns this family needs; a throughput column only when its rows count something."""
    unit = next((r.unit for r in rows if r.unit), "")
    factor, label = scale(unit, [r.throughput() for r in rows if r.throughput()]) if unit else (1, "")
    columns = ["mode", "provider", "median ms", "spread"]
    if unit:
        columns.append(label)
    columns += ["peak MiB", "vs best peer"]
    if any(verdicts[id(r)].bound for r in rows):
        columns.append("vs bound")
    columns.append("status")
    return columns, factor, unit


def _cells(r: Result, verdict: Verdict, columns: list[str], factor: float, notes: _Notes) -> list:
    status = verdict.status
    for text in verdict.notes:
        status = f"{status} {notes.ref(text, r.kernel, r.provider)}".strip()
    cells = {"mode": r.mode, "provider": r.provider, "status": status}
    if r.ms is not None:
        cells["median ms"] = fmt_ms(r.ms[0])
        cells["spread"] = f"{100 * r.spread:.0f}%"
        thr = r.throughput()
        if thr is not None:
            cells[columns[4]] = fmt_value(thr / factor)
        cells["peak MiB"] = "n/a" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.1f}"
        if verdict.speedup is not None:
            cells["vs best peer"] = f"{verdict.speedup:.2f}x" + ("?" if verdict.speedup_doubtful
                                                                 else "")
        cells["vs bound"] = verdict.bound
    else:
        cells["median ms"] = "-"
    return [cells.get(c, "") for c in columns]


_NUMERIC = {"median ms", "spread", "peak MiB", "vs best peer"}


def _legend(results: list[Result], verdicts: dict[int, Verdict], device: torch.device) -> list[str]:
    lines = [
        "median ms: one call's median time over the timed runs"
        + (" (triton do_bench)." if device.type == "cuda" else
           "; on CPU the providers of a case take turns, so load from other processes hits all."),
        f"spread: (p80 - p20) / median of those runs; 'noisy' above "
        f"{100 * measure.NOISY_SPREAD:.0f}%"
        + ("" if device.type == "cuda" else
           f" (runs repeat until it is under {100 * measure.TARGET_SPREAD:.0f}% or the case's time "
           "budget is spent)") + ".",
        "throughput (GB/s, GFLOP/s, tokens/s, ...): the work of one call / its median time; "
        "higher is better.",
        "peak MiB: how far memory rose during one call"
        + ("." if device.type == "cuda" else " (the process's resident set)."),
    ]
    if any(v.speedup is not None for v in verdicts.values()):
        lines.append("vs best peer: the fastest peer's median time / alignkern's; above 1x "
                     "alignkern is faster; '?': one of the two is noisy.")
        lines.append(SUMMARY_DEFINITION)
    kinds = {v.bound_kind for v in verdicts.values() if v.bound_kind}
    if kinds:
        parts = []
        if "floor" in kinds:
            parts.append("'x floor': alignkern's time / the bare GEMMs it runs (matmul-floor), "
                         "at least 1x")
        if "read" in kinds:
            parts.append("'% of read': alignkern's bandwidth / one plain read of the logits "
                         "(read-ceiling), at most 100%")
        if "flash" in kinds:
            parts.append("'% of flash': alignkern's speed / SDPA with no bias and no mask "
                         "(flash-ceiling), a reference that a slower SDPA kernel lets it exceed")
        lines.append("vs bound: " + "; ".join(parts)
                     + "; a ratio past a hard bound is timing noise and is shown as 'noise'.")
    return lines


def table(results: list[Result], device: torch.device, env: dict | None = None) -> str:
    """The terminal table: one block per op family, one sub-heading per case; every line at most
    MAX_WIDTH characters; the reasons behind 'missing', 'failed' and noise notes below it."""
    verdicts = assess(results)
    notes = _Notes()
    lines = textwrap.wrap(title(results, device, env), MAX_WIDTH, subsequent_indent="  ")
    for kernel, rows in _families(results).items():
        columns, factor, unit = _family_columns(rows, verdicts)
        body = [(case, [_cells(r, verdicts[id(r)], columns, factor, notes) for r in case_rows])
                for case, case_rows in _cases(rows).items()]
        widths = [max([len(c)] + [len(row[i]) for _, rs in body for row in rs])
                  for i, c in enumerate(columns)]

        def line(cells, widths=widths, columns=columns):
            return "  ".join(cell.rjust(w) if col in _NUMERIC or col.endswith("/s") else cell.ljust(w)
                             for cell, w, col in zip(cells, widths, columns)).rstrip()

        what = f" (throughput: {unit_title(unit)} per second)" if unit else ""
        lines += ["", f"{kernel}{what}", "  " + line(columns),
                  "  " + "  ".join("-" * w for w in widths)]
        for case, case_rows in body:
            lines.append(f"  {case}")
            lines += ["  " + line(row) for row in case_rows]
    lines.append("")
    for item in _legend(results, verdicts, device):
        lines += textwrap.wrap(item, MAX_WIDTH, subsequent_indent="  ")
    if notes.texts:
        lines += ["", "Notes:"] + notes.lines()
    return "\n".join(lines)


def markdown(results: list[Result], device: torch.device, env: dict | None = None) -> str:
    """The same results as Markdown tables (one per op family), the notes and the legend."""
    verdicts = assess(results)
    notes = _Notes()
    lines = [title(results, device, env), "", f"**{summary(results).line()}**"]
    for kernel, rows in _families(results).items():
        columns, factor, unit = _family_columns(rows, verdicts)
        header = ["shape", *columns[:3], "p20-p80 ms", *columns[3:]]
        what = f" (throughput: {unit_title(unit)} per second)" if unit else ""
        lines += ["", f"**{kernel}**{what}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for r in rows:
            cells = _cells(r, verdicts[id(r)], columns, factor, notes)
            spread = (f"{fmt_ms(r.ms[1])}-{fmt_ms(r.ms[2])}" if r.ms is not None else "")
            lines.append("| " + " | ".join([r.config, *cells[:3], spread, *cells[3:]]) + " |")
    lines += [""] + [f"- {item}" for item in _legend(results, verdicts, device)]
    if notes.texts:
        lines += [""] + [f"{line}  " for line in notes.lines(width=10_000)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ files

def write_markdown(results, device: torch.device, out_dir: str | os.PathLike,
                   env: dict | None = None) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{device_slug(device)}.md")
    with open(path, "w") as f:
        f.write(markdown(results, device, env))
    return path


def write_json(env: dict, device: torch.device, out_dir: str | os.PathLike) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{device_slug(device)}.json")
    with open(path, "w") as f:
        json.dump(env, f, indent=2, default=str)
        f.write("\n")
    return path


def write_csv(results, device: torch.device, out_dir: str | os.PathLike,
              env: dict | None = None) -> str:
    """Tidy: one row per (result, metric). Units are fixed (ms, GB/s, TFLOP/s, <items>/s, MiB);
    p20/p80 of a throughput are those of the time, so p20 <= p50 <= p80 throughout."""
    os.makedirs(out_dir, exist_ok=True)
    env = env or environment(device)
    verdicts = assess(results)
    path = os.path.join(out_dir, f"{device_slug(device)}.csv")
    common = {"device": device_name(device), "torch": torch.__version__,
              "triton": triton_version(), "git_sha": env.get("git_sha", git_sha()),
              "timestamp": env.get("timestamp_utc", "")}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            verdict = verdicts[id(r)]
            base = {"kernel": r.kernel, "provider": r.provider, "mode": r.mode, "x": r.x,
                    "config": r.config, "dtype": r.dtype, "status": verdict.status or "ok",
                    "note": " | ".join(verdict.notes), "samples": r.samples or "", **common}
            if r.ms is None:
                writer.writerow({**base, "metric": "time", "unit": "ms"})
                continue
            p50, p20, p80 = r.ms
            writer.writerow({**base, "metric": "time", "unit": "ms", "p50": f"{p50:.6g}",
                             "p20": f"{p20:.6g}", "p80": f"{p80:.6g}"})
            unit = r.unit
            if unit:
                divisor, metric, name = {"B": (1e9, "bandwidth", "GB/s"),
                                         "FLOP": (1e12, "throughput", "TFLOP/s")}.get(
                    unit, (1.0, "throughput", f"{unit}/s"))
                # the 20th percentile of throughput comes from the 80th of time, and back
                values = [f"{r.throughput(ms) / divisor:.6g}" for ms in (p50, p80, p20)]
                writer.writerow({**base, "metric": metric, "unit": name, "p50": values[0],
                                 "p20": values[1], "p80": values[2]})
            if r.peak_bytes is not None:
                mib = f"{r.peak_bytes / 2**20:.6g}"
                writer.writerow({**base, "metric": "peak_memory", "unit": "MiB", "p50": mib,
                                 "p20": mib, "p80": mib})
    return path


def read_csv(path: str | os.PathLike) -> list[Result]:
    """The results a CSV written by write_csv holds (to redraw or re-tabulate a run)."""
    results: dict[tuple, Result] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            key = (row["kernel"], row["config"], row["mode"], row["provider"])
            r = results.get(key)
            if r is None:
                r = results[key] = Result(row["kernel"], row["provider"], row["mode"],
                                          row["config"], int(row["x"]), dtype=row.get("dtype", ""))
                if not row["p50"]:
                    notes = row.get("note", "")
                    r.note = notes.split(" | ")[0] if notes else row.get("status", "missing")
                    continue
            if not row["p50"]:
                continue
            p50 = float(row["p50"])
            if row["metric"] == "time":
                r.ms = (p50, float(row["p20"]), float(row["p80"]))
                r.samples = int(row["samples"] or 0)
            elif row["metric"] == "peak_memory":
                r.peak_bytes = int(p50 * 2**20)
            elif r.ms is not None:  # a throughput: recover the work of one call
                seconds = r.ms[0] * 1e-3
                if row["unit"] == "GB/s":
                    r.bytes_moved = round(p50 * 1e9 * seconds)
                elif row["unit"] == "TFLOP/s":
                    r.flops = round(p50 * 1e12 * seconds)
                else:
                    r.work, r.work_unit = p50 * seconds, row["unit"].removesuffix("/s")
    return list(results.values())


# ------------------------------------------------------------------------------------ the figure

# One colour and marker per provider, the same in every panel and every run. Bounds are grey.
_STYLE = {
    "alignkern": ("#d62728", "o"), "alignkern-cuda": ("#8c1a1a", "D"),
    "torch-eager": ("#1f77b4", "s"), "torch-compile": ("#2ca02c", "^"),
    "trl-selective": ("#9467bd", "v"), "cut-cross-entropy": ("#ff7f0e", "P"),
    "liger": ("#e377c2", "X"), "flex-attention": ("#17becf", "<"),
    "flex-with-mask-build": ("#bcbd22", ">"), "sdpa-float-mask": ("#8c564b", "p"),
    "torch-unfused": ("#1b9e77", "s"), "torch-pairwise": ("#7f7f00", "h"),
    CEILING: ("#404040", "*"), FLOOR: ("#707070", "d"), FLASH: ("#a0a0a0", "H"),
}
_SPARE = ["#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354"]
_LINESTYLES = ["-", "--", ":", "-."]


def provider_style(provider: str) -> tuple[str, str]:
    """(colour, marker) of a provider: fixed for the known ones, then the spares in turn."""
    if provider not in _STYLE:
        spare = len([p for p in _STYLE if p not in _BUILTIN_STYLES])
        _STYLE[provider] = (_SPARE[spare % len(_SPARE)], "os^vD<>ph"[spare % 9])
    return _STYLE[provider]


_BUILTIN_STYLES = frozenset(_STYLE)


def _swept(kernel: str) -> tuple[str, str]:
    return SWEPT.get(kernel, ("x", "size"))


def _series(r: Result) -> str:
    key = re.escape(_swept(r.kernel)[0])
    return re.sub(rf"\s*\b{key}=\d+", "", r.config).strip()


def _provider_order(results: list[Result]) -> list[str]:
    names = list(dict.fromkeys(r.provider for r in results))
    return sorted(names, key=lambda p: (p in BOUNDS, not is_ours(p), names.index(p)))


def figures(results: list[Result], device: torch.device, env: dict | None = None):
    """[(name, matplotlib Figure)]: one grid with a row per op family and, for each of its modes,
    the throughput panel beside the peak-memory panel; when there are more than MAX_ROWS op
    families, one figure per family ('' or the family's name)."""
    families = _families(results)
    if not families:
        return []
    if len(families) <= MAX_ROWS:
        return [("", _figure(results, device, env))]
    return [(kernel, _figure(rows, device, env)) for kernel, rows in families.items()]


@dataclass(frozen=True)
class _Metric:
    """What one panel plots: ``value(r)`` is (value, below, above) for the error bar, or None."""

    name: str  # the panel title's last words: 'throughput', 'peak memory'
    label: str  # the y axis title
    value: Callable[[Result], tuple[float, float, float] | None]
    noisy_marks: bool  # hatch / circle the rows whose time is noisy


def _throughput_metric(scaled: tuple[str, float, str]) -> _Metric:
    unit, factor, label = scaled

    def value(r: Result):
        return _err(r, factor) if r.ms is not None and r.unit else None

    return _Metric("throughput", f"{label}  (higher is better)" if unit else "no throughput measure",
                   value, True)


def _peak_mib(r: Result):
    if r.ms is None or r.peak_bytes is None:
        return None
    return r.peak_bytes / 2**20, 0.0, 0.0


MEMORY = _Metric("peak memory", "peak MiB  (lower is better)", _peak_mib, False)


def _figure(results, device, env):
    from matplotlib.figure import Figure

    verdicts = assess(results)
    families = _families(results)
    modes = {kernel: list(dict.fromkeys(r.mode for r in rows)) for kernel, rows in families.items()}
    ncols = 2 * max(len(m) for m in modes.values())
    nrows = len(families)
    fig = Figure(figsize=(FIGURE_WIDTH_PX / DPI, 1.6 + ROW_HEIGHT_IN * nrows), dpi=DPI,
                 layout="constrained")
    fig.get_layout_engine().set(h_pad=0.12, hspace=0.06, wspace=0.04)
    order = _provider_order(results)
    kinds: set[str] = set()
    for row, (kernel, rows) in enumerate(families.items()):
        throughput = _throughput_metric(_family_scale(rows))
        for m, mode in enumerate(modes[kernel]):
            panel = [r for r in rows if r.mode == mode]
            for k, metric in enumerate((throughput, MEMORY)):
                ax = fig.add_subplot(nrows, ncols, row * ncols + 2 * m + k + 1)
                kinds.add(_draw_panel(ax, kernel, mode, panel, order, verdicts, metric))
    heading = "\n".join(textwrap.wrap(title(results, device, env), 160))
    fig.suptitle(f"{heading}\nthroughput from the median time: higher is better; peak memory: lower "
                 f"is better; error bars: p20-p80 of the timed runs; a log axis where a panel's "
                 f"values differ by more than {LOG_SPAN}x", fontsize=11)
    handles, labels = _legend_entries(order, kinds)
    rows_needed = math.ceil(len(handles) / 9)
    fig.legend(handles, labels, loc="outside lower center", ncol=math.ceil(len(handles) / rows_needed),
               fontsize=9, frameon=False, handler_map={tuple: _tuple_handler()})
    return fig


def _tuple_handler():
    from matplotlib.legend_handler import HandlerTuple

    return HandlerTuple(ndivide=None, pad=0.6)


def _legend_entries(order: list[str], kinds: set[str]) -> tuple[list, list[str]]:
    """One entry per provider drawn as the figure draws it: a filled patch where the panels are
    bars, a line with its marker where they are lines, both side by side where there are both;
    then what marks a noisy time."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = []
    for p in order:
        colour, marker = provider_style(p)
        patch = Patch(facecolor=colour, edgecolor=colour)
        line = Line2D([], [], color=colour, marker=marker, linestyle="-")
        handles.append(patch if kinds == {"bars"} else line if kinds == {"lines"} else (patch, line))
    marks = [m for kind, m in (("bars", "hatched bar"), ("lines", "circled point")) if kind in kinds]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="///") if "bars" in kinds
                   else Line2D([], [], marker="o", markerfacecolor="none", markeredgecolor="black",
                               linestyle="none", markersize=9))
    labels = [*order, f"noisy (spread > {100 * measure.NOISY_SPREAD:.0f}%): {', '.join(marks)}"]
    return handles, labels


def _family_scale(rows: list[Result]) -> tuple[str, float, str]:
    """(unit, divisor, label) shared by every panel of one op family."""
    unit = next((r.unit for r in rows if r.unit), "")
    if not unit:
        return "", 1.0, ""
    factor, label = scale(unit, [r.throughput() for r in rows if r.throughput()])
    return unit, factor, label


def _draw_panel(ax, kernel, mode, rows, order, verdicts, metric: _Metric) -> str:
    """Draw one panel: bars when each series has one size, else lines. Returns 'bars' or 'lines'."""
    series = list(dict.fromkeys(_series(r) for r in rows))
    xs_by_series = {s: sorted({r.x for r in rows if _series(r) == s}) for s in series}
    ax.set_ylabel(metric.label, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    providers = [p for p in order if any(r.provider == p for r in rows)]
    if all(len(xs) == 1 for xs in xs_by_series.values()):
        _bars(ax, rows, providers, series, metric, verdicts)
        # no x axis to carry the swept size: the heading names the whole case
        configs = list(dict.fromkeys(r.config for r in rows))
        heading = configs[0] if len(configs) == 1 else ""
        ax.set_title(f"{kernel} · {mode} · {metric.name}" + (f"\n{heading}" if heading else ""),
                     fontsize=10)
        kind = "bars"
    else:
        _lines(ax, rows, providers, series, metric, verdicts)
        not_run = sorted({f"{r.provider} ({r.status})" for r in rows if r.ms is None})
        note = "\n".join(textwrap.wrap("not run: " + ", ".join(not_run), 70)) if not_run else ""
        ax.set_xlabel(_swept(kernel)[1] + (f"\n{note}" if note else ""), fontsize=9)
        ax.set_title(f"{kernel} · {mode} · {metric.name}", fontsize=10)
        kind = "lines"
    if not any(metric.value(r) for r in rows):
        ax.text(0.5, 0.5, f"no {metric.name} measured", transform=ax.transAxes, ha="center",
                fontsize=8, color="#555555")
    return kind


def _err(r: Result, factor: float) -> tuple[float, float, float]:
    """(value, down, up) of the throughput; p80 time is the low end."""
    value = r.throughput() / factor
    return value, value - r.throughput(r.ms[2]) / factor, r.throughput(r.ms[1]) / factor - value


def _value_axis(ax, values: list[float], top: float | None = None) -> None:
    """Linear from 0, or logarithmic where the positive values differ by more than LOG_SPAN
    (symmetric-log, linear up to the smallest positive value, when some are 0). ``top``: the
    highest point drawn (a bar and its error bar), to leave room for the value above it."""
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > LOG_SPAN:
        if len(positive) < len(values):
            ax.set_yscale("symlog", linthresh=min(positive))
            ax.set_ylim(0, top * 3 if top else None)
        else:
            ax.set_yscale("log")
            ax.set_ylim(min(positive) / 2, top * 3 if top else None)
    elif top is not None:
        ax.set_ylim(0, top * 1.18 if top > 0 else 1)
    else:
        ax.set_ylim(bottom=0)


def _bars(ax, rows, providers, series, metric: _Metric, verdicts):
    """Grouped bars: one group per series (usually one), one bar per provider."""
    width = min(0.8 / max(1, len(providers)), 0.3)
    ticks, labels, drawn = [], [], []
    for g, name in enumerate(series):
        for i, provider in enumerate(providers):
            pos = g + (i - (len(providers) - 1) / 2) * width
            if len(series) == 1:
                ticks.append(pos)
                labels.append(provider)
            r = next((r for r in rows if r.provider == provider and _series(r) == name), None)
            point = metric.value(r) if r is not None else None
            if point is None:
                if r is not None:  # x in data, y in axes coordinates: right for any scale
                    ax.text(pos, 0.02, r.status if r.ms is None else "n/a", rotation=90,
                            ha="center", va="bottom", fontsize=7, color="#555555",
                            transform=ax.get_xaxis_transform())
                continue
            value, down, up = point
            noisy = metric.noisy_marks and verdicts[id(r)].status == "noisy"
            colour = provider_style(provider)[0]
            ax.bar(pos, value, width * 0.9, color=colour, edgecolor="black" if noisy else colour,
                   hatch="///" if noisy else None, yerr=[[down], [up]] if down or up else None,
                   capsize=2, error_kw={"elinewidth": 0.8, "ecolor": "black"},
                   gid=f"provider:{provider}")
            drawn.append((pos, value, up))
        if len(series) > 1:
            ticks.append(g)
            labels.append(name)
    ax.set_xlim(-0.5, len(series) - 0.5)
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, rotation=30 if len(series) == 1 else 0,
                       ha="right" if len(series) == 1 else "center", fontsize=8)
    _value_axis(ax, [v for _, v, _ in drawn], max((v + up for _, v, up in drawn), default=0.0))
    for pos, value, up in drawn:
        ax.text(pos, value + up, fmt_value(value), ha="center", va="bottom", fontsize=7)


def _lines(ax, rows, providers, series, metric: _Metric, verdicts):
    """One line per (series, provider): colour and marker by provider, line style by series."""
    xs_all = sorted({r.x for r in rows})
    plotted = []
    for s_index, name in enumerate(series):
        style = _LINESTYLES[s_index % len(_LINESTYLES)]
        for provider in providers:
            points = sorted((r for r in rows if r.provider == provider and _series(r) == name
                             and metric.value(r) is not None), key=lambda r: r.x)
            if not points:
                continue
            colour, marker = provider_style(provider)
            values = [metric.value(r) for r in points]
            plotted += [v[0] for v in values]
            container = ax.errorbar([r.x for r in points], [v[0] for v in values],
                                    yerr=[[v[1] for v in values], [v[2] for v in values]],
                                    color=colour, marker=marker, linestyle=style, capsize=2,
                                    markersize=5, linewidth=1.4)
            container.lines[0].set_gid(f"provider:{provider}")
            for r, v in zip(points, values):  # noisy points: hollow markers
                if metric.noisy_marks and verdicts[id(r)].status == "noisy":
                    ax.plot([r.x], [v[0]], marker=marker, markersize=9, markerfacecolor="none",
                            markeredgecolor="black", linestyle="none")
    if len(xs_all) > 1 and xs_all[-1] / xs_all[0] >= 4:
        ax.set_xscale("log")
    ax.set_xticks(xs_all)
    ax.set_xticklabels([_short(x) for x in xs_all], fontsize=8)
    ax.minorticks_off()
    _value_axis(ax, plotted)
    if len(series) > 1:
        ax.legend(handles=[_series_handle(_LINESTYLES[i % 4], s) for i, s in enumerate(series)],
                  fontsize=7, loc="best", frameon=False)


def _series_handle(style, label):
    from matplotlib.lines import Line2D

    return Line2D([], [], color="black", linestyle=style, label=label)


def _short(x: int) -> str:
    """32000 -> '32k', 128256 -> '128k'; below 10,000 the number itself."""
    return f"{x / 1000:.0f}k" if x >= 10_000 else str(x)


def write_plots(results, device: torch.device, out_dir: str | os.PathLike,
                env: dict | None = None) -> list[str] | str:
    """Save the figure(s) as PNG: ``<device>.png``, or ``<device>-<op>.png`` per op family when
    the grid is split. Returns the paths, or a sentence saying why no plot was written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'alignkern[bench]')"
    made = figures(results, device, env)
    if not made:
        return "plot skipped: nothing was measured"
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, fig in made:
        path = os.path.join(out_dir, f"{device_slug(device)}{'-' + name if name else ''}.png")
        fig.savefig(path, dpi=DPI)
        paths.append(path)
    return paths


def write_plot(results, device: torch.device, out_dir: str | os.PathLike) -> str:
    """The first PNG's path (or why none was written): the single-figure form of write_plots."""
    paths = write_plots(results, device, out_dir)
    return paths if isinstance(paths, str) else paths[0]
