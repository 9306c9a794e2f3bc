"""Command line: ``alignkern info`` and ``alignkern bench`` (also ``python -m alignkern ...``)."""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch


def info() -> str:
    """Version, torch/triton, the GPU, the interpreter, and each backend's availability."""
    import alignkern
    from alignkern import _backend
    from alignkern.bench.report import triton_version

    lines = [
        f"alignkern {alignkern.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"triton {triton_version()}",
    ]
    if torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        lines.append("gpu: none")
    lines.append(f"triton interpreter: {'on' if _backend.triton_interpreting() else 'off'}")
    ext, error = _backend._load_extension()
    if ext is None:
        lines.append(f"extension alignkern._C: not loaded ({error})")
    else:
        cuda = "built" if ext.has_cuda() else "not built"
        lines.append(f"extension alignkern._C: loaded, CUDA kernels {cuda}")
    lines.append("backends:")
    for name, reason in _backend.backend_status().items():
        lines.append(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    lines.append(_backend_in_use(torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    lines.append("backward passes: token_logprobs runs its backward on the forward's backend;")
    lines.append("  linear_logprobs too, except the cuda backend (CUDA forward only), whose backward")
    lines.append("  runs the Triton kernels (deterministic: dlogits per row chunk + two GEMMs);")
    lines.append("  reward_attention likewise: cuda forward, Triton backward (deterministic dbias)")
    return "\n".join(lines)


def _backend_in_use(device: torch.device) -> str:
    """Which backend ops on ``device``'s tensors run, and where that choice comes from; if the
    requested backend is unknown or cannot run, what is wrong (ops would raise)."""
    from alignkern import _backend

    default = _backend.default_backend(device)
    source = "use_backend" if _backend._override.get() else "ALIGNKERN_BACKEND"
    head = f"backend for {device.type} tensors:"
    try:
        name = _backend.resolve_backend(device)
    except (ValueError, RuntimeError) as exc:
        requested = _backend._override.get() or os.environ.get("ALIGNKERN_BACKEND")
        return (f"{head} NONE, {source}={requested!r} is unusable; ops will raise\n"
                f"  {type(exc).__name__}: {exc}\n"
                f"  unset {source} or name an available backend (the default here is {default})")
    if _backend.requested_backend() is None:
        return f"{head} {name} (default)"
    return f"{head} {name} (from {source}; the default is {default})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, and which backends are available and why not")
    bench = sub.add_parser("bench", help="benchmark alignkern against its peers on this device")
    bench.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    bench.add_argument("--device", choices=["cuda", "cpu"], default=None,
                       help="default: cuda when a GPU is present, else cpu")
    bench.add_argument("--ops", nargs="+", default=None, help="op families to run (default: all)")
    bench.add_argument("--providers", nargs="+", default=None,
                       help="peers to compare against (alignkern always runs)")
    bench.add_argument("--out-dir", default="benchmarks/results",
                       help="where <device>.csv and <device>.png go (default: benchmarks/results)")
    bench.add_argument("--no-plot", action="store_true", help="skip the PNG")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    from alignkern import bench

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("alignkern bench: --device cuda needs a CUDA GPU; none is present", file=sys.stderr)
        return 2
    bench.run(device, quick=args.quick, ops=tuple(args.ops or bench.OPS),
              providers=set(args.providers) if args.providers else None, out_dir=args.out_dir,
              plot=not args.no_plot, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
