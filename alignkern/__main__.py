"""The command line: `alignkern info`, `alignkern bench`, `alignkern demo` (also
`python -m alignkern ...`).

The top-level parser (its description, --version, the commands' one-line help) is alignkern_cli's,
which answers `alignkern --help` and `--version` without importing torch. A new subcommand: its
name and help in alignkern_cli.COMMANDS, and here a function that adds its parser and sets its
handler, listed in COMMANDS."""

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


BENCH_DESCRIPTION = """Times each alignkern op against its peers (the other ways to compute the same
thing) on this machine, then prints a table and writes a CSV, a Markdown table, a PNG figure and a
JSON description of the machine (versions, device, git commit, CPU model, threads) into a new
folder, ./alignkern-bench/<device>-<UTC time>/, unless --out says where.

How much runs: by default, on a CPU, one representative case per op family and mode (forward,
forward+backward), every peer, about 3 minutes on 2 cores; on a GPU, the full sweep of sizes from
the design (bf16). --quick runs the smallest cases, --full every case.

Timing: on a CPU the providers of a case take turns (so a load spike from another process hits
all of them) and are repeated until the middle 60 % of the runs (p20 to p80) lie within 10 % of
the median or the case's time budget is spent; rows whose spread is above 25 % are marked noisy.
On a GPU: triton.testing.do_bench."""


def _bench_epilog() -> str:
    import textwrap

    from alignkern import bench
    from alignkern.bench.report import BOUNDS

    lines = ["op families (--ops) and their providers (--providers):"]
    width = max(map(len, bench.FAMILIES)) + 2  # the longest name, then two spaces
    for op, module in bench.FAMILIES.items():
        gpu_only = set(getattr(module, "GPU_ONLY", ()))
        names = [f"{p} (GPU)" if p in gpu_only else f"{p} (bound)" if p in BOUNDS else p
                 for p in bench.provider_names(module)]
        lines += textwrap.wrap(", ".join(names), 100, initial_indent=f"  {op:<{width}}",
                               subsequent_indent=" " * (2 + width), break_on_hyphens=False)
    lines += ["",
              "alignkern's own rows and the bounds always run; --providers picks the peers.",
              "A bound is not a peer: read-ceiling is one plain read of the input, matmul-floor",
              "the bare matrix products alignkern runs, flash-ceiling attention with no bias or",
              "mask. Peers marked (GPU) are reported as missing on a CPU.",
              "",
              "examples:",
              "  alignkern bench                          the default run",
              "  alignkern bench --ops token_logprobs --providers torch-compile",
              "  alignkern bench --full --out /tmp/bench  every case, results in /tmp/bench",
              "  alignkern bench --full --save-results    also replace benchmarks/results/<device>.*"]
    return "\n".join(lines)


def _names(values: list[str] | None) -> list[str] | None:
    """--ops a b, --ops a,b: the names, in order, once each."""
    if not values:
        return None
    return list(dict.fromkeys(n for v in values for n in v.split(",") if n))


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):  # an infinite budget would time a noisy case forever
        raise argparse.ArgumentTypeError(f"must be above 0 and finite, got {text}")
    return value


def _add_info(sub, name: str, help: str) -> None:
    parser = sub.add_parser(name, help=help,
                            description="Versions of alignkern, torch and triton, the GPU, and "
                                        "which backends can run here (and why not).")
    parser.set_defaults(handler=_run_info)


def _run_info(args) -> int:
    print(info())
    return 0


def _add_bench(sub, name: str, help: str) -> None:
    parser = sub.add_parser(name, help=help, description=BENCH_DESCRIPTION, epilog=_bench_epilog(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--quick", action="store_true",
                       help="the smallest case of each op and 0.5 s of timing per case: a smoke "
                            "test of the setup, not a measurement")
    scope.add_argument("--full", action="store_true",
                       help="every case of every op (on a GPU the same as the default)")
    parser.add_argument("--ops", nargs="+", metavar="OP",
                        help="only these op families (names below; default: all)")
    parser.add_argument("--providers", nargs="+", metavar="NAME",
                        help="only these peers (names below; default: all)")
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        help="where to run (default: the GPU when there is one, else the CPU)")
    parser.add_argument("--out", "--out-dir", metavar="DIR", dest="out",
                        help="write the results into DIR instead of a new "
                             "./alignkern-bench/<device>-<UTC time>/")
    parser.add_argument("--save-results", action="store_true",
                        help="also write them over the repository's committed "
                             "benchmarks/results/<device>.* (run from a checkout)")
    parser.add_argument("--budget", type=_positive, metavar="SECONDS",
                        help="CPU: seconds of timed runs per case and mode before timing stops "
                             "even if the spread is still wide (default: 4, --full 8, --quick "
                             "0.5)")
    parser.add_argument("--loops", action="store_true",
                        help="instead of the op families, time alignkern's loops (self-evaluation "
                             "scoring, one RAIN iteration, best-of-N scoring) against the naive "
                             "ways on a tiny random Llama; with --quick a smaller model")
    parser.add_argument("--trl", action="store_true",
                        help="instead of the op families, time one DPO training step of TRL's "
                             "DPOTrainer with its fused LM head on alignkern (use_alignkern) "
                             "against stock TRL: wall time and peak memory, on a random Llama "
                             "with V = 32000; with --quick a smaller model")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it is off anyway when stderr is not a terminal)")
    parser.set_defaults(handler=_run_bench)


