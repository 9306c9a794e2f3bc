"""``alignkern demo ica``: the command line."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ..._argtypes import OneLineParser, positive_int
from .data import DIM, EXAMPLES
from .experiment import FULL, QUICK, format_table, parameter_count, plot, run_experiment, write_csv
from .model import ROUTES


def _parser() -> argparse.ArgumentParser:
    from .. import ica

    parser = OneLineParser(prog="alignkern demo ica",
                           description=ica.__doc__.replace("``", ""),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"a smaller transformer trained for fewer steps ({QUICK.width} wide, "
                             f"{QUICK.layers} layers, {QUICK.steps} steps of {QUICK.batch}): a "
                             "smoke test, under 2 minutes")
    parser.add_argument("--out", metavar="DIR", default="alignkern-ica",
                        help="where ica.csv and ica.png go (default ./alignkern-ica)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything (default 0)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (default 1: the matrices are tiny, and one "
                             "thread was the fastest measured on 2 shared cores); results are "
                             "reproducible for a given seed and thread count")
    parser.add_argument("--route", choices=ROUTES, default=None,
                        help="how the rewards reach the trained model's attention: bias "
                             "(default), rank (the reward-ordering mask on half the heads), both, "
                             "or none (rewards only in the tokens)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"training steps (default {FULL.steps}, --quick {QUICK.steps})")
    parser.add_argument("--no-plot", action="store_true", help="skip ica.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``alignkern demo ica``: returns the exit status (2 for bad arguments)."""
    parser = _parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:  # before training: a folder the results cannot go into must not cost the run
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        reason = ("it is a file, not a folder" if out.exists() and not out.is_dir()
                  else f"{type(exc).__name__}: {exc.strerror or exc}")
        parser.error(f"--out {str(out)!r}: cannot write the results there ({reason})")
    config = QUICK if args.quick else FULL
    config = config._replace(**{name: value for name, value in
                                (("route", args.route), ("steps", args.steps)) if value is not None})
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"alignkern demo ica: in-context alignment's synthetic experiment (Wang et al. 2024), "
          f"d = {DIM}, {EXAMPLES} examples, {config.eval_sequences} evaluation sequences")
    print(f"training the transformer: {config.layers} layers x {config.heads} heads, width "
          f"{config.width}, {parameter_count(config)} parameters, rewards as {config.route}; Adam "
          f"lr {config.lr:g}, {config.steps} steps x {config.batch} sequences; "
          f"{torch.get_num_threads()} CPU thread(s)")
    result = run_experiment(config, seed=args.seed, log=print)
    print(f"trained in {result.train_seconds:.1f} s (objective {result.losses[0]:.3f} -> "
          f"{sum(result.losses[-50:]) / len(result.losses[-50:]):.3f})\n")
    print("1 - cos(prediction, y*), mean over the evaluation sequences; paper: the official "
          "notebook's")
    print(format_table(result.rows))
    print(f"\nconstructed vs constructed_ref (float64): max |difference| = "
          f"{result.construction_gap:.1e}")
    out.mkdir(parents=True, exist_ok=True)
    written = [write_csv(result.rows, out / "ica.csv")]
    if not args.no_plot:
        written.append(plot(result.rows, out / "ica.png"))
    print(f"wrote {', '.join(str(p) for p in written)}; {time.perf_counter() - start:.1f} s in all")
    return 0
