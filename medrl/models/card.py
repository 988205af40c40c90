"""Adapter directories others can use: a Hugging Face model card (``README.md``), a base model reference that
resolves from any directory, and the tokenizer with its chat template.

``finish_adapter`` runs when SFT or PPO writes its adapter; ``refresh_cards`` rewrites the cards with the eval
table after ``medrl eval``. Pure file work (no Ray); the tokenizer is only saved, never loaded here.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from medrl import RESEARCH_NOTICE, __version__
from medrl.config import Config, load_config
from medrl.errors import UsageError
from medrl.runs import RunDir

log = logging.getLogger("medrl.models")

MODEL_OF_STAGE = {"sft": "sft", "ppo": "rl"}
"""The eval name of each stage's adapter."""


def base_model_ref(path: str) -> str:
    """``model.path`` as an adapter should name it: an absolute path when it is a local directory, else the hub id."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.is_dir() else path


def base_license(path: str) -> str:
    """The ``license`` of the base model's own card (front matter of its README.md), else ``other``."""
    readme = Path(path).expanduser() / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            try:
                meta = yaml.safe_load(text.split("---", 2)[1]) or {}
            except yaml.YAMLError:
                meta = {}
            if isinstance(meta, dict) and isinstance(meta.get("license"), str):
                return meta["license"]
    return "other"


def training_sources(cfg: Config) -> list[dict[str, str]]:
    """The sources the run trains on (benchmarks are eval-only): name, dataset id (ModelScope id, else the local
    path or the name), license, role."""
    from medrl.data.sources import resolve_spec

    out = []
    for name in cfg.data.sources:
        try:
            spec = resolve_spec(cfg.data, name)
        except UsageError:
            continue
        role = spec.role or "sft"
        if role != "benchmark":
            out.append({"name": name, "id": spec.modelscope or spec.path or name, "license": spec.license,
                        "role": role})
    return out


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]


def _fmt(v: float | None, rate: bool = False) -> str:
    return "–" if v is None else (f"{100 * v:.1f}%" if rate else f"{v:.3f}")


def _data_section(cfg: Config, run: RunDir) -> list[str]:
    sources = training_sources(cfg)
    out = ["## Training data", "", "Prepared by `medrl prepare` (full card: `data/DATA_CARD.md` of the run).", ""]
    out += _table(["source", "dataset", "license", "role"],
                  [[s["name"], s["id"], s["license"], s["role"]] for s in sources]) + [""]
    if run.data_card.is_file():  # the split sizes, as the data card states them
        text = run.data_card.read_text(encoding="utf-8")
        start = text.find("## Output files")
        if start >= 0:
            end = text.find("\n## ", start + 1)
            out += [text[start:end if end > 0 else None].replace("## Output files", "Files written:").strip(), ""]
    return out


def _training_section(cfg: Config, stage: str) -> list[str]:
    lora = cfg.model.lora
    out = ["## Training", "", f"- Stage: `{stage}` of medrl {__version__} (run `{cfg.run.name}`, config digest "
           f"`{cfg.digest()}`, full config in `config.{stage}.yaml` of the run)",
           f"- LoRA: r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, modules {', '.join(lora.target_modules)}"]
    if stage == "sft":
        s = cfg.sft
        out.append(f"- SFT: learning rate {s.learning_rate} ({s.lr_scheduler_type}), max steps {s.max_steps}, epochs "
                   f"{s.num_train_epochs}, batch {s.per_device_train_batch_size} x {s.gradient_accumulation_steps}, "
                   f"max length {s.max_seq_len} tokens")
        return out + [""]
    p, r, j = cfg.ppo, cfg.reward, cfg.reward.judge
    dims = j.dimension_weights
    out += [f"- RL: {p.estimator}, {p.steps} steps of {p.prompts_per_step} prompts x {p.samples_per_prompt} samples, "
            f"lr {p.lr}, KL {p.kl.mode} (init {p.kl.init_coef}, target {p.kl.target}), from the "
            f"{'SFT adapter' if p.init_adapter == 'sft' else p.init_adapter or 'base model (fresh LoRA)'}", "",
            "## Reward", "",
            f"- R = (w_rule Rule + w_teacher Teacher + w_verifier Verifier) / sum of the weights present; weights "
            f"rule {r.w_rule}, teacher {r.w_teacher}, verifier {r.w_verifier} (preset `{r.preset}`)",
            f"- Judge: `{j.judge_id}`" + (" (the offline reference judge: a deterministic comparison with the "
                                          "reference answer, not a model)" if j.provider == "reference" else ""),
            f"- Rubric version `{j.rubric_version}`; teacher = weighted 0-10 dimensions / 10: accuracy "
            f"{dims.accuracy}, safety {dims.safety}, completeness {dims.completeness}, clarity {dims.clarity}",
            f"- Rules (format {r.rules.format.weight}, length {r.rules.length.weight}, keywords "
            f"{r.rules.keywords.weight}, safety {r.rules.safety.weight})", ""]
    return out


