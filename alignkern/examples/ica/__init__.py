"""In-context alignment's synthetic experiment (Wang et al., "A Theoretical Understanding of
Self-Correction through In-context Alignment", NeurIPS 2024; official code
yifeiwang77/Self-Correction, ``synthetic_experiment/``), with ``alignkern.reward_attention`` in
the model.

A sequence holds a query x, a target map W and a distractor map W_eps (all standard normal,
d = 5), the target response y* = x W and the distractor eps = x W_eps; example i is a response
y_i = r_i y* + (1 - r_i) eps with reward r_i ~ U(0, 1). With reward noise p each reward a model
reads is, with probability p, replaced by a fresh U(0, 1) draw (the responses still come from the
true rewards). Given k examples, a method predicts a response; the error is 1 - cos(prediction,
y*), averaged over 256 sequences. Four methods:

* ``tf``: a small causal transformer whose attention layers are ``reward_attention`` (the reward
  of each example reaches the attention as a key bias ``beta_h * r_j``), trained with Adam on the
  official Plackett–Luce objective (cosine scores, every prefix of k >= 2 examples).
* ``gd``: the official baseline: a fresh linear map x -> x W per sequence and k, trained by Adam
  (lr 0.1, int(50 - 25 p) steps) on the Plackett–Luce loss with cosine scores.
* ``constructed``: a transformer whose weights are set by hand so that each layer is one step of
  plain gradient descent on the Plackett–Luce loss with the theorem's scores
  -|y_hat - y_j|^2 / tau (the suffix averages come from ``reward_attention`` with the
  reward-ordering mask); 4 layers, step 10, tau = 50.
* ``constructed_ref``: the same gradient descent written out (autograd through
  ``alignkern.losses.plackett_luce_loss``); equal to ``constructed`` to rounding (float64).

    alignkern demo ica [--quick] [--out DIR]

Modules: ``data`` (sampler, reward noise, objective), ``model`` (the trained transformer), ``gd``
(the GD baseline, the construction), ``experiment`` (runs and reports), ``cli``.
"""

from .cli import main
from .data import (
    DIM,
    EXAMPLES,
    Sequences,
    cosine_error,
    prefix_objective,
    sample_sequences,
    with_reward_noise,
)
from .experiment import (
    EVAL_SEQUENCES,
    FULL,
    METHODS,
    NOISES,
    PAPER,
    PLOT_KS,
    QUICK,
    TABLE_KS,
    Config,
    Result,
    Row,
    evaluate,
    format_table,
    parameter_count,
    plot,
    run_experiment,
    write_csv,
)
from .gd import ConstructedGD, explicit_gd, gd_baseline, gd_steps
from .model import ROUTES, ICATransformer, RewardSelfAttention, train_model

__all__ = [
    "DIM", "EVAL_SEQUENCES", "EXAMPLES", "FULL", "METHODS", "NOISES", "PAPER", "PLOT_KS", "QUICK",
    "ROUTES", "TABLE_KS", "Config", "ConstructedGD", "ICATransformer", "Result",
    "RewardSelfAttention", "Row", "Sequences", "cosine_error", "evaluate", "explicit_gd",
    "format_table", "gd_baseline", "gd_steps", "main", "parameter_count", "plot",
    "prefix_objective", "run_experiment", "sample_sequences", "train_model", "with_reward_noise",
    "write_csv",
]
