"""`alignkern demo`: the list of demos (one table, alignkern._demos), its help, the thread default
and the verdict each table ends with."""

import sys
import types

import pytest
import torch

pytest.importorskip("transformers")

from test_loops_helpers import model, tokenizer  # noqa: E402

from alignkern import _demos  # noqa: E402
from alignkern.__main__ import main  # noqa: E402
from alignkern.loops import demo  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_demo_help_lists_every_demo_in_plain_text(capsys):
    text = _help(capsys, ["demo", "--help"])
    listed = text.split("\ndemos:\n")[1].split("\n\n")[0]
    names = [line.split()[0] for line in listed.splitlines() if not line.startswith("    ")]
    assert names == [*_demos.DEMOS, "all"]
    assert "ica" in names and set(demo.DEMOS) == set(_demos.LOOPS)
    assert "`" not in text  # no reST markup in a terminal
    assert "`" not in _help(capsys, ["demo", "ica", "--help"])


@pytest.fixture
def extra_demo(monkeypatch):
    """A demo added as one entry of alignkern._demos.DEMOS, with a program of its own."""
    seen = []
    module = types.ModuleType("fake_demo_program")
    module.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "fake_demo_program", module)
    monkeypatch.setitem(_demos.DEMOS, "fake", _demos.Demo("a demo added in one line",
                                                          "fake_demo_program"))
    return seen


def test_a_demo_added_to_the_table_is_listed_and_dispatched(extra_demo, capsys):
    assert "fake" in _help(capsys, ["demo", "--help"])
    assert "a demo added in one line" in _help(capsys, ["demo", "--help"])
    assert main(["demo", "fake", "--its-own", "1"]) == 7
    assert demo.main(["fake"]) == 7
    assert extra_demo == [["--its-own", "1"], []]


def test_a_program_demo_after_an_option_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--seed", "2", "ica"])
    assert exit_.value.code == 2
    assert "ica takes options of its own: put its name first" in capsys.readouterr().err


@pytest.mark.parametrize("argv, threads", [
    ([], 1),  # the tiny model: one thread, the fastest measured
    (["--threads", "2"], 2),
    (["--model", "DIR"], None),  # a checkpoint of one's own: torch's default, untouched
])
def test_thread_default(monkeypatch, argv, threads):
    calls, ran = [], []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(demo, "_load", lambda path, device: (None, None, "stub"))
    monkeypatch.setattr(demo, "DEMOS", {name: lambda *a, n=name: ran.append(n)
                                        for name in demo.DEMOS})
    assert demo.main(argv) == 0
    assert calls == ([] if threads is None else [threads])
    assert ran == list(_demos.LOOPS)


def test_threads_below_one_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--threads", "0"])
    assert exit_.value.code == 2
    assert "argument --threads: must be at least 1, got 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- verdicts


def _row(wall, peak, forwards=2, head_rows=32, positions=100, value=(1.0, 2.0), evaluated=16):
    return {"way": "x", "forwards": forwards, "evaluated": evaluated, "head rows": head_rows,
            "positions": positions, "wall ms": wall, "peak MiB": peak,
            "value": torch.tensor(value)}


def _verdict(capsys, ours, theirs, **kwargs) -> list[str]:
    demo._verdict(ours, theirs, ("ours", "theirs"), model(), **kwargs)
    return [line.strip() for line in capsys.readouterr().out.strip().splitlines()]


def test_verdict_ratios_come_from_the_numbers(capsys):
    lines = _verdict(capsys, _row(50.0, 10.0, forwards=2, head_rows=32),
                     _row(100.0, 30.0, forwards=32, head_rows=3200))
    assert lines == ["verdict: ours against theirs: 2.0x faster, 16x fewer forwards, 100x fewer "
                     "head rows, 3.0x less peak memory; the same results (max |difference| "
                     "0.0e+00)"]
    lines = _verdict(capsys, _row(104.0, 10.5), _row(100.0, 10.0), extra="; and more")
    assert lines == ["verdict: ours against theirs: about as fast, about the same peak memory; "
                     "the same results (max |difference| 0.0e+00); and more"]


def test_verdict_flags_different_results(capsys):
    (line,) = _verdict(capsys, _row(50.0, 10.0), _row(50.0, 10.0, value=(1.0, 2.01)))
    assert "DIFFERENT results (max |difference| 1.0e-02" in line


def test_verdict_says_why_ours_is_slower_with_less_work(capsys):
    """check-and-correct's case: prefix reuse runs 3 more forwards, each dearer, to save 12 % of
    the positions."""
    verdict, why = _verdict(capsys, _row(300.0, 1.2, forwards=103, positions=811),
                            _row(200.0, 1.2, forwards=100, positions=923))
    assert "1.5x slower, 3 more forwards, 112 fewer positions (12%)" in verdict
    config = model().config
    assert why == (f"why: slower: 3 more forwards and 2.91 ms of wall time per forward against "
                   f"2.00 outweigh the 112 fewer positions (12%) it processes, on a model this "
                   f"small (H = {config.hidden_size}, V = {config.vocab_size}, "
                   f"{config.num_hidden_layers} layers)")


def test_verdict_says_why_ours_holds_more_memory(capsys):
    # batched: every candidate's activations at once, where the other runs one at a time
    verdict, why = _verdict(capsys, _row(50.0, 20.0, forwards=2), _row(100.0, 1.5, forwards=32),
                            items="candidates")
    assert "13.3x more peak memory" in verdict
    assert why == ("why: more memory: it runs the 16 candidates in 2 batched forwards where "
                   "theirs runs 32, so more activations are alive at once")
    # the same forwards, fewer logits, no less memory: the logits are small at this vocabulary
    vocab = model().config.vocab_size
    _, why = _verdict(capsys, _row(50.0, 6.0, forwards=1, head_rows=500),
                      _row(50.0, 6.2, forwards=1, head_rows=752))
    assert why == (f"why: no less memory although it projects 252 fewer rows through the LM head: "
                   f"at V = {vocab} their float32 logits are at most "
                   f"{252 * vocab * 4 / 2**20:.1f} MiB, against a peak of 6.2 MiB for theirs; "
                   f"they grow with V")


def test_likelihood_scoring_runs_without_autograd_like_the_naive_way(monkeypatch, capsys):
    """score_generations was timed with autograd on (its graph alive at the peak) against a naive
    way under no_grad: both now score without a gradient."""
    from alignkern.integrations import transformers as ak_hf

    grad_modes = []
    score = ak_hf.score_generations
    monkeypatch.setattr(demo.ak_hf, "score_generations",
                        lambda *a, **k: grad_modes.append(torch.is_grad_enabled()) or score(*a, **k))
    demo._likelihood_scoring(model(), tokenizer(), torch.device("cpu"), seed=0, n=2)
    assert grad_modes and not any(grad_modes)
    assert "verdict: score_generations against full logits" in capsys.readouterr().out
