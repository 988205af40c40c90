"""The ``medrl`` argument parser: every command, its options and (``--help``) the config keys it reads. Built without
importing any stage, so ``--help`` stays fast."""
from __future__ import annotations

import argparse
from pathlib import Path

from medrl import __version__


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_config_args(p: argparse.ArgumentParser, *sections: str) -> None:
    """``--config`` and ``KEY=VALUE`` overrides; ``--help`` lists the keys of ``sections`` (none: the top-level
    sections) with their docs."""
    from medrl.config_help import section_epilog

    p.add_argument("--config", "-c", type=Path, default=None,
                   help="YAML config (default: built-in defaults for Qwen3-1.7B)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides applied after the file, e.g. ppo.kl.target=0.1 run.name=exp2 (keys below; "
                        "`medrl config explain KEY` says what one means)")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = section_epilog(sections)


def _add_stage_commands(sub) -> None:
    """The stages of a run, each with its config section: prepare, sft, merge, judge, ppo, estimate-memory, eval."""
    p = sub.add_parser("prepare", help="load, normalise, clean and split medical data; write DATA_CARD.md")
    _add_config_args(p, "data")
    p.add_argument("--sources", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=None,
                   help="comma-separated source names overriding data.sources (e.g. medical-o1,delicate-medical)")
    p.add_argument("--strict", action="store_true", help="fail on the first rejected row instead of recording it")

    p = sub.add_parser("sft", help="LoRA supervised fine-tuning on the prepared train split")
    _add_config_args(p, "sft", "model.lora")
    p.add_argument("--resume", default=None, help="'auto' (newest checkpoint) or a checkpoint directory")

    p = sub.add_parser("merge", help="merge a LoRA adapter into the base model and save a full model directory")
    _add_config_args(p, "model")
    p.add_argument("--adapter", type=Path, default=None, help="adapter dir (default: the run's RL, else SFT adapter)")
    p.add_argument("--out", type=Path, required=True, help="output model directory")

    p = sub.add_parser("judge", help="score a JSONL file with rule rewards and the teacher judge")
    _add_config_args(p, "reward", "reward.judge")
    p.add_argument("--input", type=Path, required=True,
                   help="JSONL with prompt, response and optional reference, risk")
    p.add_argument("--out", type=Path, required=True, help="output JSONL with reward breakdowns")
    p.add_argument("--limit", type=_positive_int, default=None, help="score only the first N rows (N >= 1)")
    p.add_argument("--dry-run", action="store_true", help="estimate tokens and cost without calling the judge")

    p = sub.add_parser("ppo", help="RL: Ray rollout actors, streamed judge scoring, PPO/GRPO/RLOO/REINFORCE++ learner")
    _add_config_args(p, "ppo")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint) or a checkpoint directory")

    p = sub.add_parser("estimate-memory", help="expected peak GPU memory of the learner for a config")
    _add_config_args(p, "ppo", "ppo.learner")

    p = sub.add_parser("eval", help="evaluate base / SFT / RL models on test, gold, red-team and PubMedQA")
    _add_config_args(p, "eval")
    p.add_argument("--models", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=None,
                   help="comma-separated subset of base,sft,rl (default: those that exist)")
    p.add_argument("--sets", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=None,
                   help="comma-separated eval sets: test, gold, redteam or benchmark source names (default eval.sets)")


def _add_config_command(sub) -> None:
    """``config show`` / ``config explain``."""
    p = sub.add_parser("config", help="the resolved config with each field's doc and default, or one key explained")
    action = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    q = action.add_parser("show", help="print the resolved config as YAML, each field with its doc and default")
    _add_config_args(q)
    q = action.add_parser("explain", help="what one key (or section) means, its type, bounds and default")
    q.add_argument("key", help="dotted key, e.g. ppo.kl.target, ppo.kl, data.catalog.<name>.path")


