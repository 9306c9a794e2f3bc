"""`alignkern demo evidence` (alignkern.examples.evidence): the task's checker and tokenizer, the
training examples and a training step, the Wilson interval, and `--quick` runs of the whole
pipeline (every method's rows in evidence.csv, the same CSV again for the same seed and for the
saved model loaded back, the command line's errors)."""

import csv
import math
import random

import pytest
import torch

from alignkern.examples import evidence
from alignkern.examples.evidence import methods, task, training

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the task


def test_the_answer_is_the_sum_reversed_and_the_checker_accepts_only_it():
    rng = random.Random(0)
    for _ in range(200):
        problem = task.sample_problem(rng, 3)
        answer = problem.answer
        assert answer.endswith(".") and int(answer[:-1][::-1]) == problem.a + problem.b
        assert task.is_correct(problem, answer) and task.is_correct(problem, f"  {answer}\n")
        assert not task.is_correct(problem, answer[:-1])  # no full stop
        assert not task.is_correct(problem, answer + "0")
        assert task.is_correct(problem, problem.prompt + answer)  # a second attempt's form
        assert not task.is_correct(problem, f"{problem.a + 1}+{problem.b}=" + answer)
        digit = str((int(answer[0]) + 1) % 10)
        assert not task.is_correct(problem, digit + answer[1:])


def test_operands_have_each_length_equally_often():
    rng = random.Random(1)
    lengths = [len(str(task.sample_problem(rng, 3).a)) for _ in range(3000)]
    for length in (1, 2, 3):
        assert abs(lengths.count(length) / 3000 - 1 / 3) < 0.04


def test_parse_problem_reads_a_prompt_back_and_refuses_other_text():
    problem = task.Problem(57, 968)
    assert task.parse_problem(problem.prompt) == problem
    for text in ("57+968", "57-968=", "a+1=", "57+968=1025."):
        with pytest.raises(ValueError, match="parse_problem: expected a prompt 'a\\+b='"):
            task.parse_problem(text)


def test_held_out_problems_are_distinct_seeded_and_never_trained_on():
    held = task.held_out(200, 3, seed=0)
    assert len(set(held)) == 200
    assert held == task.held_out(200, 3, seed=0) and held != task.held_out(200, 3, seed=1)
    stream = task.training_stream(3, 0, held)
    assert not set(held) & {next(stream) for _ in range(5000)}


def test_tokenizer_is_one_token_per_character_and_round_trips():
    tok = task.tokenizer()
    text = "57+968=5201.\nIs it right? (A) yes (B) no"
    ids = tok(text)["input_ids"]
    assert ids[0] == task.BOS and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok) == task.VOCAB


# ----------------------------------------------------------------------------- training examples


@pytest.fixture(scope="module")
def small():
    """A small fresh model, its tokenizer and judge."""
    model = training.build_model(training.TrainConfig(hidden=32, layers=1), seed=0)
    tok = task.tokenizer()
    return model, tok, training.judge(model, tok)


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("right", [True, False])
def test_the_judge_is_taught_the_letter_listed_next_to_the_true_verdict(small, order, right):
    """Both listing orders of RAIN's option swap: the label is the letter printed before "yes"
    exactly when the answer is right."""
    model, tok, judge = small
    problem = task.Problem(57, 968)
    response = problem.answer if right else "5202."
    example = training.judge_example(tok, judge, problem, response, order)
    target = [t for t in example.labels if t != training.IGNORE]
    assert len(target) == 1 and example.ids[-1] == target[0]
    letter = tok.decode(target)
    text = tok.decode(example.ids[:-1], skip_special_tokens=True)
    assert text == judge.texts([problem.prompt], [response])[order][0]
    listed = text.split("Is it right? ")[1].split("\n")[0]
    assert f"({letter}) {'yes' if right else 'no'}" in listed


def test_correction_and_retry_examples_target_only_the_answer(small):
    from alignkern.loops import build_context

    _, tok, _ = small
    problem = task.Problem(57, 968)
    example = training.correction_example(tok, problem, ["5202.", "5200."], [-0.5, 0.25])
    context = build_context(tok, problem.prompt, ["5202.", "5200."], [-0.5, 0.25],
                            training.context_template())
    assert example.ids[:len(context.input_ids)] == context.input_ids
    assert "5202. reward -0.50\n5" in context.text and context.text.endswith(problem.prompt)
    target = [t for t in example.labels if t != training.IGNORE]
    assert tok.decode(target, skip_special_tokens=True) == problem.answer
    assert target[-1] == task.EOS and example.ids[-len(target):] == target
    retry = training.retry_example(tok, problem, "5202.")
    assert tok.decode(retry.ids, skip_special_tokens=True) == \
        problem.prompt + "5202." + task.CORRECTION + problem.prompt + problem.answer


