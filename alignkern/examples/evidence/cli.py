"""``alignkern demo evidence``: the command line."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from ..._argtypes import OneLineParser, integer, positive_int
from . import report
from .experiment import FULL, QUICK, run


def _seed(text: str) -> int:
    value = integer(text)
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**31), got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    from .. import evidence

    parser = OneLineParser(prog="alignkern demo evidence",
                           description=evidence.__doc__.replace("``", ""),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="one-digit problems, a much smaller model barely trained, "
                             f"{QUICK.problems} problems: a smoke test of the pipeline (seconds), "
                             "not a measurement")
    parser.add_argument("--out", metavar="DIR", default="alignkern-evidence",
                        help="where evidence.csv and evidence.png go (default "
                             "./alignkern-evidence)")
    parser.add_argument("--seed", type=_seed, default=0,
                        help="seed of everything: model, training data, held-out problems, "
                             "sampling (default 0)")
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="a local transformers causal LM checkpoint and its tokenizer to "
                             "evaluate instead of training one (it must follow the task's "
                             "formats; see --save-model)")
    parser.add_argument("--save-model", metavar="DIR", default=None,
                        help="also save the trained model and its tokenizer there (for --model)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (default 1, which leaves the other core of a "
                             "shared 2-core machine free; 2 threads trained about 1.3-1.6x "
                             "faster on an idle one). Results are reproducible for a given seed "
                             "and thread count")
    parser.add_argument("--no-plot", action="store_true", help="skip evidence.png")
    return parser


def _writable(parser, flag: str, path: Path) -> None:
    """Create ``path`` and check that a file can be written in it, before any training."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        reason = ("it is a file, not a folder" if path.exists() and not path.is_dir()
                  else f"{type(exc).__name__}: {exc.strerror or exc}")
        parser.error(f"{flag} {str(path)!r}: cannot write there ({reason})")


def _model_folder(parser, path: str) -> None:
    folder = Path(path)
    if not folder.exists():
        parser.error(f"--model {path!r}: no such folder (give a local transformers checkpoint: "
                     "config.json, weights and tokenizer files)")
    if not folder.is_dir():
        parser.error(f"--model {path!r}: a file, not a folder (give the checkpoint's folder)")
    if not (folder / "config.json").is_file():
        parser.error(f"--model {path!r}: the folder has no config.json, so it is not a "
                     "transformers checkpoint")


def _load(parser, path: str):
    """The checkpoint's model and tokenizer, checked to take the judge's template (its options
    single tokens); any failure is a one-line error, exit status 2."""
    from .experiment import load
    from .training import judge

    try:
        model, tokenizer = load(path)
        judge(model, tokenizer)
    except (OSError, ValueError, TypeError) as exc:  # transformers' errors for a bad checkpoint
        message = " ".join(str(exc).split())
        parser.error(f"--model {path!r}: cannot use it ({type(exc).__name__}: {message})")
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    """``alignkern demo evidence``: returns the exit status (2 for bad arguments)."""
    parser = _parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    _writable(parser, "--out", out)
    if args.model is not None:
        _model_folder(parser, args.model)
        if args.save_model is not None:
            parser.error("--save-model saves a trained model; with --model nothing is trained")
    if args.save_model is not None:
        _writable(parser, "--save-model", Path(args.save_model))
    config = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = (None, None) if args.model is None else _load(parser, args.model)
    print(f"alignkern demo evidence: each loop against plain decoding on {config.problems} "
          f"held-out addition problems (up to {config.train.digits} digits), seed {args.seed}, "
          f"{torch.get_num_threads()} CPU thread(s), load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    result = run(config, seed=args.seed, model=model, tokenizer=tokenizer,
                 save_model=args.save_model, log=print)
    print()
    print(report.format_table(result.rows))
    written = [report.write_csv(result.rows, out / "evidence.csv")]
    if not args.no_plot:
        written.append(report.plot(result.rows, out / "evidence.png",
                                   title=f"alignkern demo evidence, seed {args.seed}, "
                                         f"{config.problems} held-out problems\n"
                                         f"{result.description}"))
    print(f"\nwrote {', '.join(str(p) for p in written)}; {time.perf_counter() - start:.1f} s in "
          f"all, load average now {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0
