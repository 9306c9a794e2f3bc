"""Evidence for the loops: a small model trained here on a task with checkable answers, and each
loop against plain decoding on the same held-out problems, with what it costs.

The task (``task``): addition of numbers of up to three digits, the sum written with its digits
reversed and a full stop (``57+968=`` -> ``5201.``), character tokens, a program that checks an
answer. The model (``training``): a small Llama built from a config (2 layers, width 64) trained
on the CPU in this process, stopped early so that it is right only about half the time; it also
learns, from its own outputs, the judgement "is it right? (A) yes (B) no" that the
self-evaluating loops read, how to answer again with earlier answers and their rewards in
context (check-and-correct) and how to answer again after its first attempt (SCoRe).

The methods (``methods``), each on the same held-out problems: greedy and sampled decoding;
``best_of_n`` scored by likelihood and by self-evaluation (n = 4, 8, 16); ``rain_generate`` with
its defaults; ``check_and_correct`` with the model's self-evaluation as reward (the loop as
designed) and with the checker's (external feedback), each without and with the reward bias on
the keys; SCoRe: the second attempt of the model as trained, then a short stage-II run
(``two_attempt_rollout`` + ``score_stage2_loss``) on training problems and both attempts of its
policy. Accuracy with its 95 % Wilson interval; cost in decoder forwards, token positions and
wall seconds.

    alignkern demo evidence [--quick] [--seed N] [--out DIR] [--model DIR] [--save-model DIR]

writes ``evidence.csv`` (method, setting, accuracy, ci_low, ci_high, forwards, tokens, seconds)
and ``evidence.png`` (accuracy against cost) and prints the table; the log also says how often
the judge agrees with the checker on the model's greedy answers, which decides what the
self-evaluating loops can do.

Where it departs from the papers, and why:

* The judge is the ``SelfEvaluator`` with RAIN's option swap ("(A) yes (B) no", then "(A) no
  (B) yes", averaged) on a short template of its own; it is trained on complete answers only, so
  RAIN's partial answers are judged as they stand (an unfinished answer is not yet right), as
  ``rain_generate`` evaluates them. A judge trained also on "is this the beginning of the right
  answer" labels rated malformed short samples highest, which best-of-N then picked.
* check-and-correct's context has no header, so its first round is exactly plain decoding of
  the prompt; each round is greedy. The reward bias is ``beta = 1`` (rewards lie in [-1, 1]),
  fixed beforehand, not tuned; the model never saw the bias in training (the bias is an
  inference-time knob of the loop).
* SCoRe's second attempt writes the problem again before its answer (so that the answer follows
  the problem, as in the first attempt, and the model's addition carries over); the checker
  accepts that form. Stage II is 30 steps of 64 sampled rollouts at lr 2e-5 with the loop's
  defaults (shaping bonus alpha = 10, KL weight 0.1); both attempts are evaluated greedily.

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
