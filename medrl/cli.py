"""``medrl`` command line. Usage/config errors exit 2 with one line; unexpected errors exit 1 and keep the
traceback in ``runs/<name>/logs/medrl.log``. Stage code is imported lazily so ``--help`` stays fast."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from medrl.cli_args import build_parser
from medrl.errors import UsageError

log = logging.getLogger("medrl")

OFFLINE_ENV = {"DS_ACCELERATOR": "cpu", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false"}


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


READ_ONLY = ("estimate-memory", "merge")
"""Commands that only read a run (``judge --dry-run`` too): no run directory, no log file, no config record."""


def _configured(args):
    """Load the config. A stage (a command that trains, evaluates or scores) gets its run directory and log file
    there, and records the config it ran with (``RunDir.record_stage``, in the stage); a read-only command logs to
    the console only and leaves the run directory as it is."""
    from medrl.config import load_config, secret_env_names
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


def _tiny_model(args) -> int:
    from medrl.models.tiny import TinySpec, build_tiny_model

    check_writable(args.out, "model directory", directory=True)
    out = build_tiny_model(args.out, TinySpec(vocab_size=args.vocab_size, seed=args.seed), args.corpus)
    print(f"tiny Qwen3 model written to {out}")
    return 0


def _download_model(args) -> int:
    from medrl.models.loading import download_model

    print(download_model(args.model_id, cache_dir=args.cache_dir, revision=args.revision))
    return 0


def _report(args) -> int:
    if not args.run_dir.is_dir():
        raise UsageError(f"run directory not found: {args.run_dir}")
    markers = ("config.yaml", "logs", "metrics.jsonl", "data", "sft", "ppo", "eval")
    if not any((args.run_dir / m).exists() for m in markers):
        raise UsageError(f"{args.run_dir} is not a run directory (none of {', '.join(markers)}): give "
                         f"runs/<run.name>")
    from medrl.report.build import build_report
    from medrl.runs import RunDir, setup_logging

    run = RunDir(args.run_dir)
    setup_logging(run)
    print(build_report(run))
    return 0


def _push(args) -> int:
    from medrl.models.push import push

    print(push(args.directory, args.repo_id, private=args.private, token_env=args.token_env))
    return 0


def _config(args) -> int:
    from medrl import config_help

    if args.config_command == "explain":
        print(config_help.explain(args.key), end="")
    else:
        from medrl.config import load_config

        print(config_help.show(load_config(args.config, args.overrides)), end="")
    return 0


def _demo(args) -> int:
    from medrl.demo.app import run_demo

    return run_demo(args)


_WITHOUT_RUN_CONFIG = {"tiny-model": _tiny_model, "download-model": _download_model, "report": _report,
                       "review": _review, "push": _push, "config": _config, "demo": _demo}
"""Commands that read no run config through ``_configured`` (they take a run directory, a file or nothing)."""


def _run_stage(args, cfg, run) -> None:
    """Run the stage command ``args.command`` with its loaded config and run directory."""
    cmd = args.command
    if cmd == "prepare":
        from medrl.prepare.stage import run_prepare

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


def _dispatch(args) -> int:
    cmd = args.command
    if cmd in _WITHOUT_RUN_CONFIG:
        return _WITHOUT_RUN_CONFIG[cmd](args)
    if cmd in ("judge", "merge", "rubrics") and not getattr(args, "dry_run", False):
        check_writable(args.out, "model directory" if cmd == "merge" else "output file", directory=cmd == "merge")
    cfg, run = _configured(args)
    _run_stage(args, cfg, run)
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
