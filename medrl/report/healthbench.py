"""The report's HealthBench-style section: per rubric set, each model's clipped mean ± bootstrap std, the deltas
between models with paired bootstrap intervals, per-axis and per-theme tables, and a bar plot; the grader (model and
version) is named beside every table and plot."""
from __future__ import annotations

from pathlib import Path

from medrl.render import Block, Heading, Image, Para, Table
from medrl.report.plots import png_figure


def _pm(v: dict | None) -> str:
    if not v or v.get("score") is None:
        return "–"
    return f"{v['score']:.3f} ± {v['std']:.3f} (n {v['n']})"


def _delta(d: dict | None) -> str:
    if not d or d.get("delta") is None:
        return "–"
    return f"{d['delta']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] (n {d['n']})"


def healthbench_plot(set_name: str, hb: dict, models: list[str], grader: str, out: Path) -> Path | None:
    """Grouped bars: the overall score and each axis, one bar per model, bootstrap std as error bars."""
    axes = sorted({a for m in models for a in hb["models"][m]["axes"]})
    groups = ["overall", *axes]
    if all(hb["models"][m]["score"] is None for m in models):
        return None
    width = 0.8 / max(1, len(models))
    with png_figure(out, figsize=(max(5.6, 1.3 * len(groups) + 2), 3.8)) as ax:
        for k, m in enumerate(models):
            stats = [hb["models"][m]] + [hb["models"][m]["axes"].get(a) or {} for a in axes]
            xs = [i + (k - (len(models) - 1) / 2) * width for i, v in enumerate(stats) if v.get("score") is not None]
            ys = [v["score"] for v in stats if v.get("score") is not None]
            err = [v["std"] for v in stats if v.get("score") is not None]
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=m)
        ax.set_xticks(range(len(groups)), [g.replace("_", "\n") for g in groups], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("score (clipped mean)")
        ax.set_title(f"{set_name}: rubric score ± bootstrap std · grader {grader}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return out


def healthbench_blocks(summary: dict, models: list[str], plot_dir: Path) -> list[Block]:
    """Heading, then per rubric set the tables ``hb-<set>`` (rows: models; ``delta`` rows ``<a>-<b>``),
    ``hb-axes-<set>`` and ``hb-themes-<set>`` (rows: axis / theme, columns: models) and the plot."""
    sets = summary.get("healthbench") or {}
    blocks: list[Block] = [Heading("HealthBench-style rubric evaluation")]
    if not sets:
        return blocks + [Para("No rubric set was evaluated (a set whose items carry `rubrics`).", note=True)]
    for s, hb in sets.items():
        present = [m for m in models if m in hb["models"]] + sorted(set(hb["models"]) - set(models))
        grader = ", ".join(hb["graders"])
        rows = [(m, {"model": m, "score": _pm(hb["models"][m]), "incomplete": str(hb["models"][m]["incomplete"]),
                     "criteria": str(hb["models"][m]["criteria"])}) for m in present]
        rows += [(name, {"model": name.replace("-", " − "), "score": _delta(d), "incomplete": "", "criteria": ""})
                 for name, d in hb["deltas"].items()]
        blocks.append(Table(f"hb-{s}", [("model", "model / delta"), ("score", "score ± bootstrap std"),
                                        ("incomplete", "items without a verdict"), ("criteria", "criteria graded")],
                            rows, caption=f"{s}: HealthBench score (grader {grader})"))
        for kind, title in (("axes", "axis"), ("themes", "theme")):
            names = sorted({a for m in present for a in hb["models"][m][kind]})
            if not names:
                continue
            rows = [(a, {"what": a, **{m: _pm(hb["models"][m][kind].get(a)) for m in present}}) for a in names]
            blocks.append(Table(f"hb-{kind}-{s}", [("what", title)] + [(m, m) for m in present], rows,
                                caption=f"{s}: score per {title} (grader {grader})"))
        plot = healthbench_plot(s, hb, present, grader, plot_dir / f"healthbench_{s}.png")
        if plot is not None:
            blocks.append(Image(plot, f"{s}: rubric score per axis ± bootstrap std (grader {grader})"))
    blocks.append(Para(
        "As HealthBench (arXiv 2505.08775, openai/simple-evals): item score = points of the met criteria / positive "
        "points (a met negative criterion subtracts); score = the mean of the item scores clipped to [0, 1], ± the "
        "std of that mean over 1,000 bootstrap resamples (fixed seed). An axis scores each item on its criteria with "
        "that axis tag; a theme is the items tagged with it. Deltas: paired bootstrap (the same resampled items for "
        "both models), 95% percentile interval. Items with a failed criterion verdict are left out and counted."))
    return blocks
