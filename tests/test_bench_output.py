"""What `alignkern bench` shows and writes: the output folder, the CLI's errors, honest timing (the
noise flag), the table and the figure. Synthetic results and tiny cases: seconds, not minutes."""

import csv
import hashlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

import alignkern
from alignkern import bench
from alignkern.__main__ import main
from alignkern.bench import measure, report
from alignkern.bench.report import FLOOR, Result

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
# The cheapest real run: one tiny op family, a short timing budget.
TINY = [
    "bench",
    "--quick",
    "--device",
    "cpu",
    "--ops",
    "plackett_luce_loss",
    "--no-progress",
    "--budget",
    "0.05",
]


def _digest(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------ the output folder


def test_default_run_writes_a_new_folder_under_the_cwd_and_nothing_in_the_repository(
    tmp_path, monkeypatch, capsys
):
    committed = _digest(REPO / "benchmarks" / "results")
    in_repo = _digest(REPO / bench.OUT_ROOT)
    monkeypatch.chdir(tmp_path)
    assert main(TINY) == 0
    out = capsys.readouterr().out
    folders = list((tmp_path / bench.OUT_ROOT).iterdir())
    assert len(folders) == 1
    folder = folders[0]
    assert re.fullmatch(r"cpu-\d{8}T\d{6}Z", folder.name)
    assert sorted(p.name for p in folder.iterdir()) == ["cpu.csv", "cpu.json", "cpu.md", "cpu.png"]
    assert f"Results in {folder.resolve()}" in out  # the absolute path, printed at the end
    env = json.loads((folder / "cpu.json").read_text())
    assert env["alignkern"] == alignkern.__version__ and env["torch"] == torch.__version__
    assert env["device"]["type"] == "cpu" and env["cpu"]["torch_threads"] >= 1
    assert env["cpu"]["model"] and env["git_sha"] and env["run"]["scope"] == "quick"
    with open(folder / "cpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["kernel"] for r in rows} == {"plackett_luce_loss"}
    assert {r["unit"] for r in rows} >= {"ms", "candidates/s"}
    # nothing written into the checkout
    assert _digest(REPO / "benchmarks" / "results") == committed
    assert _digest(REPO / bench.OUT_ROOT) == in_repo
    # a second run gets a folder of its own, not the first one's files overwritten
    assert bench.default_out_dir(CPU) != folder


def test_out_chooses_the_folder_and_save_results_alone_writes_the_committed_files(
    tmp_path, monkeypatch, capsys
):
    checkout = tmp_path / "checkout"
    (checkout / "benchmarks" / "results").mkdir(parents=True)
    monkeypatch.setattr(report, "repository_root", lambda: checkout)
    monkeypatch.chdir(tmp_path)
    assert main([*TINY, "--no-plot", "--out", str(tmp_path / "mine")]) == 0
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["cpu.csv", "cpu.json", "cpu.md"]
    assert not (checkout / "benchmarks" / "results").exists() or not any(
        (checkout / "benchmarks" / "results").iterdir()
    )
    assert not (tmp_path / bench.OUT_ROOT).exists()
    assert main([*TINY, "--no-plot", "--out", str(tmp_path / "again"), "--save-results"]) == 0
    saved = sorted(p.name for p in (checkout / "benchmarks" / "results").iterdir())
    assert saved == ["cpu.csv", "cpu.json", "cpu.md"]
    assert "Saved as the committed results" in capsys.readouterr().out


def test_an_interrupted_run_writes_the_finished_families_and_exits_130(
    tmp_path, monkeypatch, capsys
):
    """gpu_check.sh stops a stage with SIGINT at its time limit: what was measured must survive."""
    real = bench.bench_family
    calls = []

    def second_family_interrupted(module, *args, **kwargs):
        calls.append(module)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(module, *args, **kwargs)

    monkeypatch.setattr(bench, "bench_family", second_family_interrupted)
    argv = [*TINY[:5], "plackett_luce_loss,linear_kl", *TINY[6:], "--no-plot"]
    assert main([*argv, "--out", str(tmp_path / "cut")]) == 130
    assert "Interrupted" in capsys.readouterr().err
    with open(tmp_path / "cut" / "cpu.csv") as f:
        assert {r["kernel"] for r in csv.DictReader(f)} == {"plackett_luce_loss"}
    assert json.loads((tmp_path / "cut" / "cpu.json").read_text())["run"]["interrupted"] is True


def test_save_results_outside_a_checkout_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "repository_root", lambda: None)
    assert main([*TINY, "--out", str(tmp_path), "--save-results"]) == 2
    assert "--save-results" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize(
    "args, wrong, valid",
    [
        (["--ops", "foo"], "'foo'", bench.OPS),
        (["--ops", "token_logprobs,nope"], "'nope'", bench.OPS),
        (["--providers", "nonexistent"], "'nonexistent'", ("torch-compile", "liger", "flex-attention")),
        (["--ops", "token_logprobs", "--providers", "liger"], "'liger'", ("torch-eager",)),
    ],
    ids=["op", "op-in-list", "provider", "provider-of-another-op"],
)
def test_unknown_names_are_a_one_line_error_with_the_choices_and_exit_code_2(
    tmp_path, capsys, args, wrong, valid
):
    assert main(["bench", "--device", "cpu", "--out", str(tmp_path), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alignkern bench: error: unknown")
    assert wrong in lines[0] and all(name in lines[0] for name in valid)
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


def test_bench_help_lists_op_families_and_providers_in_plain_words(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for op, module in bench.FAMILIES.items():
        assert op in text
        for provider in bench.provider_names(module):
            assert provider in text
    for option in ("--quick", "--full", "--out", "--save-results", "--loops", "--budget"):
        assert option in text
    assert "``" not in text and ":func:" not in text  # no raw RST markup
    listing = text[text.index("op families (--ops)") :]
    for op in bench.FAMILIES:  # each name stands apart from its first provider
        assert re.search(rf"^  {op}  +alignkern,", listing, re.M), op


def test_version_and_an_unknown_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == (f"alignkern {alignkern.__version__}")
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--fast"])
    assert exit_.value.code == 2 and "unrecognized arguments: --fast" in capsys.readouterr().err


def test_demo_passes_its_arguments_to_the_loops_demo(monkeypatch):
    seen = []
    import alignkern.loops.demo as demo

    monkeypatch.setattr(demo, "main", lambda argv=None: seen.append(argv) or 0)
    assert main(["demo", "rain", "--seed", "3", "--device", "cpu"]) == 0
    assert main(["demo", "--help"]) == 0
    assert seen == [["rain", "--seed", "3", "--device", "cpu"], ["--help"]]


def test_demo_help_is_the_demos_own(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: alignkern demo" in text
    assert all(loop in text for loop in ("best-of-n", "rain", "check-and-correct", "score"))


def test_bench_loops_prints_the_report_and_writes_its_rows(tmp_path, monkeypatch, capsys):
    from alignkern.bench import loops

    calls = []
    rows = [
        {
            "case": "self_eval",
            "config": "N=8",
            "provider": "alignkern",
            "device": "cpu",
            "threads": 2,
            "ms": 1.5,
            "peak_mib": 3.0,
            "forwards": 1,
            "positions": 80,
            "head_rows": 16,
            "ratio": 4.2,
            "memory_ratio": 1.5,
            "max_abs_diff": 1e-6,
        }
    ]

    def fake(device=None, *, quick=False, n_values=None):
        calls.append((torch.device(device), quick))
        return rows

    monkeypatch.setattr(loops, "run_loops_benchmark", fake)
    assert main(["bench", "--loops", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert calls == [(CPU, True)]
    assert "self_eval" in capsys.readouterr().out
    with open(tmp_path / "cpu-loops.csv") as f:
        assert list(csv.DictReader(f))[0]["ratio"] == "4.2"
    assert (tmp_path / "cpu.json").exists()
    assert main(["bench", "--loops", "--ops", "linear_kl", "--out", str(tmp_path)]) == 2


def test_progress_bar_is_tqdm_on_a_terminal_and_plain_lines_otherwise(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", io.StringIO())
    quiet = bench._Progress(3, enabled=True)
    assert quiet.bar is None and quiet.lines  # a log gets lines, not \r frames
    quiet.family("token_logprobs (1/6)")
    quiet.step("x")
    quiet.done()
    quiet.close()
    assert "\r" not in __import__("sys").stderr.getvalue()
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    shown = bench._Progress(3, enabled=True)
    assert shown.bar is not None and not shown.lines
    assert type(shown.bar).__module__.startswith("tqdm")
    shown.step("token_logprobs")
    shown.done()
    assert shown.bar.n == 1 and shown.bar.total == 3
    shown.close()
    assert "0/3" in terminal.getvalue()  # drawn on the terminal
    off = bench._Progress(3, enabled=False)
    assert off.bar is None and not off.lines


def test_scopes_pick_the_cases():
    for module in bench.FAMILIES.values():
        full = [c.label for c in module.cases(CPU, False)]
        assert [c.label for c in bench.select_cases(module, CPU, "full")] == full
        quick = [c.label for c in bench.select_cases(module, CPU, "quick")]
        assert quick == [c.label for c in module.cases(CPU, True)]
        default = bench.select_cases(module, CPU, "default")
        assert len(default) == 1  # one representative case per family on a CPU
    with pytest.raises(bench.BenchError):
        bench.select_cases(bench.FAMILIES["linear_kl"], CPU, "everything")


# ------------------------------------------------------------------------------ honest timing


def test_summarize_and_the_noisy_flag():
    tight = measure.summarize([10.0, 10.1, 9.9, 10.05, 9.95, 10.0])
    assert tight.p20 <= tight.p50 <= tight.p80 and tight.spread < measure.TARGET_SPREAD
    assert not tight.noisy
    wide = measure.summarize([1.2, 1.3, 24.0, 1.4, 22.0, 1.25, 23.0, 1.35])  # bimodal, as seen
    assert wide.spread > measure.NOISY_SPREAD and wide.noisy


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_time_interleaved_takes_turns_and_repeats_until_the_spread_is_small_or_budget_ends():
    clock, calls = FakeClock(), []
    noisy_durations = iter([0.005, 0.040] * 10_000)  # seconds: alternating 5 ms and 40 ms

    def steady():
        calls.append("steady")
        clock.now += 0.010

    def noisy():
        calls.append("noisy")
        clock.now += next(noisy_durations)

    timings = measure.time_interleaved(
        {"steady": steady, "noisy": noisy}, CPU, budget_s=2.0, clock=clock, min_reps=5
    )
    steady_t, noisy_t = timings["steady"], timings["noisy"]
    # steady converged at once (min_reps samples); noisy ran on until the budget was spent
    assert steady_t.samples == 5 and steady_t.spread < 1e-9 and steady_t.p50 == pytest.approx(10)
    assert noisy_t.samples > 20 and noisy_t.noisy
    assert clock.now >= 2.0
    # interleaved: while both were timed, every round held one call of each
    both = calls[: 2 * steady_t.samples]
    for i in range(0, len(both), 2):
        assert sorted(both[i : i + 2]) == ["noisy", "steady"]


def test_time_interleaved_reports_an_exception_instead_of_raising():
    clock = FakeClock()

    def ok():
        clock.now += 0.003

    def broken():
        raise RuntimeError("no backward here")

    timings = measure.time_interleaved({"ok": ok, "broken": broken}, CPU, budget_s=0.1, clock=clock)
    assert isinstance(timings["broken"], RuntimeError)
    assert isinstance(timings["ok"], measure.Timing) and timings["ok"].p50 == pytest.approx(3)


def _row(provider, ms, kernel="linear_logprobs", mode="fwd", config="N=128 H=256 V=32000", x=32000, **kw):
    return Result(
        kernel,
        provider,
        mode,
        config,
        x,
        bytes_moved=kw.pop("bytes_moved", 10**8),
        ms=ms,
        samples=kw.pop("samples", 20),
        flops=kw.pop("flops", 10**9),
        **kw,
    )


def test_a_ratio_past_its_bound_is_flagged_as_noise_not_printed():
    results = [
        _row("alignkern", (1.0, 0.98, 1.02)),
        _row(FLOOR, (1.9, 1.85, 1.95)),
        _row("torch-eager", (3.0, 2.9, 3.1)),
    ]
    verdicts = report.assess(results)
    ours = verdicts[id(results[0])]
    assert ours.status == "noisy" and ours.bound == "noise"
    text = report.table(results, CPU)
    assert "0.53x floor" not in text and "x floor" not in text.split("Notes:")[0].replace("'x floor'", "")
    assert "cannot be: timing noise" in text
    # the same row, slower than its floor, is a result
    results[0].ms = (2.5, 2.45, 2.55)
    verdicts = report.assess(results)
    assert verdicts[id(results[0])].bound == "1.32x floor"
    assert verdicts[id(results[0])].status == ""


def test_a_wide_spread_marks_the_row_noisy_and_its_speedup_doubtful():
    samples = [1.2, 1.3, 24.0, 1.4, 22.0, 1.25, 23.0, 1.35]
    timing = measure.summarize(samples)
    results = [
        _row("alignkern", timing.as_tuple(), samples=timing.samples),
        _row("torch-eager", (30.0, 29.0, 31.0)),
    ]
    verdicts = report.assess(results)
    assert verdicts[id(results[0])].status == "noisy"
    assert verdicts[id(results[0])].speedup_doubtful
    assert verdicts[id(results[1])].status == ""
    text = report.table(results, CPU)
    ours = next(line for line in text.splitlines() if re.match(r"\s+fwd\s+alignkern\s", line))
    assert "noisy" in ours and "?" in ours
    assert f"{100 * timing.spread:.0f}%" in ours  # the spread is printed


# ------------------------------------------------------------------------------ the table


def test_table_fits_120_columns_with_status_and_reasons_below():
    reason = (
        "failed: NotImplementedError: FlexAttention does not support backward on CPU. "
        "Please set the input requires_grad=False or use another device. "
        + " ".join(f"detail{i}" for i in range(40))
    )
    results = [
        _row(
            "alignkern",
            (2.0, 1.95, 2.1),
            kernel="reward_attention",
            mode="fwd+bwd",
            config="B=1 H=4 L=1024 D=64 causal float32",
            x=1024,
            flops=0,
        ),
        _row(
            "flex-attention",
            None,
            kernel="reward_attention",
            mode="fwd+bwd",
            config="B=1 H=4 L=1024 D=64 causal float32",
            x=1024,
            flops=0,
            note=reason.strip(),
        ),
        _row(
            "alignkern-cuda",
            None,
            kernel="reward_attention",
            mode="fwd+bwd",
            config="B=1 H=4 L=1024 D=64 causal float32",
            x=1024,
            flops=0,
            note="missing: needs a CUDA GPU",
        ),
        _row(
            "alignkern",
            (5.0, 4.9, 5.1),
            kernel="plackett_luce_loss",
            config="B=8 N=512 float32",
            x=512,
            flops=0,
            bytes_moved=0,
            work=4096,
            work_unit="candidates",
        ),
        _row(
            "torch-pairwise",
            (9.0, 8.8, 9.3),
            kernel="plackett_luce_loss",
            config="B=8 N=512 float32",
            x=512,
            flops=0,
            bytes_moved=0,
            work=4096,
            work_unit="candidates",
        ),
        _row("alignkern", (1.0, 0.99, 1.01), kernel="unitless", config="n=1", x=1, flops=0, bytes_moved=0),
    ]
    text = report.table(results, CPU)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= report.MAX_WIDTH
    header = next(line for line in lines if "provider" in line and "status" in line)
    assert header.rstrip().endswith("status")
    failed = next(line for line in lines if "flex-attention" in line)
    assert re.search(r"failed \[\d+\]$", failed) and "NotImplementedError" not in failed
    assert text.count("NotImplementedError") == 1  # the reason, once, below the table
    notes = text[text.index("Notes:") :]
    assert "NotImplementedError" in notes and "needs a CUDA GPU" in notes
    assert "vs best peer:" in text  # a legend line for each ratio column
    # a loss's throughput is candidates per second, not GB/s of nothing
    assert "candidates/s" in text
    unitless = text[text.index("\nunitless") : text.index("\n\n", text.index("\nunitless") + 1)]
    assert "/s" not in unitless and "TFLOP" not in unitless


def test_table_legend_explains_every_ratio_column():
    results = [
        _row("alignkern", (2.5, 2.45, 2.55)),
        _row(FLOOR, (1.9, 1.85, 1.95)),
        _row("torch-eager", (3.0, 2.9, 3.1)),
    ]
    text = report.table(results, CPU)
    assert "vs bound" in text and "vs best peer" in text
    assert any(line.startswith("vs bound:") for line in text.splitlines())
    assert any(line.startswith("vs best peer:") for line in text.splitlines())


def _case(label, ours_ms, peers, ours_mib=None, ours="alignkern", mode="fwd"):
    """One row: alignkern's time (and peak MiB) and each peer's (provider, ms, MiB)."""
    rows = [_row(ours, (ours_ms, ours_ms, ours_ms), config=label, mode=mode,
                 peak_bytes=None if ours_mib is None else int(ours_mib * 2**20))]
    for provider, ms, mib in peers:
        rows.append(_row(provider, None if ms is None else (ms, ms, ms), config=label, mode=mode,
                         peak_bytes=None if mib is None else int(mib * 2**20),
                         note="" if ms is not None else "missing: needs a GPU"))
    return rows


def test_summary_counts_the_rows_alignkern_wins_on_time_and_on_memory():
    wide = measure.summarize([1.2, 1.3, 24.0, 1.4, 22.0, 1.25, 23.0, 1.35])  # noisy
    results = [
        # faster than every peer, less memory than the leanest (a slower peer's 15 < 20)
        *_case("a", 1.0, [("torch-eager", 2.0, 20.0), ("torch-compile", 3.0, 15.0)], ours_mib=10.0),
        # slower than the fastest peer, the same memory as the leanest
        *_case("b", 3.0, [("torch-eager", 2.0, 5.0)], ours_mib=5.0),
        # a bound is not a peer: alignkern beats torch-eager though matmul-floor is faster
        *_case("c", 2.5, [("torch-eager", 3.0, 1.0), (FLOOR, 1.9, 0.5)], ours_mib=2.0),
        # no peer measured: not a row
        *_case("d", 1.0, [("torch-eager", None, None)], ours_mib=1.0),
        # alignkern's peak unknown: a row for time, not for memory
        *_case("e", 1.0, [("torch-eager", 4.0, 8.0)]),
    ]
    noisy = _case("f", 1.0, [("torch-eager", 2.0, None)], ours_mib=3.0)  # no peer peak known
    noisy[0].ms, noisy[0].samples = wide.as_tuple(), wide.samples
    results += noisy
    # two alignkern backends: the fastest one speaks for alignkern
    results += _case("g", 5.0, [("torch-eager", 2.0, 9.0)], ours_mib=1.0)
    results += _case("g", 1.0, [], ours_mib=20.0, ours="alignkern-cuda")
    got = report.summary(results)
    assert (got.rows, got.ahead, got.ahead_in_noise) == (6, 5, 1)
    assert (got.memory_rows, got.less_memory, got.same_memory) == (4, 1, 1)
    assert got.line() == ("Summary: alignkern ahead of every peer in 5 of 6 rows (1 of them within "
                          "noise); at less peak memory than every peer in 1 of 4 (the same in 1).")
    assert report.summary([]).line().startswith("Summary: no row")
    # the Markdown leads with it, and the legend says what it counts
    md = report.markdown(results, CPU)
    assert md.splitlines()[2] == f"**{got.line()}**"
    assert report.SUMMARY_DEFINITION in md
    assert " ".join(report.SUMMARY_DEFINITION.split()) in " ".join(report.table(results, CPU).split())


def test_a_run_ends_with_its_summary_line(tmp_path, capsys):
    assert main([*TINY, "--no-plot", "--out", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"Summary: alignkern ahead of every peer in \d+ of 2 rows.*\.", last), last
    assert f"**{last}**" in (tmp_path / "cpu.md").read_text()


# ------------------------------------------------------------------------------ the figure

FAMILY_UNITS = {
    "token_logprobs": {"bytes_moved": 10**9, "flops": 0},
    "linear_logprobs": {"flops": 10**11},
    "reward_attention": {"flops": 10**10},
    "fused_linear_dpo_loss": {"work": 8192, "work_unit": "tokens", "flops": 0},
    "linear_kl": {"work": 4096, "work_unit": "tokens", "flops": 0},
    "plackett_luce_loss": {"work": 4096, "work_unit": "candidates", "flops": 0, "bytes_moved": 0},
}
PEERS = {
    "token_logprobs": ["torch-eager", "torch-compile", "read-ceiling"],
    "linear_logprobs": ["torch-eager", "torch-compile", "matmul-floor"],
    "reward_attention": ["flex-attention", "sdpa-float-mask", "flash-ceiling"],
    "fused_linear_dpo_loss": ["torch-unfused"],
    "linear_kl": ["torch-eager", "torch-compile"],
    "plackett_luce_loss": ["torch-pairwise"],
}


def _synthetic(sizes_per_family: int = 1) -> list[Result]:
    results = []
    for kernel, peers in PEERS.items():
        key = report.SWEPT[kernel][0]
        for mode in ("fwd", "fwd+bwd"):
            for i in range(sizes_per_family):
                x = 1024 * 2**i
                for j, provider in enumerate(["alignkern", *peers]):
                    ms = 1.0 + 0.5 * j + 0.1 * i
                    results.append(
                        Result(
                            kernel,
                            provider,
                            mode,
                            f"{key}={x} float32",
                            x,
                            ms=(ms, ms * 0.95, ms * 1.3 if j == 1 else ms * 1.05),
                            samples=10,
                            dtype="float32",
                            peak_bytes=(4 + j) * (i + 1) * 2**20,
                            **{"bytes_moved": 10**8, **FAMILY_UNITS[kernel]},
                        )
                    )
    return results


def _provider_colours(fig) -> dict[str, set]:
    from matplotlib.colors import to_hex

    colours: dict[str, set] = {}
    for ax in fig.axes:
        for artist in [*ax.patches, *ax.lines]:
            gid = artist.get_gid() or ""
            if gid.startswith("provider:"):
                colour = artist.get_facecolor() if hasattr(artist, "get_height") else artist.get_color()
                colours.setdefault(gid.removeprefix("provider:"), set()).add(to_hex(colour))
    return colours


@pytest.mark.parametrize("sizes", [1, 3], ids=["one-point-bars", "swept-lines"])
def test_figure_is_a_grid_with_one_colour_per_provider(sizes):
    results = _synthetic(sizes)
    made = report.figures(results, CPU, report.environment(CPU))
    assert len(made) == 1
    _, fig = made[0]
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 24  # 6 op families x 2 modes x (throughput, peak memory)
    width, height = fig.get_size_inches() * fig.dpi
    assert width == report.FIGURE_WIDTH_PX and height <= 2000
    columns = {round(ax.get_position().x0, 2) for ax in panels}
    assert len(columns) <= report.MAX_COLUMNS
    colours = _provider_colours(fig)
    assert set(colours) == {r.provider for r in results}
    assert all(len(c) == 1 for c in colours.values()), colours  # the same in every panel
    assert len({next(iter(c)) for c in colours.values()}) == len(colours)  # and distinct
    for ax in panels:
        if ax.get_title().split("\n")[0].endswith("throughput"):
            assert "higher is better" in ax.get_ylabel()
        else:
            assert ax.get_title().split("\n")[0].endswith("peak memory")
            assert ax.get_ylabel() == "peak MiB  (lower is better)"
        if sizes == 1:  # a single point is a bar on a linear axis, not a dot on a log axis
            assert ax.patches and ax.get_yscale() == "linear"
        else:
            assert ax.get_xscale() == "log" and len(ax.get_xticks()) == sizes
    pl = [ax for ax in panels if ax.get_title().startswith("plackett_luce_loss")
          and "throughput" in ax.get_title()]
    assert len(pl) == 2 and all("candidates/s" in ax.get_ylabel() for ax in pl)
    assert not any("GB/s" in ax.get_ylabel() for ax in pl)
    heading = fig.get_suptitle()
    assert "cpu" in heading and "float32" in heading and f"torch {torch.__version__}" in heading
    assert "triton" in heading and "higher is better" in heading and "lower is better" in heading


def _legend_handles(fig):
    (legend,) = fig.legends
    return dict(zip([t.get_text() for t in legend.get_texts()], legend.legend_handles))


@pytest.mark.parametrize("sizes", [1, 3], ids=["one-point-bars", "swept-lines"])
def test_each_op_and_mode_has_its_peak_memory_beside_its_throughput(sizes):
    results = [r for r in _synthetic(sizes) if r.kernel == "linear_kl"]
    for r in results:
        r.peak_bytes = (1 + len(r.provider)) * 2**20
    results[1].peak_bytes = None  # not measured: 'n/a', no bar
    _, fig = report.figures(results, CPU)[0]
    titles = [ax.get_title().split("\n")[0] for ax in fig.axes]
    assert titles == [f"linear_kl · {mode} · {what}" for mode in ("fwd", "fwd+bwd")
                      for what in ("throughput", "peak memory")]
    fwd = [r for r in results if r.mode == "fwd" and r.peak_bytes is not None]
    memory = fig.axes[1]
    if sizes == 1:
        heights = {p.get_gid().removeprefix("provider:"): p.get_height() for p in memory.patches
                   if p.get_gid()}
        assert heights == {r.provider: pytest.approx(r.peak_bytes / 2**20) for r in fwd}
        assert "n/a" in [t.get_text() for t in memory.texts]
    else:
        drawn = {line.get_gid().removeprefix("provider:"): list(line.get_ydata())
                 for line in memory.lines if line.get_gid()}
        assert set(drawn) == {r.provider for r in fwd}
        for provider, ys in drawn.items():
            want = sorted((r.x, r.peak_bytes / 2**20) for r in fwd if r.provider == provider)
            assert ys == pytest.approx([y for _, y in want])


def test_legend_marks_are_the_marks_drawn():
    from matplotlib.colors import to_rgba
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    bars = [r for r in _synthetic(1) if r.kernel == "linear_kl"]
    lines = [r for r in _synthetic(3) if r.kernel == "token_logprobs"]
    for results, kind in ((bars, Rectangle), (lines, Line2D)):
        _, fig = report.figures(results, CPU)[0]
        handles = _legend_handles(fig)
        for provider in {r.provider for r in results}:
            handle = handles[provider]
            assert type(handle) is kind, (provider, handle)
            colour = report.provider_style(provider)[0]
            if kind is Rectangle:  # a filled box of the bar's colour, not a line and a marker
                assert handle.get_facecolor() == pytest.approx(to_rgba(colour))
            else:
                assert handle.get_color() == colour
                assert handle.get_marker() == report.provider_style(provider)[1]
        noisy = next(text for text in handles if text.startswith("noisy"))
        assert ("hatched bar" in noisy) == (kind is Rectangle)
        assert ("circled point" in noisy) == (kind is Line2D)
    # bars in some panels and lines in others: each provider gets both marks, side by side
    entries, labels = report._legend_entries(["alignkern", "torch-eager"], {"bars", "lines"})
    assert labels[:2] == ["alignkern", "torch-eager"]
    assert all(isinstance(e, tuple) and [type(a) for a in e] == [Patch, Line2D] for e in entries[:2])
    assert labels[2].endswith("hatched bar, circled point")


@pytest.mark.parametrize("slow_ms, scale", [(400.0, "log"), (50.0, "linear")],
                         ids=["apart-440x", "apart-55x"])
def test_bars_that_differ_by_more_than_100x_get_a_log_axis(slow_ms, scale):
    """A bar of 0.017 beside 7.47 is invisible on a linear axis."""
    results = [r for r in _synthetic(1) if r.kernel == "linear_kl" and r.mode == "fwd"]
    results[-1].ms = (slow_ms, slow_ms, slow_ms)  # throughput ~1/slow_ms of the others
    _, fig = report.figures(results, CPU)[0]
    throughput = fig.axes[0]
    assert throughput.get_yscale() == scale
    heights = [p.get_height() for p in throughput.patches if p.get_gid()]
    low, high = throughput.get_ylim()
    assert low < min(heights) and high > max(heights)  # every bar visible, its value above it


def test_figure_error_bars_span_p20_to_p80():
    results = [r for r in _synthetic(1) if r.kernel == "linear_kl" and r.mode == "fwd"]
    _, fig = report.figures(results, CPU)[0]
    ax = fig.axes[0]
    bar = next(p for p in ax.patches if p.get_gid() == "provider:torch-eager")
    r = next(r for r in results if r.provider == "torch-eager")
    _, factor, _ = report._family_scale(results)
    assert bar.get_height() == pytest.approx(r.throughput() / factor)
    segments = [c for c in ax.collections if hasattr(c, "get_segments")]
    spans = {
        tuple(round(v, 6) for v in sorted((s[0][1], s[1][1]))) for c in segments for s in c.get_segments()
    }
    expected = tuple(
        round(v, 6) for v in sorted((r.throughput(r.ms[2]) / factor, r.throughput(r.ms[1]) / factor))
    )
    assert expected in spans


def test_too_many_panels_split_into_one_figure_per_op_family(tmp_path):
    results = _synthetic(1)
    extra = [
        Result(f"op{i}", "alignkern", "fwd", "n=1", 1, bytes_moved=10**6, ms=(1, 1, 1), samples=5)
        for i in range(6)
    ]
    made = report.figures(results + extra, CPU)  # 12 op families: more than MAX_ROWS
    assert len(made) == 12 and [name for name, _ in made][:6] == list(PEERS)
    paths = report.write_plots(results, CPU, tmp_path)
    assert [Path(p).name for p in paths] == ["cpu.png"]
    from matplotlib.image import imread

    assert imread(paths[0]).shape[1] == report.FIGURE_WIDTH_PX


def test_linear_logprobs_peers_compute_the_same_log_probs():
    """A peer is only a peer if it computes the same numbers (TRL's fused head among them)."""
    pytest.importorskip("trl")  # the trl extra, which the README's test command installs
    from alignkern.bench import linear_logprobs as family

    found = family.providers(CPU)
    case = family.Case(37, 24, 1001, 3, torch.float32)
    hidden, weight, targets = case.make_inputs(CPU)
    want = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(-1, targets)
    compared = []
    for name, provider in found.items():
        if isinstance(provider, str) or name == FLOOR:
            continue
        got = provider(hidden, weight, targets)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=name)
        compared.append(name)
    assert {"alignkern", "torch-eager", "trl-chunked"} <= set(compared)


def test_entropy_peers_compute_the_same_log_probs_and_entropy():
    """The entropy family's peers (TRL's fused head with outputs=("entropy",) among them) agree
    with float64 on both outputs."""
    pytest.importorskip("trl")
    from alignkern.bench import linear_logprobs_entropy as family

    case = family.Case(37, 24, 1001, 1, torch.float32)
    hidden, weight, targets = case.make_inputs(CPU)
    log_p = torch.log_softmax(hidden.double() @ weight.double().T, -1)
    want = (log_p.gather(-1, targets[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1))
    compared = []
    for name, provider in family.providers(CPU).items():
        if isinstance(provider, str) or name == FLOOR:
            continue
        for got, expected in zip(provider(hidden, weight, targets), want, strict=True):
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5, msg=name)
        compared.append(name)
    assert {"alignkern", "torch-eager", "trl-chunked"} <= set(compared)
