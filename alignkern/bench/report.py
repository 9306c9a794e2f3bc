"""Output of `alignkern bench`: the table, the CSV (benchmarks/results/<device>.csv), the same
table in Markdown (<device>.md) and a PNG."""

from __future__ import annotations

import csv
import datetime
import os
import re
import subprocess
from collections import defaultdict

import torch

CSV_FIELDS = ["kernel", "provider", "mode", "metric", "unit", "x", "p50", "p20", "p80", "config",
              "device", "torch", "triton", "git_sha", "timestamp"]
CEILING = "read-ceiling"  # the provider that times a plain read: a ceiling, not a peer
FLOOR = "matmul-floor"  # the provider that times the bare GEMMs: a floor, not a peer
FLASH = "flash-ceiling"  # SDPA without bias or mask: a speed ceiling, not a peer
BOUNDS = (CEILING, FLOOR, FLASH)
# The size each family sweeps (the plot's x axis, taken out of the series name) and its title.
SWEPT = {"token_logprobs": ("V", "vocabulary size V"), "reward_attention": ("L", "sequence length L"),
         "fused_linear_dpo_loss": ("B*T", "tokens B*T"),
         "plackett_luce_loss": ("N", "candidates per list N")}


def _swept(kernel: str) -> tuple[str, str]:
    """The swept size's key and axis title; the vocabulary for families not listed."""
    return SWEPT.get(kernel, SWEPT["token_logprobs"])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """File-name form: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3', CPU -> 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "missing"


def _is_ours(provider: str) -> bool:
    return provider.startswith("alignkern")


def _best_peer_ms(results, result) -> float | None:
    peers = [r.ms[0] for r in results
             if r.ms is not None and r.config == result.config and r.mode == result.mode
             and r.kernel == result.kernel and not _is_ours(r.provider) and r.provider not in BOUNDS]
    return min(peers) if peers else None


def _bound(results, result):
    """The ceiling (token_logprobs, forward) or floor (linear_logprobs) row for result's case."""
    for r in results:
        if (r.provider in BOUNDS and r.config == result.config and r.kernel == result.kernel
                and r.mode == result.mode and r.ms is not None):
            return r
    return None


def _versus_bound(results, result) -> str:
    """'87% of read': share of a plain read's bandwidth; '1.21x floor': time over the GEMMs;
    '92% of flash': speed as a share of attention without bias or mask."""
    bound = _bound(results, result)
    if bound is None:
        return ""
    if bound.provider == CEILING:
        return f"{100 * result.gbps / bound.gbps:.0f}% of read"
    if bound.provider == FLASH:
        return f"{100 * bound.ms[0] / result.ms[0]:.0f}% of flash"
    return f"{result.ms[0] / bound.ms[0]:.2f}x floor"


def _throughput(r) -> str:
    return f"{r.tflops:.1f} TFLOP/s" if r.flops else f"{r.gbps:.1f} GB/s"


HEADER = ["op", "shape", "mode", "provider", "median ms", "throughput", "peak MiB", "vs best peer",
          "vs bound"]


def _rows(results) -> list[list[str]]:
    """One row of HEADER's columns per result."""
    rows = []
    for r in results:
        if r.ms is None:
            rows.append([r.kernel, r.config, r.mode, r.provider, r.note or "missing", "", "", "", ""])
            continue
        speedup = bound = ""
        if _is_ours(r.provider):
            best = _best_peer_ms(results, r)
            speedup = f"{best / r.ms[0]:.2f}x" if best else ""
            bound = _versus_bound(results, r)
        peak = "n/a" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.1f}"
        rows.append([r.kernel, r.config, r.mode, r.provider, f"{r.ms[0]:.3f}", _throughput(r),
                     peak, speedup, bound])
    return rows


def _title(device: torch.device) -> str:
    return (f"alignkern bench on {device_name(device)} (torch {torch.__version__}, "
            f"triton {triton_version()})")


def table(results, device: torch.device) -> str:
    """Op, shape, provider, median ms, GB/s or TFLOP/s, peak memory, speed-up over the best
    peer, and how far from the bound (share of a plain read, or time over the bare GEMMs)."""
    rows = [HEADER, *_rows(results)]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(HEADER))]
    lines = [_title(device)]
    for i, row in enumerate(rows):
        lines.append("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_markdown(results, device: torch.device, out_dir: str) -> str:
    """The same table as Markdown (``<device>.md``), ready to paste into the README."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{device_slug(device)}.md")
    lines = [_title(device) + f", git {_git_sha()}", "", "| " + " | ".join(HEADER) + " |",
             "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(results)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_csv(results, device: torch.device, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{device_slug(device)}.csv")
    common = {"device": device_name(device), "torch": torch.__version__,
              "triton": triton_version(), "git_sha": _git_sha(),
              "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            base = {"kernel": r.kernel, "provider": r.provider, "mode": r.mode, "x": r.x,
                    "config": r.config, **common}
            if r.ms is None:
                writer.writerow({**base, "metric": "missing", "unit": r.note})
                continue
            p50, p20, p80 = r.ms
            writer.writerow({**base, "metric": "time", "unit": "ms", "p50": f"{p50:.6g}",
                             "p20": f"{p20:.6g}", "p80": f"{p80:.6g}"})
            if r.bytes_moved:
                gbps = [f"{r.bytes_moved / (ms * 1e-3) / 1e9:.6g}" for ms in (p50, p80, p20)]
                writer.writerow({**base, "metric": "bandwidth", "unit": "GB/s", "p50": gbps[0],
                                 "p20": gbps[1], "p80": gbps[2]})
            if r.flops:
                tflops = [f"{r.flops / (ms * 1e-3) / 1e12:.6g}" for ms in (p50, p80, p20)]
                writer.writerow({**base, "metric": "throughput", "unit": "TFLOP/s",
                                 "p50": tflops[0], "p20": tflops[1], "p80": tflops[2]})
            if r.peak_bytes is not None:
                mib = f"{r.peak_bytes / 2**20:.6g}"
                writer.writerow({**base, "metric": "peak_memory", "unit": "MiB", "p50": mib,
                                 "p20": mib, "p80": mib})
    return path


def write_plot(results, device: torch.device, out_dir: str) -> str:
    """GB/s or TFLOP/s against the vocabulary size, one panel per (op, mode, other sizes); returns
    the path, or a
    sentence saying why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'alignkern[bench]')"
    panels: dict[tuple[str, str, str], dict[str, list[tuple[int, float]]]] = defaultdict(
        lambda: defaultdict(list))
    for r in results:
        if r.ms is not None:
            swept = re.escape(_swept(r.kernel)[0])
            series = re.sub(rf"\s*{swept}=\d+", "", r.config)  # the swept size is the x axis
            value = r.tflops if r.flops else r.gbps
            panels[(r.kernel, r.mode, series)][r.provider].append((r.x, value))
    if not panels:
        return "plot skipped: nothing was measured"
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, ((kernel, mode, series), lines) in zip(axes[0], sorted(panels.items())):
        for provider, points in sorted(lines.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=provider)
        ax.set_title(f"{kernel} {mode}\n{series}", fontsize=8)
        ax.set_xlabel(_swept(kernel)[1])
        ax.set_ylabel("TFLOP/s" if any(r.flops for r in results if r.kernel == kernel)
                      else "GB/s (compulsory traffic)")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(device_name(device))
    fig.tight_layout()
    path = os.path.join(out_dir, f"{device_slug(device)}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
