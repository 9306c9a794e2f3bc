"""`alignkern demo ica` (alignkern.examples.ica): in-context alignment's synthetic experiment.

The data generator's statistics, the official Plackett–Luce objective and GD baseline against
literal transcriptions of the official code's loops, the constructed transformer against explicit
gradient descent (float64), and a tiny end-to-end run whose error falls with k."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from alignkern import losses
from alignkern.examples import ica

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ica.Config(width=32, layers=1, heads=4, steps=60, batch=32, lr=3e-3, eval_sequences=128)


# ----------------------------------------------------------------------------- data


def test_sequences_follow_the_official_sampler():
    seqs = ica.sample_sequences(4000, generator=torch.Generator().manual_seed(0),
                                dtype=torch.float64)
    assert seqs.x.shape == (4000, 5) and seqs.responses.shape == (4000, 20, 5)
    assert torch.equal(seqs.observed, seqs.rewards)  # noise-free until with_reward_noise
    assert abs(seqs.x.mean()) < 0.05 and abs(seqs.x.var() - 1) < 0.05
    # each coordinate of x W is N(0, |x|^2) given x: variance E|x|^2 = d
    assert abs(seqs.target.var() / 5 - 1) < 0.1
    r = seqs.rewards
    assert r.min() >= 0 and r.max() < 1 and abs(r.mean() - 0.5) < 0.01
    assert abs(r.var() - 1 / 12) < 0.005
    # y_i = r_i y* + (1 - r_i) eps: every response lies on the line through y* and one eps
    eps = (seqs.responses[:, 0] - r[:, :1] * seqs.target) / (1 - r[:, :1])
    rebuilt = r[..., None] * seqs.target[:, None] + (1 - r[..., None]) * eps[:, None]
    torch.testing.assert_close(rebuilt, seqs.responses)


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_reward_noise_replaces_the_expected_fraction(p):
    generator = torch.Generator().manual_seed(1)
    seqs = ica.sample_sequences(2000, generator=generator)
    noisy = ica.with_reward_noise(seqs, p, generator)
    assert torch.equal(noisy.responses, seqs.responses) and torch.equal(noisy.rewards, seqs.rewards)
    replaced = noisy.observed != seqs.rewards
    count = replaced.numel()
    assert abs(replaced.float().mean() - p) <= 4 * math.sqrt(p * (1 - p) / count) + 1e-4
    if p > 0:  # the replacements are fresh U(0, 1) draws, independent of the true reward
        fresh, true = noisy.observed[replaced], seqs.rewards[replaced]
        assert abs(fresh.mean() - 0.5) < 0.02 and abs(fresh.var() - 1 / 12) < 0.005
        assert abs(torch.corrcoef(torch.stack([fresh, true]))[0, 1]) < 0.05


# ----------------------------------------------------------------------------- the official loops


def official_pl_loss(pred, responses, rewards):
    """The official pl_loss_single, transcribed: sort by reward (descending), cosine scores,
    -log(exp(s_i) / sum_{j >= i} exp(s_j)) summed."""
    order = torch.sort(rewards, descending=True).indices
    scores = torch.exp(F.cosine_similarity(pred[None], responses[order], dim=1))
    suffix = torch.flip(torch.cumsum(torch.flip(scores, [0]), 0), [0])
    return -torch.log(scores / suffix).sum()


def test_prefix_objective_is_the_official_pl_loss_mean_batch():
    generator = torch.Generator().manual_seed(2)
    seqs = ica.sample_sequences(3, examples=7, generator=generator, dtype=torch.float64)
    preds = torch.randn(3, 7, 5, generator=generator, dtype=torch.float64)
    got = ica.prefix_objective(preds, seqs.responses, seqs.observed)
    per_sequence = []
    for b in range(3):  # pl_loss_mean_batch: the prediction from n examples is row n - 1 here
        terms = [official_pl_loss(preds[b, n - 1], seqs.responses[b, :n], seqs.observed[b, :n])
                 for n in range(2, 8)]
        per_sequence.append(sum(terms) / len(terms))
    torch.testing.assert_close(got, sum(per_sequence) / 3)
    # ... and each term is alignkern.losses.plackett_luce_loss of the cosine scores
    scores = F.cosine_similarity(preds[0, 4][None], seqs.responses[0, :5], dim=1)
    torch.testing.assert_close(losses.plackett_luce_loss(scores, seqs.observed[0, :5]),
                               official_pl_loss(preds[0, 4], seqs.responses[0, :5],
                                                seqs.observed[0, :5]))


def test_gd_baseline_is_the_official_per_sequence_loop():
    """One nn.Linear and one Adam per sequence and k, as the official notebook runs them."""
    generator = torch.Generator().manual_seed(3)
    seqs = ica.with_reward_noise(
        ica.sample_sequences(3, generator=generator, dtype=torch.float64), 0.25, generator)
    ks, steps = (2, 6), ica.gd_steps(0.25)
    assert steps == 43
    init = (2 * torch.rand(3, 2, 5, 5, generator=generator, dtype=torch.float64) - 1) / 5 ** 0.5
    got = ica.gd_baseline(seqs, ks, steps=steps, init=init)
    for b in range(3):
        for i, k in enumerate(ks):
            linear = torch.nn.Linear(5, 5, bias=False).double()
            with torch.no_grad():
                linear.weight.copy_(init[b, i].T)  # nn.Linear computes x @ weight.T
            optimizer = torch.optim.Adam(linear.parameters(), lr=0.1)
            for _ in range(steps):
                optimizer.zero_grad()
                official_pl_loss(linear(seqs.x[b]), seqs.responses[b, :k],
                                 seqs.observed[b, :k]).backward()
                optimizer.step()
            torch.testing.assert_close(got[b, i], linear(seqs.x[b]).detach(), rtol=1e-7,
                                       atol=1e-9)
    assert not torch.allclose(got, torch.einsum("bi,bkij->bkj", seqs.x, init))  # it trained


# ----------------------------------------------------------------------------- the construction


@pytest.mark.parametrize("layers, lr, temperature", [(1, 10.0, 50.0), (4, 10.0, 50.0),
                                                      (3, 0.01, 1.0)],
                         ids=["one-step", "four-steps", "theorem-score"])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_constructed_transformer_is_explicit_gradient_descent(layers, lr, temperature, p):
    generator = torch.Generator().manual_seed(4)
    seqs = ica.with_reward_noise(
        ica.sample_sequences(64, generator=generator, dtype=torch.float64), p, generator)
    construction = ica.ConstructedGD(layers=layers, lr=lr, temperature=temperature)
    for k in (2, 3, 8, 15):
        responses, rewards = seqs.responses[:, :k], seqs.observed[:, :k]
        built = construction(responses, rewards)
        ref = ica.explicit_gd(responses, rewards, steps=layers, lr=lr, temperature=temperature)
        torch.testing.assert_close(built, ref, rtol=0, atol=1e-5)
        assert built.abs().max() > 1e-3  # it moved from y_hat = 0
    # each layer is a step: one layer fewer is a different point
    fewer = ica.ConstructedGD(layers=layers + 1, lr=lr, temperature=temperature)
    assert (fewer(responses, rewards) - built).abs().max() > 1e-6


def test_one_constructed_layer_is_the_suffix_average_step():
    """One layer by brute force: y_hat = lr * 2 / (tau k) * sum_i (y_i - ybar_i), ybar_i the
    softmax(-|y_j|^2 / tau)-weighted average of the examples ranked at or below i."""
    generator = torch.Generator().manual_seed(5)
    seqs = ica.sample_sequences(2, examples=6, generator=generator, dtype=torch.float64)
    lr, tau = 3.0, 20.0
    got = ica.ConstructedGD(layers=1, lr=lr, temperature=tau)(seqs.responses, seqs.observed)
    for b in range(2):
        y, r = seqs.responses[b], seqs.observed[b]
        total = torch.zeros(5, dtype=torch.float64)
        for i in range(6):
            below = r <= r[i]
            weights = torch.softmax(-(y[below] ** 2).sum(-1) / tau, 0)
            total += y[i] - weights @ y[below]
        torch.testing.assert_close(got[b], lr * 2 / (tau * 6) * total)


# ----------------------------------------------------------------------------- the trained model


@pytest.mark.parametrize("route", ica.ROUTES)
def test_transformer_is_causal_and_the_rewards_reach_its_attention(route):
    generator = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    model = ica.ICATransformer(width=16, layers=2, heads=2, route=route)
    seqs = ica.sample_sequences(4, examples=8, generator=generator)
    out = model(seqs.x, seqs.responses, seqs.observed)
    assert out.shape == (4, 8, 5)
    later = seqs.responses.clone()
    later[:, 5:] += 1.0
    changed = model(seqs.x, later, seqs.observed)
    torch.testing.assert_close(changed[:, :5], out[:, :5])  # row t reads examples 0..t only
    assert (changed[:, 5:] - out[:, 5:]).abs().max() > 1e-4
    # the rewards take two ways in: the tokens, and (except "none") the attention; remove the
    # tokens' way, and the output still depends on the rewards only through reward_attention
    model.read_in.weight.data[:, -1] = 0
    base = model(seqs.x, seqs.responses, seqs.observed)
    moved = model(seqs.x, seqs.responses, seqs.observed.flip(-1))
    assert ((moved - base).abs().max() > 1e-4) == (route != "none")
    ica.prefix_objective(base, seqs.responses, seqs.observed).backward()
    for block in model.blocks:
        beta = block.attn.beta
        assert (beta is not None) == (route in ("bias", "both"))
        if beta is not None:
            assert beta.grad is not None and beta.grad.abs().max() > 0


def test_tiny_run_error_falls_with_k():
    result = ica.run_experiment(TINY, noises=(0.0, 1.0), ks=(2, 15))
    error = {(r.p, r.k, r.method): r.one_minus_cos for r in result.rows}
    assert len(result.rows) == 2 * 2 * len(ica.METHODS) and len(result.losses) == TINY.steps
    assert sum(result.losses[-10:]) < sum(result.losses[:10])  # training lowered the objective
    for method in ("tf", "gd"):
        assert error[(0.0, 15, method)] < error[(0.0, 2, method)] - 0.02, method
        assert error[(0.0, 15, method)] < error[(1.0, 15, method)] - 0.2, method  # noise hurts
    assert result.construction_gap < 1e-10
    assert error[(0.0, 15, "constructed")] == pytest.approx(error[(0.0, 15, "constructed_ref")])


# ----------------------------------------------------------------------------- command line


def test_demo_ica_writes_the_table_csv_and_figure(tmp_path, capsys):
    from alignkern.__main__ import main

    assert main(["demo", "ica", "--quick", "--steps", "20", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "constructed_ref" in printed and "paper gd" in printed and "max |difference|" in printed
    with open(tmp_path / "ica.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["p", "k", "method", "one_minus_cos"]
    assert {r["method"] for r in rows} == set(ica.METHODS)
    assert {float(r["p"]) for r in rows} == set(ica.NOISES)
    assert {int(r["k"]) for r in rows} >= set(ica.TABLE_KS)
    assert len(rows) == len(ica.NOISES) * len(ica.PLOT_KS) * len(ica.METHODS)
    assert all(0 <= float(r["one_minus_cos"]) <= 2 for r in rows)
    assert (tmp_path / "ica.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_help_mentions_ica(capsys):
    from alignkern.loops import demo

    with pytest.raises(SystemExit) as exit_:
        demo.main(["--help"])
    assert exit_.value.code == 0 and "ica" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads: must be at least 1, got 0"),
    (["--route", "sideways"], "--route: invalid choice"),
    (["--steps", "many"], "--steps: not an integer"),
    (["--out", "FILE"], "cannot write the results there (it is a file, not a folder)"),
    # a folder under a file: refused before training, not with an OSError after it
    (["--out", "FILE/sub"], "cannot write the results there (NotADirectoryError"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / a) if a.startswith("FILE") else a for a in argv]
    with pytest.raises(SystemExit) as exit_:
        ica.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err