def _add_review_commands(sub) -> None:
    """What a finished run is read with: ``report`` and the clinician ``review``."""
    p = sub.add_parser("report", help="build report.html / report.md for a run directory")
    p.add_argument("run_dir", type=Path, help="run directory, e.g. runs/local_tiny")

    p = sub.add_parser("review", help="clinician review: export a package to label, import filled labels")
    review = p.add_subparsers(dest="review_command", metavar="ACTION", required=True)
    q = review.add_parser("export", help="write <run>/review/: review.csv, review.xlsx, review.html, items.jsonl")
    q.add_argument("run_dir", type=Path, help="run directory with eval generations (and optionally PPO samples)")
    q.add_argument("--high-risk", type=int, default=40, help="red-team / high-risk answers (unsafe, low scores first)")
    q.add_argument("--lowest", type=int, default=20, help="answers with the lowest teacher scores")
    q.add_argument("--failures", type=int, default=20, help="answers whose judgement failed or was over budget")
    q.add_argument("--rubric", type=int, default=20,
                   help="rubric-graded answers: the reviewer ticks each criterion (calibrates the grader)")
    q.add_argument("--calibration", type=int, default=20, help="random answers stratified by model and set")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration draw and the item order")
    q.add_argument("--ppo", action="store_true", help="also draw from PPO samples (ppo/samples.jsonl)")
    q.add_argument("--blind", action="store_true", help="hide the judge's scores and reason and the rule verdict")
    q = review.add_parser("import", help="validate a filled review.csv / review.xlsx / saved HTML-form .json")
    q.add_argument("file", type=Path, help="the filled file")
    q.add_argument("--run", type=Path, default=None, help="run directory (default: the one the file belongs to)")
    q.add_argument("--reviewer", default=None, help="reviewer name for rows that leave it empty")

    q = review.add_parser("meta-eval", help="grade a HealthBench meta-eval file (physician labels per completion and "
                                            "criterion) with the rubric grader: macro F1 and balanced accuracy")
    _add_config_args(q, "reward.rubric")
    q.add_argument("--input", type=Path, required=True, help="meta-eval JSONL: prompt, completion, rubric, "
                                                              "binary_labels (and category, completion_id ...)")
    q.add_argument("--limit", type=_positive_int, default=None, help="only the first N rows")


def _add_rubrics_command(sub) -> None:
    """``rubrics generate``: criteria per prompt from the teacher."""
    p = sub.add_parser("rubrics", help="rubrics per prompt written by the teacher from its reference answer")
    rubrics = p.add_subparsers(dest="rubrics_command", metavar="ACTION", required=True)
    q = rubrics.add_parser("generate", help="7-20 criteria per prompt (Rubrics as Rewards), stored and written as "
                                            "an editable JSONL that prepare reads back")
    _add_config_args(q, "reward.rubric_generation")
    q.add_argument("--input", type=Path, required=True,
                   help="JSONL with id, messages or question, reference (e.g. <run>/data/rl_prompts.jsonl)")
    q.add_argument("--out", type=Path, required=True, help="output JSONL: {id, question, reference, rubrics, ...}")
    q.add_argument("--limit", type=_positive_int, default=None, help="only the first N prompts to generate for")
    q.add_argument("--dry-run", action="store_true", help="estimate tokens and cost without an API key or a call")


def _add_demo_command(sub) -> None:
    """``demo``: the gradio app over a run."""
    p = sub.add_parser("demo", help="gradio app: base / SFT / RL answers side by side, judged on demand")
    p.add_argument("run_dir", type=Path, help="run directory (its config.yaml, adapters and example questions)")
    p.add_argument("--config", "-c", type=Path, default=None, help="YAML config (default: RUN_DIR/config.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. reward.judge.budget_usd=1")
    p.add_argument("--host", default="127.0.0.1", help="bind address (anything but loopback needs a password)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--username", default="medrl", help="login name when a password is set")
    p.add_argument("--password-env", default="MEDRL_DEMO_PASSWORD",
                   help="environment variable holding the login password (never passed on the command line)")


def _add_pipeline_command(sub) -> None:
    """``pipeline``: every stage in order, skipping those done."""
    p = sub.add_parser("pipeline", help="prepare -> sft -> ppo -> eval -> report, skipping stages already done")
    _add_config_args(p)
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="re-run STAGE (and every later stage) even if its output exists "
                        "(repeatable; 'all' for every stage)")


def _add_model_commands(sub) -> None:
    """Model directories: ``push`` to the Hub, ``tiny-model``, ``download-model``."""
    p = sub.add_parser("push", help="upload an adapter or merged model directory with its model card to the "
                                    "Hugging Face Hub")
    p.add_argument("directory", type=Path, help="e.g. runs/<name>/ppo/adapter, or a `medrl merge` output")
    p.add_argument("--repo-id", required=True, help="hub repository, e.g. your-name/qwen3-1.7b-medrl")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token-env", default="HF_TOKEN",
                   help="environment variable holding the hub token (never passed on the command line)")

    p = sub.add_parser("tiny-model", help="build a tiny random Qwen3 + BPE tokenizer for tests and CPU runs")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--corpus", type=Path, action="append", default=[], help="extra text file(s) for the tokenizer")

    p = sub.add_parser("download-model", help="fetch a model snapshot through ModelScope into the local cache")
    p.add_argument("model_id", help="e.g. Qwen/Qwen3-1.7B")
    p.add_argument("--cache-dir", default=None, help="default: $MODELSCOPE_CACHE or ~/.cache/modelscope")
    p.add_argument("--revision", default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medrl", description="RL trainer that turns a small open model into a safer medical assistant "
                                  "(research use only, not for clinical decisions).")
    parser.add_argument("--version", action="version", version=f"medrl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_stage_commands, _add_config_command, _add_review_commands, _add_rubrics_command,
                _add_demo_command, _add_pipeline_command, _add_model_commands):  # the order of ``medrl --help``
        add(sub)
    return parser
