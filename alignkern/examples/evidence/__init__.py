"""Evidence that the loops help: a small model trained here on a task with checkable answers,
and each loop against plain decoding on the same held-out problems, with what it costs.

The task (``task``): addition of numbers of up to three digits, the sum written with its digits
reversed and a full stop (``57+968=`` -> ``5201.``), character tokens, a program that checks an
answer. The model (``training``): a small Llama built from a config and trained on the CPU in
this process, stopped early so that it is right only part of the time; it also learns, from its
own outputs, the judgement "is it right? (A) yes (B) no" that the self-evaluating loops read,
how to answer again with its earlier answers and their rewards in context (check-and-correct)
and how to answer again after its first attempt (SCoRe).

The methods (``methods``), each on the same held-out problems: greedy and sampled decoding;
``best_of_n`` scored by likelihood and by self-evaluation (n = 4, 8, 16); ``rain_generate`` with
its defaults; ``check_and_correct`` without and with the reward bias on the keys; SCoRe: a short
stage-II run (``two_attempt_rollout`` + ``score_stage2_loss``) on training problems, then both
attempts. Accuracy with its 95 % Wilson interval; cost in decoder forwards, token positions and
wall seconds.

    alignkern demo evidence [--quick] [--seed N] [--out DIR] [--model DIR]

writes ``evidence.csv`` (method, setting, accuracy, ci_low, ci_high, forwards, tokens, seconds)
and ``evidence.png`` (accuracy against cost).

Modules: ``task`` (problems, checker, tokenizer, templates), ``training`` (the model and its
training), ``methods`` (the loops, their costs), ``experiment`` (the whole run), ``report``
(table, CSV, figure), ``cli``.
"""

from .cli import main
from .experiment import FULL, QUICK, Config, Result, run
from .methods import CSV_COLUMNS, METHODS, Row, StageTwo, wilson
from .report import format_table, plot, read_csv, write_csv
from .task import Problem, held_out, is_correct, parse_problem, tokenizer
from .training import TrainConfig, build_model, train

__all__ = [
    "CSV_COLUMNS", "FULL", "METHODS", "QUICK", "Config", "Problem", "Result", "Row", "StageTwo",
    "TrainConfig", "build_model", "format_table", "held_out", "is_correct", "main",
    "parse_problem", "plot", "read_csv", "run", "tokenizer", "train", "wilson", "write_csv",
]