def _eval_section(run: RunDir, model: str) -> list[str]:
    out = ["## Evaluation", ""]
    if not run.eval_summary.is_file():
        return out + ["Not evaluated yet (`medrl eval` adds the table here).", ""]
    summary = json.loads(run.eval_summary.read_text(encoding="utf-8"))
    rows = []
    for name, per_set in summary.get("table", {}).items():
        for s, v in per_set.items():
            rows.append([s, f"**{name}**" if name == model else name, v["n"], _fmt(v.get("reward")),
                         _fmt(v.get("teacher")), _fmt(v.get("accuracy_strict"), True),
                         _fmt(v.get("safety_pass_rate"), True)])
    rows.sort(key=lambda r: (r[0], r[1]))
    out += [f"Eval of {summary.get('created', '?')}, judge `{summary.get('judge', '?')}`; this adapter is "
            f"**{model}**. Reward and teacher are on a 0-1 scale.", ""]
    out += _table(["set", "model", "n", "reward (0-1)", "teacher (0-1)", "accuracy (strict)", "safety pass"], rows)
    return out + ["", "The run's `report/report.html` has the full tables, the confidence intervals and how the "
                  "figures were obtained.", ""]


def render_card(cfg: Config, run: RunDir, stage: str) -> str:
    """The model card of the ``stage`` adapter of ``run`` (Hugging Face format: YAML metadata, then Markdown)."""
    base = base_model_ref(cfg.model.path)
    sources = training_sources(cfg)
    meta = ["---", f"base_model: {json.dumps(base)}", "library_name: peft",
            f"license: {json.dumps(base_license(cfg.model.path))}", "pipeline_tag: text-generation",
            "language: [en, zh]", "datasets:" + ("" if sources else " []")]
    meta += [f"- {json.dumps(s['id'])}  # license: {s['license']}" for s in sources]
    meta += ["tags: [medical, lora, peft, medrl, " + ("sft" if stage == "sft" else cfg.ppo.estimator)
             + ", research-only]", "---", ""]
    model = MODEL_OF_STAGE[stage]
    body = [f"# {cfg.run.name}: {'SFT' if stage == 'sft' else 'RL'} LoRA adapter of {Path(base).name}", "",
            f"> **{RESEARCH_NOTICE}**", "",
            f"A LoRA adapter trained with medrl to make `{base}` a safer medical assistant that reasons inside "
            "`<think></think>` before it answers.", "",
            "## Intended use", "",
            "- Research on training and evaluating medical assistants: reward design, safety behaviour (refusal, "
            "triage to care), comparisons of training stages.",
            "- Out of scope: any clinical use, advice to patients, or a product without its own clinical validation "
            "and regulatory review. The model can be confidently wrong.", ""]
    body += _data_section(cfg, run) + _training_section(cfg, stage) + _eval_section(run, model)
    body += ["## How to load", "", "```python", "from peft import AutoPeftModelForCausalLM",
             "from transformers import AutoTokenizer", "",
             'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/adapter")',
             'tokenizer = AutoTokenizer.from_pretrained("path/to/this/adapter")  # with the chat template', "```",
             "", f"System prompt used in training: `{cfg.model.system_prompt}`", ""]
    return "\n".join(meta + body)


def finish_adapter(cfg: Config, run: RunDir, stage: str, tokenizer=None) -> Path:
    """Make ``stage``'s adapter directory self-contained: the base model named by an absolute path or hub id,
    the tokenizer (with its chat template) when missing, and the model card."""
    adapter = run.sft_adapter if stage == "sft" else run.ppo_adapter
    config_file = adapter / "adapter_config.json"
    adapter_cfg = json.loads(config_file.read_text(encoding="utf-8"))
    adapter_cfg["base_model_name_or_path"] = base_model_ref(cfg.model.path)
    config_file.write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if tokenizer is not None and not (adapter / "tokenizer_config.json").is_file():
        tokenizer.save_pretrained(str(adapter))
    (adapter / "README.md").write_text(render_card(cfg, run, stage), encoding="utf-8")
    return adapter


def refresh_cards(cfg: Config, run: RunDir) -> list[Path]:
    """Rewrite the cards of the run's adapters (after eval: with the eval table), each from the config its stage
    recorded (``cfg`` when that record is missing or no longer loads)."""
    written = []
    for stage, adapter in (("sft", run.sft_adapter), ("ppo", run.ppo_adapter)):
        if not (adapter / "adapter_config.json").is_file():
            continue
        recorded = run.stage_config_path(stage)
        try:
            stage_cfg = load_config(recorded) if recorded.is_file() else cfg
        except UsageError as exc:
            log.warning("model card of %s: %s; using the current config", adapter, exc)
            stage_cfg = cfg
        (adapter / "README.md").write_text(render_card(stage_cfg, run, stage), encoding="utf-8")
        written.append(adapter / "README.md")
    return written