def _run_bench(args) -> int:
    from alignkern import bench

    def fail(message: str) -> int:
        print(f"alignkern bench: error: {message}", file=sys.stderr)
        return 2

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda needs a CUDA GPU; none is present")
    if args.trl:
        if args.loops or args.ops or args.providers or args.full:
            return fail("--trl runs the TRL step benchmark alone: drop --loops, --ops, "
                        "--providers and --full")
        return _run_trl(args, device)
    if args.loops:
        if args.ops or args.providers or args.full:
            return fail("--loops runs the loop benchmark alone: drop --ops, --providers and --full")
        return _run_loops(args, device)
    ops = tuple(_names(args.ops) or bench.OPS)
    providers = _names(args.providers)
    try:
        bench.check_names(ops, providers)
        output = bench.run(
            device, scope="quick" if args.quick else "full" if args.full else "default", ops=ops,
            providers=set(providers) if providers else None, out_dir=args.out,
            save_results=args.save_results, plot=not args.no_plot, progress=not args.no_progress,
            budget_s=args.budget, command=["alignkern", *args.argv])
    except bench.BenchError as exc:
        return fail(str(exc))
    return 130 if output.interrupted else 0


def _run_loops(args, device: torch.device) -> int:
    """`alignkern bench --loops`: alignkern.bench.loops."""
    from alignkern.bench import loops

    return _run_alone(args, device, "loops", loops.run_loops_benchmark, loops.format_report,
                      loops.write_csv)


def _run_trl(args, device: torch.device) -> int:
    """`alignkern bench --trl`: alignkern.bench.trl_step."""
    from alignkern.bench import trl_step

    return _run_alone(args, device, "trl", trl_step.run_trl_benchmark, trl_step.format_report,
                      trl_step.write_csv)


def _run_alone(args, device: torch.device, flag: str, run, format_report, write_csv) -> int:
    """A benchmark that runs instead of the op families (``--<flag>``): its report on stdout, its
    rows as a CSV (and the environment as JSON) in the output folder."""
    from alignkern import bench
    from alignkern.bench import report

    def fail(message: str) -> int:
        print(f"alignkern bench: error: {message}", file=sys.stderr)
        return 2

    if args.save_results:
        return fail(f"--save-results is for the op families, not --{flag}")
    try:  # where the rows go is checked before they are measured
        folder = bench.prepare_out_dir(
            args.out if args.out is not None else bench.default_out_dir(device),
            "--out" if args.out is not None else "the default output folder")
    except bench.BenchError as exc:
        return fail(str(exc))
    rows = run(device, quick=args.quick)
    print(format_report(rows))
    path = write_csv(rows, device, folder)
    env = report.environment(device, scope=f"{flag}-quick" if args.quick else flag,
                             command=["alignkern", *args.argv])
    written = report.write_json(env, device, folder)
    print(f"\nResults in {folder.resolve()}{os.sep} ({path.name}, {os.path.basename(written)})")
    return 0


DEMO_HELP = "run alignkern's loops end to end on a tiny model and show what they cost"


def _add_demo(sub, name: str, help: str) -> None:
    # The demo's own parser (alignkern.loops.demo.add_arguments) is built only when the demo
    # runs, so that `alignkern --help` does not import transformers: this one passes everything
    # after `demo` on to it, --help included.
    parser = sub.add_parser(name, help=help, add_help=False, description=DEMO_HELP)
    parser.set_defaults(handler=_run_demo, passes_through=True)


def _run_demo(args) -> int:
    from alignkern import _demos

    program = _demos.program(args.rest)  # ica needs only the ops, not transformers (loops do)
    if program is not None:
        return program(args.rest[1:])
    from alignkern.loops import demo

    return demo.main(args.rest)


# Each subcommand: a function that adds its parser to the subparsers and sets its handler.
COMMANDS = {"info": _add_info, "bench": _add_bench, "demo": _add_demo}


def _parser() -> argparse.ArgumentParser:
    import alignkern_cli

    return alignkern_cli.parser(COMMANDS)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passes_through", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.argv, args.rest = argv, rest
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
