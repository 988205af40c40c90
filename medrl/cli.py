"""``medrl`` command line. Usage/config errors exit 2 with one line; unexpected errors exit 1 and keep the
traceback in ``runs/<name>/logs/medrl.log``. Stage code is imported lazily so ``--help`` stays fast."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from medrl import __version__
from medrl.errors import UsageError

log = logging.getLogger("medrl")

OFFLINE_ENV = {"DS_ACCELERATOR": "cpu", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false"}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def check_writable(path: Path, what: str, directory: bool = False) -> Path:
    """Fail before any work when ``path`` (a file, or a directory to fill) cannot be written: its parent is created
    and a scratch file is written and removed there."""
    import tempfile

    path = Path(path)
    target = path if directory else path.parent
    if directory and path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} exists and is not a directory")
    if not directory and path.is_dir():
        raise UsageError(f"{what} {path} is a directory, expected a file path")
    blocking = next((p for p in (target, *target.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"cannot write {what} {path}: {blocking} is a file, not a directory")
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".medrl-write-check-"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write {what} {path}: {exc.strerror or exc}"
                         + (f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else "")) from None
    return path


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medrl", description="RL trainer that turns a small open model into a safer medical assistant "
                                  "(research use only, not for clinical decisions).")
    parser.add_argument("--version", action="version", version=f"medrl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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

    p = sub.add_parser("config", help="the resolved config with each field's doc and default, or one key explained")
    action = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    q = action.add_parser("show", help="print the resolved config as YAML, each field with its doc and default")
    _add_config_args(q)
    q = action.add_parser("explain", help="what one key (or section) means, its type, bounds and default")
    q.add_argument("key", help="dotted key, e.g. ppo.kl.target, ppo.kl, data.catalog.<name>.path")

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

    p = sub.add_parser("demo", help="gradio app: base / SFT / RL answers side by side, judged on demand")
    p.add_argument("run_dir", type=Path, help="run directory (its config.yaml, adapters and example questions)")
    p.add_argument("--config", "-c", type=Path, default=None, help="YAML config (default: RUN_DIR/config.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. reward.judge.budget_usd=1")
    p.add_argument("--host", default="127.0.0.1", help="bind address (anything but loopback needs a password)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--username", default="medrl", help="login name when a password is set")
    p.add_argument("--password-env", default="MEDRL_DEMO_PASSWORD",
                   help="environment variable holding the login password (never passed on the command line)")

    p = sub.add_parser("pipeline", help="prepare -> sft -> ppo -> eval -> report, skipping stages already done")
    _add_config_args(p)
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="re-run STAGE (and every later stage) even if its output exists "
                        "(repeatable; 'all' for every stage)")

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
    return parser


READ_ONLY = ("estimate-memory", "merge")
"""Commands that only read a run (``judge --dry-run`` too): no run directory, no log file, no config record."""


def _configured(args):
    """Load the config. A stage (a command that trains, evaluates or scores) gets its run directory and log file
    there, and records the config it ran with (``RunDir.record_stage``, in the stage); a read-only command logs to
    the console only and leaves the run directory as it is."""
    from medrl.config import load_config
    from medrl.runs import RunDir, setup_logging

    cfg = load_config(args.config, args.overrides)
    run = RunDir.from_config(cfg)
    writes = args.command not in READ_ONLY and not getattr(args, "dry_run", False)
    setup_logging(run.ensure() if writes else None, secret_envs=secret_env_names(cfg))
    if writes and cfg.model.build_tiny_if_missing and not Path(cfg.model.path).exists():
        from medrl.models.tiny import build_tiny_model

        log.info("building the tiny Qwen3 model at %s", cfg.model.path)
        build_tiny_model(cfg.model.path)
    return cfg, run


def secret_env_names(cfg) -> list[str]:
    names = {"DEEPSEEK_API_KEY", "OPENAI_API_KEY"}
    judge = getattr(cfg.reward, "judge", None)
    env = getattr(judge, "api_key_env", None)
    if env:
        names.add(env)
    cache = getattr(cfg.reward, "cache", None)
    if getattr(cache, "backend", None) == "postgres":
        names.add(cache.url_env)  # the database URL carries a password
    return sorted(names)


def _review(args) -> int:
    from medrl.review.items import Quotas
    from medrl.review.package import export_review, import_labels
    from medrl.runs import RunDir, setup_logging

    if args.review_command == "meta-eval":
        from medrl.review.package import run_meta_eval

        cfg, run = _configured(args)
        stats = run_meta_eval(cfg, run, args.input, args.limit)
        print(f"meta-eval ({stats['grader']}): {stats['rows']} rows, {stats['n']} physician labels, {stats['failed']} "
              f"not graded: macro F1 {stats['macro_f1']}, balanced accuracy {stats['balanced_accuracy']} -> "
              f"{run.review / 'meta_eval.json'}")
        return 0
    if args.review_command == "export":
        if not args.run_dir.is_dir():
            raise UsageError(f"run directory not found: {args.run_dir}")
        run = RunDir(args.run_dir)
        setup_logging(run)
        package = export_review(run, Quotas(args.failures, args.high_risk, args.lowest, args.calibration, args.seed,
                                            rubric=args.rubric),
                                include_ppo=args.ppo, blind=args.blind)
        print(f"review package {package['package_id']}: {package['items']} items in {run.review} "
              f"(review.xlsx, review.csv, review.html)")
        return 0
    setup_logging(None)
    out = import_labels(args.file, args.run, args.reviewer)
    print(f"imported {out['imported']} label(s) ({out['added']} new, {out['replaced']} replaced) from "
          f"{', '.join(out['reviewers']) or 'nobody'}; {out['blank']} blank row(s) skipped; {len(out['errors'])} "
          f"row(s) rejected; labels in {out['run']}/review/labels.jsonl")
    for line in out["errors"]:
        print(f"medrl: rejected {args.file}: {line}", file=sys.stderr)
    return 0 if out["imported"] or not out["errors"] else 2


def _dispatch(args) -> int:
    cmd = args.command
    if cmd == "tiny-model":
        from medrl.models.tiny import TinySpec, build_tiny_model

        check_writable(args.out, "model directory", directory=True)
        out = build_tiny_model(args.out, TinySpec(vocab_size=args.vocab_size, seed=args.seed), args.corpus)
        print(f"tiny Qwen3 model written to {out}")
        return 0
    if cmd == "download-model":
        from medrl.models.loading import download_model

        print(download_model(args.model_id, cache_dir=args.cache_dir, revision=args.revision))
        return 0
    if cmd == "report":
        if not args.run_dir.is_dir():
            raise UsageError(f"run directory not found: {args.run_dir}")
        markers = ("config.yaml", "logs", "metrics.jsonl", "data", "sft", "ppo", "eval")
        if not any((args.run_dir / m).exists() for m in markers):
            raise UsageError(f"{args.run_dir} is not a run directory (none of {', '.join(markers)}): give "
                             f"runs/<run.name>")
        from medrl.evaluation.report import build_report
        from medrl.runs import RunDir, setup_logging

        run = RunDir(args.run_dir)
        setup_logging(run)
        print(build_report(run))
        return 0

    if cmd == "review":
        return _review(args)
    if cmd == "push":
        from medrl.models.push import push

        print(push(args.directory, args.repo_id, private=args.private, token_env=args.token_env))
        return 0
    if cmd == "config":
        from medrl import config_help

        if args.config_command == "explain":
            print(config_help.explain(args.key), end="")
        else:
            from medrl.config import load_config

            print(config_help.show(load_config(args.config, args.overrides)), end="")
        return 0
    if cmd == "demo":
        from medrl.demo.app import run_demo

        return run_demo(args)

    if cmd in ("judge", "merge", "rubrics") and not getattr(args, "dry_run", False):
        check_writable(args.out, "model directory" if cmd == "merge" else "output file", directory=cmd == "merge")
    cfg, run = _configured(args)
    if cmd == "prepare":
        from medrl.data.prepare import run_prepare

        run_prepare(cfg, run, sources=args.sources, strict=args.strict)
    elif cmd == "sft":
        from medrl.sft.trainer import run_sft

        run_sft(cfg, run, resume=args.resume)
    elif cmd == "merge":
        from medrl.sft.merge import merge_adapter

        print(merge_adapter(cfg, run, adapter=args.adapter, out=args.out))
    elif cmd == "judge":
        from medrl.reward.judge_cli import run_judge

        run_judge(cfg, run, input_path=args.input, out_path=args.out, limit=args.limit, dry_run=args.dry_run)
    elif cmd == "rubrics":
        from medrl.reward.rubric_gen_cli import run_generate

        run_generate(cfg.reward, input_path=args.input, out_path=args.out, limit=args.limit, dry_run=args.dry_run)
    elif cmd == "ppo":
        from medrl.ppo.driver import run_ppo

        run_ppo(cfg, run, resume=args.resume)
    elif cmd == "estimate-memory":
        from medrl.ppo.memory import run_estimate_memory

        run_estimate_memory(cfg)
    elif cmd == "eval":
        from medrl.evaluation.evaluate import run_eval

        run_eval(cfg, run, models=args.models, sets=args.sets)
    elif cmd == "pipeline":
        from medrl.pipeline import run_pipeline

        run_pipeline(cfg, run, force=args.force)
    return 0


def main(argv: list[str] | None = None) -> int:
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse reads a positional list in one piece: overrides after options (`demo RUN --port 1 a=b`) come back here
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _dispatch(args)
    except UsageError as exc:
        exc = getattr(exc, "cause", None) or exc  # raised inside a Ray actor: the error without Ray's traceback
        print(f"medrl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medrl: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # unexpected: full traceback to the log file, one line on the console
        log.debug("unexpected error", exc_info=True)
        where = next((h.baseFilename for h in log.handlers if isinstance(h, logging.FileHandler)), None)
        hint = f" (traceback in {where})" if where else ""
        print(f"medrl: unexpected error: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
        if not where:
            import traceback

            traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
