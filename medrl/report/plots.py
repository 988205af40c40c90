"""Training curves as PNG files from ``metrics.jsonl`` rows (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class CurveSpec:
    stage: str
    name: str
    """File stem of the PNG."""
    title: str
    patterns: tuple[str, ...]
    """Regular expressions (full match) selecting the metric keys drawn as lines."""
    exclude: tuple[str, ...] = ()
    hint: str = ""
    """Why the metric may be absent although the stage ran."""


# The metric names the SFT stage (HF Trainer logs, renamed) and the PPO driver write to metrics.jsonl.
CURVES = (
    CurveSpec("sft", "sft_loss", "SFT loss", (r"train_loss", r"eval_loss")),
    CurveSpec("ppo", "ppo_reward", "PPO reward (mean) and its rule / teacher parts",
              (r"reward_mean", r"reward/rule", r"reward/teacher")),
    CurveSpec("ppo", "ppo_rules", "PPO rule components", (r"reward/[a-z_]+",), (r"reward/(rule|teacher)",)),
    CurveSpec("ppo", "ppo_judge", "PPO judge dimensions (0-1)", (r"reward/judge\.[a-z_]+",)),
    CurveSpec("ppo", "ppo_kl", "PPO KL to the reference (per token) and KL coefficient", (r"kl", r"kl_coef")),
    CurveSpec("ppo", "ppo_length", "PPO response length (tokens)", (r"response_len",)),
    CurveSpec("ppo", "ppo_value_loss", "PPO value loss", (r"value_loss",),
              hint="critic-free estimators (grpo, rloo, reinforce_pp) train no value head"),
)


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def select_keys(rows: list[dict], spec: CurveSpec) -> list[str]:
    keys = {k for r in rows for k, v in r.items() if _numeric(v) and k not in ("step", "time")}
    chosen = [k for k in keys if any(re.fullmatch(p, k) for p in spec.patterns)
              and not any(re.fullmatch(p, k) for p in spec.exclude)]
    return sorted(chosen)


@contextmanager
def png_figure(out: Path, *grid: int, **subplots) -> Iterator:
    """The axes of ``plt.subplots(*grid, dpi=100, **subplots)`` on the Agg backend (no display); the figure is
    written to ``out`` as PNG (laid out tight, folders made) when the block ends without error, closed either way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*grid, dpi=100, **subplots)
    try:
        yield axes
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)


def plot_curves(rows: list[dict], keys: list[str], title: str, out: Path) -> Path | None:
    """One line per key (step on x); None when no key has at least one point."""
    series = {k: [(r["step"], r[k]) for r in rows if _numeric(r.get(k))] for k in keys}
    series = {k: sorted(pts) for k, pts in series.items() if pts}
    if not series:
        return None
    with png_figure(out, figsize=(6.4, 3.6)) as ax:
        for k, pts in series.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, markersize=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return out


def training_plots(metrics_by_stage: dict[str, list[dict]], out_dir: Path) -> tuple[list[tuple[str, Path]],
                                                                                       list[str]]:
    """PNG curves for every spec with data: ([(title, path)], [notes about curves that have no data])."""
    plots, notes = [], []
    for spec in CURVES:
        rows = metrics_by_stage.get(spec.stage, [])
        keys = select_keys(rows, spec)
        path = plot_curves(rows, keys, spec.title, out_dir / f"{spec.name}.png") if keys else None
        if path is None:
            why = spec.hint if rows and spec.hint else "" if rows else f"the {spec.stage} stage has logged nothing yet"
            notes.append(f"{spec.title}: no data in metrics.jsonl" + (f" ({why})" if why else ""))
        else:
            plots.append((spec.title, path))
    return plots, notes
