"""The report's benchmark section: accuracy per labelled set (MCQ benchmarks, PubMedQA, labelled test items) and
model with Wilson 95% intervals, the deltas between models with Newcombe intervals, and a bar plot."""
from __future__ import annotations

from pathlib import Path

from medrl.evaluation.metrics import difference_interval
from medrl.render import Block, Heading, Image, Para, Table
from medrl.report.plots import png_figure

MODES = ("strict", "lenient")
DELTAS = (("sft", "base"), ("rl", "sft"), ("rl", "base"))


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _cell(m: dict, mode: str) -> str:
    acc, ci = m.get(f"accuracy_{mode}"), m.get(f"accuracy_{mode}_ci")
    if acc is None or ci is None:
        return "–"
    return f"{_pct(acc)}% [{_pct(ci[0])}, {_pct(ci[1])}]"


def _delta(a: dict, b: dict, mode: str) -> str:
    pa, pb = a.get(f"accuracy_{mode}"), b.get(f"accuracy_{mode}")
    ca, cb = a.get(f"accuracy_{mode}_ci"), b.get(f"accuracy_{mode}_ci")
    if None in (pa, pb, ca, cb):
        return "–"
    lo, hi = difference_interval((pa, tuple(ca)), (pb, tuple(cb)))
    return f"{100 * (pa - pb):+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def labelled_sets(summary: dict, models: list[str], sets: list[str]) -> list[str]:
    return [s for s in sets if any(summary["table"][m].get(s, {}).get("accuracy_n") for m in models)]


def benchmark_plot(summary: dict, models: list[str], sets: list[str], out: Path) -> Path | None:
    """Grouped bars: strict accuracy per set, one bar per model, Wilson 95% intervals as error bars."""
    if not sets:
        return None
    width = 0.8 / max(1, len(models))
    with png_figure(out, figsize=(max(4.8, 1.4 * len(sets) + 2), 3.6)) as ax:
        for k, m in enumerate(models):
            xs, ys, err = [], [], [[], []]
            for i, s in enumerate(sets):
                v = summary["table"][m].get(s, {})
                if v.get("accuracy_strict") is None or not v.get("accuracy_strict_ci"):
                    continue
                acc, (lo, hi) = v["accuracy_strict"], v["accuracy_strict_ci"]
                xs.append(i + (k - (len(models) - 1) / 2) * width)
                ys.append(100 * acc)
                err[0].append(100 * max(0.0, acc - lo))
                err[1].append(100 * max(0.0, hi - acc))
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=m)
        ax.set_xticks(range(len(sets)), sets)
        ax.set_ylabel("accuracy (strict), %")
        ax.set_ylim(0, 100)
        ax.set_title("Benchmarks: accuracy with Wilson 95% intervals")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return out


def benchmark_blocks(summary: dict, models: list[str], sets: list[str], plot_dir: Path) -> list[Block]:
    """Heading, the benchmark table (``id="benchmarks"``, rows ``<set>.<mode>``) and the plot; a note when no
    evaluated set carries labels."""
    blocks: list[Block] = [Heading("Benchmarks")]
    sets = labelled_sets(summary, models, sets)
    if not sets:
        return blocks + [Para("No labelled set (MCQ benchmark, PubMedQA) was evaluated.", note=True)]
    cols = [("set", "set"), ("mode", "answer read"), ("n", "items")] + [(m, m) for m in models]
    deltas = [(a, b) for a, b in DELTAS if a in models and b in models]
    cols += [(f"{a}-{b}", f"{a} − {b} (points)") for a, b in deltas]
    rows = []
    for s in sets:
        per = {m: summary["table"][m].get(s, {}) for m in models}
        n = max(v.get("accuracy_n", 0) for v in per.values())
        for mode in MODES:
            cells = {"set": s, "mode": mode, "n": str(n), **{m: _cell(per[m], mode) for m in models}}
            cells.update({f"{a}-{b}": _delta(per[a], per[b], mode) for a, b in deltas})
            rows.append((f"{s}.{mode}", cells))
    blocks.append(Table("benchmarks", cols, rows, caption="Accuracy, % [Wilson 95% interval]"))
    blocks.append(Para(
        "Strict: only an explicit answer counts (\"The answer is B\", \"答案是B\", an answer opening with the letter); "
        "lenient also reads an option's text or a lone \"(B)\". Deltas in percentage points with Newcombe's 95% "
        "interval (hybrid Wilson score), which treats the two models as independent samples and so errs on the wide "
        "side for models scored on the same items. An interval that contains 0 is no evidence of a difference."))
    plot = benchmark_plot(summary, models, sets, plot_dir / "benchmarks.png")
    if plot is not None:
        blocks.append(Image(plot, "Benchmarks: accuracy with Wilson 95% intervals"))
    return blocks
