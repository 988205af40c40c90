"""How far a report's figures can be trusted, said at its head: the offline reference judge, a tiny or random model,
and sets too small to tell models apart (``medrl report``'s banner)."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from medrl.evaluation.metrics import wilson_interval

MIN_SET_SIZE = 100
"""Eval sets (and pairwise comparisons) with fewer items get a caveat: at 100 items a 50% rate has a 95% interval of
about +/-10 points, so smaller sets cannot separate models that differ by less."""
TINY_HIDDEN_SIZE = 256
"""A base model whose hidden size is at most this is a test model, not one that can answer medical questions."""


def _front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else ""
    if not text.startswith("---"):
        return {}
    try:
        meta = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def model_caveat(path: str) -> str | None:
    """What makes ``path`` a model whose answers mean nothing (tiny, random weights), or None."""
    local = Path(path).expanduser()
    config = local / "config.json"
    if not config.is_file():
        return None
    try:
        shape = json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    tags = _front_matter(local / "README.md").get("tags") or []
    random = "random-weights" in tags
    hidden = shape.get("hidden_size")
    if not random and not (isinstance(hidden, int) and hidden <= TINY_HIDDEN_SIZE):
        return None
    what = f"hidden size {hidden}, {shape.get('num_hidden_layers', '?')} layers"
    return (f"The base model {path} is a tiny {'randomly initialised ' if random else ''}model ({what}): its answers "
            "are noise, and every figure below tests the pipeline, not medicine.")


def _judge_caveats(run_root: Path, cfg: dict, summary: dict | None) -> list[str]:
    used: list[tuple[str, str]] = []  # (what, judge id)
    if summary:
        used.append(("eval scores and pairwise verdicts", str(summary.get("judge", ""))))
    ppo_cfg = run_root / "config.ppo.yaml"
    ppo = yaml.safe_load(ppo_cfg.read_text(encoding="utf-8")) if ppo_cfg.is_file() else None
    ppo_judge = (((ppo or {}).get("reward") or {}).get("judge") or {}).get("provider")
    if ppo_judge:
        used.append(("the RL reward", "reference:" if ppo_judge == "reference" else ppo_judge))
    elif not summary:
        provider = (((cfg.get("reward") or {}).get("judge")) or {}).get("provider")
        used.append(("the configured reward", "reference:" if provider == "reference" else str(provider)))
    offline = [what for what, judge in used if judge.startswith("reference:")]
    none = [what for what, judge in used if judge == "none"]
    out = []
    if offline:
        out.append(f"The judge behind {' and '.join(offline)} is the offline reference judge: a deterministic "
                   "comparison with the reference answer, not a language model. Teacher scores and win rates are "
                   "not a model's judgement of quality or safety.")
    if none:
        out.append(f"No judge was used for {' and '.join(none)}: rewards are rule scores only.")
    return out


def _size_caveats(summary: dict | None) -> list[str]:
    if not summary:
        return []
    out = []
    sizes: dict[str, int] = {}  # items per set: the most any model was scored on
    for per_set in (summary.get("table") or {}).values():
        for s, v in per_set.items():
            sizes[s] = max(sizes.get(s, 0), int(v.get("n", 0)))
    small = {s: n for s, n in sizes.items() if n < MIN_SET_SIZE}
    if small:
        smallest = max(1, min(small.values()))
        low, high = wilson_interval(smallest // 2, smallest)
        listed = ", ".join(f"{s} {n}" for s, n in sorted(small.items(), key=lambda kv: (kv[1], kv[0])))
        out.append(f"Sets under {MIN_SET_SIZE} items ({listed}): a "
                   f"difference between models there is within noise (on {smallest} items a "
                   f"{100 * (smallest // 2) / smallest:.0f}% rate has a 95% interval of {100 * low:.0f}-"
                   f"{100 * high:.0f}%).")
    pairs = [(p.replace("_vs_", " vs "), v["all"]["n"]) for p, v in (summary.get("pairwise") or {}).items()
             if isinstance(v.get("all"), dict) and v["all"].get("n", MIN_SET_SIZE) < MIN_SET_SIZE]
    if pairs:
        out.append("Pairwise win rates on few prompts (" + ", ".join(f"{p}: {n}" for p, n in pairs) + "): a win rate "
                   "of 0% or 100% there says little.")
    return out


def caveats(run_root: Path, cfg: dict, summary: dict | None) -> list[str]:
    """One sentence per reason to distrust the figures of the run at ``run_root`` (``cfg``: its config.yaml
    tree, ``summary``: its eval summary or None); empty when there is none."""
    models = dict((summary or {}).get("models") or {})
    base = models.get("base") or ((cfg.get("model") or {}).get("path"))
    model = model_caveat(base) if base else None
    return ([model] if model else []) + _judge_caveats(run_root, cfg, summary) + _size_caveats(summary)