def test_the_loss_counts_only_targets_and_weighs_each_example_once(small):
    model, tok, _ = small
    a = training.answer_example(tok, task.Problem(5, 7))
    b = training.answer_example(tok, task.Problem(123, 456))
    ids, mask, labels = training.collate([a, b])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
        per = []
        for row in range(2):
            positions = (labels[row, 1:] != training.IGNORE).nonzero()[:, 0]
            logp = torch.log_softmax(logits[row, positions], -1)
            per.append(-logp.gather(1, labels[row, 1 + positions][:, None]).mean())
        got = training.loss_on(model, [a, b])
    torch.testing.assert_close(got.double(), (per[0] + per[1]) / 2, rtol=1e-5, atol=1e-6)


def test_a_few_training_steps_lower_the_loss_on_a_fixed_seed():
    model = training.build_model(training.TrainConfig(hidden=32, layers=1), seed=0)
    tok = task.tokenizer()
    rng = random.Random(0)
    batch = [training.answer_example(tok, task.sample_problem(rng, 3)) for _ in range(32)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = [training.step(model, optimizer, batch) for _ in range(8)]
    with torch.no_grad():
        after = training.loss_on(model, batch).item()
    assert after < 0.8 * losses[0]
    assert not model.training  # step leaves the model in eval mode


# ----------------------------------------------------------------------------- the interval


@pytest.mark.parametrize("correct, total", [(0, 10), (3, 10), (10, 10), (57, 200), (1, 1)])
def test_wilson_bounds_solve_the_score_equation(correct, total):
    """The Wilson bounds are the p with |p_hat - p| = z sqrt(p (1 - p) / n)."""
    z = 1.959963984540054
    low, high = methods.wilson(correct, total)
    p_hat = correct / total
    assert 0 <= low <= p_hat <= high <= 1
    for bound in (low, high):
        if bound in (0.0, 1.0) and bound == p_hat:
            continue
        assert math.isclose((p_hat - bound) ** 2, z * z * bound * (1 - bound) / total,
                            rel_tol=1e-9, abs_tol=1e-12)


def test_wilson_narrows_with_more_problems_and_is_uninformative_without_any():
    assert methods.wilson(0, 0) == (0.0, 1.0)
    widths = [methods.wilson(n // 2, n)[1] - methods.wilson(n // 2, n)[0] for n in (10, 100, 1000)]
    assert widths[0] > widths[1] > widths[2]


def test_the_checker_evaluator_rewards_plus_and_minus_one():
    problem = task.Problem(57, 968)
    scores = methods.Checker().score(problem.prompt, [problem.answer, "5202.", ""])
    assert scores.tolist() == [1.0, -1.0, -1.0]


def test_stage_two_trains_a_copy_and_leaves_the_model_alone(small, monkeypatch):
    """(An untrained model answers nothing right, so every advantage would be 0 and the step a
    no-op: a reward that differs between answers stands in for the checker.)"""
    model, tok, _ = small
    monkeypatch.setattr(methods, "reward", lambda prompts, responses: [
        float(len(r) % 2) for r in responses])
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(0)
    policy = methods.stage_two(model, tok, task.training_stream(1, 0, []),
                               methods.StageTwo(steps=2, batch=4, lr=1e-3),
                               training.max_retry_tokens(1))
    assert policy is not model and not policy.training
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


# ----------------------------------------------------------------------------- --quick runs


def _rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `--quick` run (seed 3), its model saved: (output folder, model folder)."""
    out, saved = tmp_path_factory.mktemp("quick"), tmp_path_factory.mktemp("model")
    assert evidence.main(["--quick", "--seed", "3", "--out", str(out),
                          "--save-model", str(saved)]) == 0
    return out, saved


def test_quick_run_writes_every_method_s_rows(quick):
    out, _ = quick
    columns, rows = _rows(out / "evidence.csv")
    assert tuple(columns) == methods.CSV_COLUMNS == (
        "method", "setting", "accuracy", "ci_low", "ci_high", "forwards", "tokens", "seconds")
    settings = [(r["method"], r["setting"]) for r in rows]
    assert [m for m, _ in settings][:2] == ["greedy", "sampled"]
    best = [s for m, s in settings if m == "best-of-n"]
    assert best == [f"n={n} {score}" for n in (4, 8, 16) for score in ("likelihood", "self_eval")]
    assert [s for m, s in settings if m == "rain"] == ["defaults"]
    corrections = [s for m, s in settings if m == "check-and-correct"]
    assert [s.split(" beta")[0] for s in corrections] == [
        f"rounds=3 reward={source} reward_bias={bias}" for source in ("self_eval", "checker")
        for bias in ("off", "on")]
    score = [s for m, s in settings if m == "score"]
    assert [s.split(" delta=")[0] for s in score] == [
        "attempt=2 before stage II", "attempt=1 after 3 stage-II steps",
        "attempt=2 after 3 stage-II steps"]
    accuracy = {(m, s): float(r["accuracy"]) for r, (m, s) in zip(rows, settings)}
    firsts = (accuracy[("greedy", "")], accuracy[("score", score[1])])  # the same model's
    for first, setting in zip(firsts, (score[0], score[2])):
        stats = dict(part.split("=") for part in setting.split() if part.split("=")[0] in
                     ("delta", "fixed", "broken"))
        delta, fixed, broken = (float(stats[k]) for k in ("delta", "fixed", "broken"))
        assert math.isclose(delta, accuracy[("score", setting)] - first, abs_tol=1e-3)
        assert math.isclose(delta, fixed - broken, abs_tol=1e-3)
    assert {m for m, _ in settings} == set(methods.METHODS)
    problems = evidence.QUICK.problems
    for r in rows:
        accuracy, low, high = float(r["accuracy"]), float(r["ci_low"]), float(r["ci_high"])
        assert 0 <= low <= accuracy <= high <= 1
        assert math.isclose(accuracy * problems, round(accuracy * problems), abs_tol=1e-3)
        assert int(r["forwards"]) > 0 and int(r["tokens"]) > 0 and float(r["seconds"]) >= 0
    tokens = {s: int(r["tokens"]) for r, (m, s) in zip(rows, settings) if m == "best-of-n"}
    assert tokens["n=4 likelihood"] < tokens["n=8 likelihood"] < tokens["n=16 likelihood"]
    assert (out / "evidence.png").stat().st_size > 10_000


def _without_seconds(path):
    _, rows = _rows(path)
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_the_csv_is_reproducible_for_a_fixed_seed(quick, tmp_path):
    out, _ = quick
    assert evidence.main(["--quick", "--seed", "3", "--out", str(tmp_path), "--no-plot"]) == 0
    assert _without_seconds(tmp_path / "evidence.csv") == _without_seconds(out / "evidence.csv")


def test_the_saved_model_loaded_with_model_gives_the_same_rows(quick, tmp_path, capsys):
    out, saved = quick
    assert evidence.main(["--quick", "--seed", "3", "--out", str(tmp_path), "--no-plot",
                          "--model", str(saved)]) == 0
    assert "training the model" not in capsys.readouterr().out
    assert _without_seconds(tmp_path / "evidence.csv") == _without_seconds(out / "evidence.csv")


# ----------------------------------------------------------------------------- the command line


def test_bad_arguments_are_one_line_errors_before_any_training(tmp_path, capsys, monkeypatch):
    def trained(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(training, "train", trained)
    a_file = tmp_path / "file"
    a_file.write_text("")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text('{"model_type": "llama"}')
    cases = {
        ("--out", str(a_file)): f"--out {str(a_file)!r}: cannot write there",
        ("--model", str(tmp_path / "missing")): "no such folder",
        ("--model", str(a_file)): "a file, not a folder",
        ("--model", str(tmp_path)): "the folder has no config.json",
        ("--model", str(config_only)): "cannot use it (",
        ("--model", str(config_only), "--save-model", str(tmp_path / "m")):
            "--save-model saves a trained model",
        ("--seed", "-1"): "argument --seed: must be in [0, 2**31)",
        ("--threads", "0"): "argument --threads: must be at least 1",
    }
    for argv, why in cases.items():
        with pytest.raises(SystemExit) as stop:
            evidence.main(["--out", str(tmp_path / "out"), *argv])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("alignkern demo evidence: error: ") and why in err
        assert err.count("\n") == 1


@pytest.mark.parametrize("entry", ["alignkern", "loops.demo"])
def test_alignkern_demo_evidence_reaches_the_example(monkeypatch, entry):
    from alignkern import __main__ as cli
    from alignkern.examples.evidence import cli as evidence_cli
    from alignkern.loops import demo

    seen = []
    monkeypatch.setattr(evidence_cli, "main", lambda argv: seen.append(argv) or 0)
    if entry == "alignkern":
        assert cli.main(["demo", "evidence", "--quick", "--seed", "2"]) == 0
    else:
        assert demo.main(["evidence", "--quick", "--seed", "2"]) == 0
    assert seen == [["--quick", "--seed", "2"]]


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as stop:
        evidence.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "`" not in text and "alignkern demo evidence [--quick]" in text
