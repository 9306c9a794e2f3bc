"""The table (text and evidence.csv) and the figure (evidence.png: accuracy against cost)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from .methods import CSV_COLUMNS, Row


def format_table(rows: Sequence[Row]) -> str:
    """One line per row: method, setting, accuracy with its 95 % interval, forwards, tokens,
    seconds."""
    head = ["method", "setting", "accuracy", "95% CI", "forwards", "tokens", "seconds"]
    cells = [[r.method, r.setting, f"{r.accuracy:.3f}", f"[{r.ci_low:.3f}, {r.ci_high:.3f}]",
              str(r.forwards), str(r.tokens), f"{r.seconds:.1f}"] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    """evidence.csv: ``CSV_COLUMNS``, accuracy and interval to 4 decimals, seconds to 3."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow([r.method, r.setting, f"{r.accuracy:.4f}", f"{r.ci_low:.4f}",
                             f"{r.ci_high:.4f}", r.forwards, r.tokens, f"{r.seconds:.3f}"])
    return path


def read_csv(path: Path) -> list[Row]:
    with open(path, newline="") as f:
        return [Row(d["method"], d["setting"], float(d["accuracy"]), float(d["ci_low"]),
                    float(d["ci_high"]), int(d["forwards"]), int(d["tokens"]),
                    float(d["seconds"])) for d in csv.DictReader(f)]


def plot(rows: Sequence[Row], path: Path, title: str = "") -> Path:
    """Accuracy (with its 95 % interval) against the token positions processed, log scale; the
    greedy accuracy as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"greedy": "o", "sampled": "v", "best-of-n": "s", "rain": "*",
               "check-and-correct": "D", "score": "^"}
    fig, ax = plt.subplots(figsize=(9.5, 5.5))
    for i, method in enumerate(markers):
        mine = [r for r in rows if r.method == method]
        for j, r in enumerate(mine):
            ax.errorbar([max(r.tokens, 1)], [r.accuracy],
                        yerr=[[r.accuracy - r.ci_low], [r.ci_high - r.accuracy]],
                        marker=markers[method], color=f"C{i}", markersize=8, capsize=3,
                        label=method if j == 0 else None, linestyle="none")
            ax.annotate(_short(r.setting), (max(r.tokens, 1), r.accuracy), fontsize=7,
                        xytext=(5, 3), textcoords="offset points")
    for r in rows:
        if r.method == "greedy":
            ax.axhline(r.accuracy, color="C0", linewidth=1, linestyle="--", alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("cost: token positions processed by the model (log scale)")
    ax.set_ylabel("accuracy on the held-out problems (95 % Wilson interval)")
    ax.set_title(title or "Each loop against plain decoding", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _short(setting: str) -> str:
    """The setting as a short label: without SCoRe's statistics (they are in the CSV) and
    check-and-correct's round count and beta."""
    label = setting.split(" delta=")[0].replace(" stage-II steps", " steps")
    for word in ("rounds=3 ", "reward=", "reward_bias=", " beta=1"):
        label = label.replace(word, "bias " if word == "reward_bias=" else "")
    return label
