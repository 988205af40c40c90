"""Source loaders: resolve a source name to files (local or fetched from ModelScope), read them, map each raw row
onto the record schema. A bad row becomes a reject; an unknown source or unreadable file is a UsageError."""
from __future__ import annotations

import json
import logging
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from medrl.data.config import (BUILTIN_SOURCES, EVAL_LAYOUTS, GENERIC_FORMATS, MAPPABLE_FIELDS, RESERVED_SET_NAMES,
                               DataConfig, SourceSpec)
from medrl.data.readers import read_bytes, read_csv, read_json, read_jsonl
from medrl.data.schema import RowError, build_record
from medrl.errors import UsageError
from medrl.hub import hub_reachable, modelscope_cache_dir, modelscope_endpoint

log = logging.getLogger("medrl.data")

MEDICAL_O1_FILES = {"en": "medical_o1_sft.json", "zh": "medical_o1_sft_Chinese.json",
                    "en_mix": "medical_o1_sft_mix.json", "zh_mix": "medical_o1_sft_mix_Chinese.json"}
DEFAULT_FILES = {"medical-o1-verifiable": ["medical_o1_verifiable_problem.json"],
                 "delicate-medical": ["r1_data_example.jsonl"],
                 "pubmedqa": ["ori_pqal.json", "test_ground_truth.json"]}
PUBMEDQA_TEST_IDS = "test_ground_truth.json"
# raw key of each schema field, per built-in format
FORMAT_FIELDS = {
    "medical-o1": {"question": "Question", "think": "Complex_CoT", "answer": "Response"},
    "medical-o1-verifiable": {"question": "Open-ended Verifiable Question", "reference": "Ground-True Answer"},
    "delicate-medical": {"question": "question", "think": "think", "answer": "answer"},
    "cmd-dialogue": {"question": "ask", "answer": "answer", "specialty": "department"},
    "pubmedqa": {"question": "QUESTION", "reference": "LONG_ANSWER", "label": "final_decision"},
    # HuatuoGPT-o1's evaluation layout (MedQA, MedMCQA, MMLU-Pro, GPQA): the label is answer_idx, else the answer text
    "huatuo-eval": {"question": "question", "options": "options", "label": ("answer_idx", "answer")},
    # medLLM_QA_benchmark layout (CMExam, Chinese MedQA / MedMCQA / MMLU): answer is a list of lowercase letters
    "medllm-qa": {"question": "problem_text", "options": "choices", "label": "answer", "id": "problem_id"},
    # MedReason-style JSONL: {question, options, answer_idx} or {id, question, options, label}
    "medreason": {"question": "question", "options": "options", "label": ("answer_idx", "label"),
                  "think": "reasoning", "id": "id"},
    # HealthBench (openai/simple-evals): a conversation, physician-written criteria, item tags, maybe an ideal answer
    "healthbench": {"messages": "prompt", "rubrics": "rubrics", "example_tags": "example_tags",
                    "reference": "ideal_completions_data.ideal_completion", "id": "prompt_id"},
}
"""Raw key of each schema field, per built-in format; a tuple lists alternatives (the first key present wins)."""
PUBMEDQA_LABELS = ("yes", "no", "maybe")
EMPTY_ASKS = ("", "无", "无。", "无.", "空", "null", "none")


@dataclass
class Row:
    """One raw row after mapping: a record, or the reason it was rejected."""

    file: str
    line: int
    record: dict[str, Any] | None
    error: str | None
    benchmark: bool = False


# ---------------------------------------------------------------------------------------------- resolution
def resolve_spec(data: DataConfig, name: str) -> SourceSpec:
    """The effective settings of a source: built-in defaults overlaid with ``data.catalog[name]``."""
    builtin, custom = BUILTIN_SOURCES.get(name), data.catalog.get(name)
    if builtin is None and custom is None:
        known = sorted(set(BUILTIN_SOURCES) | set(data.catalog))
        raise UsageError(f"unknown data source '{name}' (known: {', '.join(known)}; define new ones under data.catalog)")
    if builtin is not None:
        spec = builtin if custom is None else builtin.model_copy(update=custom.model_dump(exclude_unset=True))
    else:
        spec = custom
    if spec.format is None:
        raise UsageError(f"data source '{name}' needs data.catalog.{name}.format (one of {', '.join(GENERIC_FORMATS)})")
    if spec.format in GENERIC_FORMATS:
        unknown = set(spec.fields) - set(MAPPABLE_FIELDS)
        mapped = set(spec.fields)
        answered = {"answer", "reference", "rubrics"} & mapped or {"options", "label"} <= mapped
        if len({"question", "messages"} & mapped) != 1 or not answered or unknown:
            raise UsageError(
                f"data source '{name}': data.catalog.{name}.fields must map question or messages (one of them) and "
                f"answer, reference, rubrics or options + label"
                f"{' (unknown: ' + ', '.join(sorted(unknown)) + ')' if unknown else ''}; keys: "
                f"{', '.join(MAPPABLE_FIELDS)}")
        scalar = [k for k, v in spec.fields.items() if isinstance(v, list) and k != "options"]
        if scalar:
            raise UsageError(f"data source '{name}': data.catalog.{name}.fields.{scalar[0]} must be one key (only "
                             f"options may list several keys)")
    if spec.role is None:
        spec = spec.model_copy(update={"role": "benchmark" if spec.format in EVAL_LAYOUTS else "sft"})
    if spec.role == "benchmark" and name in RESERVED_SET_NAMES:
        raise UsageError(f"data source '{name}': a benchmark is written as data/{name}.jsonl, which is a reserved "
                         f"file name ({', '.join(RESERVED_SET_NAMES)}); rename the source")
    return spec


def _default_files(spec: SourceSpec) -> list[str] | None:
    if spec.files:
        return list(spec.files)
    if spec.format == "medical-o1":
        return [MEDICAL_O1_FILES[spec.variant]]
    return DEFAULT_FILES.get(spec.format)


def source_files(name: str, spec: SourceSpec, data: DataConfig) -> list[Path]:
    """The files of a source: from ``path`` (a file or a directory), else fetched from ModelScope."""
    wanted = _default_files(spec)
    if spec.path:
        root = Path(spec.path).expanduser()
        if not root.exists():
            raise UsageError(f"data source '{name}': {root} not found (set data.catalog.{name}.path to a file or "
                             f"directory{' or use its ModelScope id' if spec.modelscope else ''})")
        if root.is_file():
            files = [root]
            if spec.format == "pubmedqa" and root.name != PUBMEDQA_TEST_IDS:
                files.append(root.parent / PUBMEDQA_TEST_IDS)
        elif wanted:
            files = [root / f for f in wanted]
        else:
            suffixes = {"cmd-dialogue": (".csv",), "csv": (".csv",), "jsonl": (".jsonl",)}.get(spec.format, (".json", ".jsonl"))
            files = sorted(p for p in root.iterdir() if p.suffix.lower() in suffixes)
            if not files:
                raise UsageError(f"data source '{name}': no {'/'.join(suffixes)} files in {root}")
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise UsageError(f"data source '{name}': missing file(s) {', '.join(missing)}")
        return files
    if spec.modelscope:
        if not wanted:
            raise UsageError(f"data source '{name}': set data.catalog.{name}.files (files of {spec.modelscope})")
        return fetch_modelscope(name, spec.modelscope, wanted, data.cache_dir)
    raise UsageError(f"data source '{name}' has neither a path nor a ModelScope id; set data.catalog.{name}.path")


def fetch_modelscope(name: str, dataset_id: str, files: list[str], cache_dir: str | None) -> list[Path]:
    """Files of a ModelScope dataset, downloaded into ``<cache>/datasets/<id>/`` unless already there. Fails within
    seconds, naming the local-path alternative, when the hub cannot be reached."""
    target = modelscope_cache_dir(cache_dir) / "datasets" / dataset_id
    missing = [f for f in files if not (target / f).is_file()]
    if missing:
        endpoint = modelscope_endpoint()
        alternative = (f"download {', '.join(missing)} elsewhere and set data.catalog.{name}.path to the local file "
                       f"or directory (or copy them into {target})")
        if not hub_reachable(endpoint):
            raise UsageError(f"data source '{name}': cannot reach ModelScope at {endpoint} to fetch {dataset_id}; "
                             + alternative)
        from modelscope.hub.snapshot_download import snapshot_download

        log.info("fetching %s (%s) from ModelScope into %s", dataset_id, ", ".join(missing), target)
        try:
            snapshot_download(repo_id=dataset_id, repo_type="dataset", allow_patterns=missing, local_dir=str(target))
        except Exception as exc:  # network, auth or a missing repo: one line with the way out
            raise UsageError(f"data source '{name}': ModelScope download of {dataset_id} failed "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); " + alternative) from None
        still = [f for f in missing if not (target / f).is_file()]
        if still:
            raise UsageError(f"data source '{name}': {dataset_id} has no file(s) {', '.join(still)}; "
                             f"set data.catalog.{name}.files")
    return [target / f for f in files]


# ---------------------------------------------------------------------------------------------- rows
def _lookup(row: dict, key: str | tuple | list) -> Any:
    """``row[key]``, or a dotted path into nested objects and lists (``answer.0``, ``a.b.-1``). A tuple of keys:
    the first one present. A list of keys (``options`` only): ``{A: row[k0], B: row[k1], ...}`` without the
    empty cells (CMMLU-style CSVs, MMLU-Pro rows with fewer than 10 options)."""
    if isinstance(key, tuple):
        return next((v for v in (_lookup(row, k) for k in key) if v is not None), None)
    if isinstance(key, list):
        cells = {string.ascii_uppercase[i]: _lookup(row, k) for i, k in enumerate(key)}
        return {k: v for k, v in cells.items() if v is not None and str(v).strip()}
    if key in row or "." not in key:
        return row.get(key)
    node: Any = row
    for part in key.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and re.fullmatch(r"-?\d+", part) and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _read(path: Path, spec: SourceSpec, max_row_bytes: int):
    suffix = path.suffix.lower()
    if suffix == ".csv" or spec.format == "csv":
        return read_csv(path, max_row_bytes, spec.encoding)
    if suffix == ".jsonl" or spec.format == "jsonl":
        return read_jsonl(path, max_row_bytes)
    return read_json(path, max_row_bytes)


def _pubmedqa_fields(row: dict, test_ids: set[str]) -> tuple[dict, bool]:
    contexts, labels = row.get("CONTEXTS"), row.get("LABELS") or []
    if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) for c in contexts):
        raise RowError("field 'CONTEXTS' must be a non-empty list of strings")
    decision = row.get("final_decision")
    if decision not in PUBMEDQA_LABELS:
        raise RowError(f"field 'final_decision' must be one of yes, no, maybe; got {decision!r}")
    question, long_answer = row.get("QUESTION"), row.get("LONG_ANSWER")
    if not isinstance(question, str) or not question.strip():
        raise RowError("missing field 'QUESTION'")
    if not isinstance(long_answer, str) or not long_answer.strip():
        raise RowError("missing field 'LONG_ANSWER'")
    labels = labels if isinstance(labels, list) and len(labels) == len(contexts) else [None] * len(contexts)
    context = "\n".join(f"{lab}: {c}" if isinstance(lab, str) and lab else c for lab, c in zip(labels, contexts))
    pmid = str(row.get("_key", ""))
    fields = {"question": f"{question}\n\nContext:\n{context}\n\nAnswer yes, no or maybe.",
              "answer": f"{decision.capitalize()}. {long_answer}", "reference": long_answer, "label": decision,
              "risk_text": question,
              "meta": {"pmid": pmid, "year": row.get("YEAR"), "meshes": row.get("MESHES"),
                       "pubmedqa_benchmark": pmid in test_ids}}
    return fields, pmid in test_ids


def _fields(row: dict, spec: SourceSpec, mapping: dict[str, str]) -> dict:
    fields = {key: _lookup(row, raw) for key, raw in mapping.items()}
    meta: dict[str, Any] = {}
    if spec.format == "delicate-medical":
        if isinstance(row.get("instruction"), str) and row["instruction"].strip():
            meta["instruction"] = row["instruction"].strip()
        if isinstance(row.get("metrics"), (dict, int, float)):
            meta["metrics"] = row["metrics"]
    elif spec.format == "medllm-qa" and isinstance(row.get("points"), (int, float)):
        meta["points"] = row["points"]
    elif spec.format == "healthbench" and isinstance(row.get("ideal_completions_data"), dict):
        meta["ideal_completions_data"] = {k: v for k, v in row["ideal_completions_data"].items()
                                          if k != "ideal_completion"}  # the ideal completion is the reference
    elif spec.format == "cmd-dialogue" and isinstance(row.get("title"), str):
        meta["title"] = row["title"].strip()
        if isinstance(fields["question"], str) and fields["question"].strip() in EMPTY_ASKS:
            fields["question"] = meta["title"]  # the real data has rows whose ask is just "无" (none)
    if "id" in fields:
        raw_id = fields.pop("id")
        if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
            meta["raw_id"] = str(raw_id)
    fields["meta"] = meta
    return fields


def _pubmedqa_test_ids(files: list[Path]) -> tuple[list[Path], set[str]]:
    data = [f for f in files if f.name != PUBMEDQA_TEST_IDS]
    ids_file = next((f for f in files if f.name == PUBMEDQA_TEST_IDS), None)
    if ids_file is None:
        raise UsageError(f"PubMedQA needs {PUBMEDQA_TEST_IDS} (the benchmark pmids) next to {data[0]}")
    try:
        ids = json.loads(read_bytes(ids_file).decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{ids_file}: not valid JSON ({exc})") from None
    if not isinstance(ids, (dict, list)):
        raise UsageError(f"{ids_file}: expected an object of pmid -> label or a list of pmids")
    return data, {str(k) for k in ids}


def canary_of(row: dict, canaries: tuple[str, ...]) -> str | None:
    """What marks a raw row as benchmark data never to train on: its HealthBench ``canary`` field, or the first of
    ``canaries`` (``data.canaries``) found anywhere in it."""
    if isinstance(row.get("canary"), str) and row["canary"].strip():
        return row["canary"].strip()
    if canaries:
        text = json.dumps(row, ensure_ascii=False)
        return next((c for c in canaries if c in text), None)
    return None


def iter_rows(name: str, spec: SourceSpec, files: list[Path], max_row_bytes: int,
              canaries: tuple[str, ...] = ()) -> Iterator[Row]:
    """Every row of a source's files as a record or a reject reason (file and line attached). A row with a canary
    (``canary_of``) is a benchmark row whatever the source's role (``meta.canary`` says which); a row with nothing
    to train on (a rubric but no answer) is rejected unless the source's role is ``rl`` or ``benchmark``."""
    test_ids: set[str] = set()
    if spec.format == "pubmedqa":
        files, test_ids = _pubmedqa_test_ids(files)
    mapping = FORMAT_FIELDS.get(spec.format) or dict(spec.fields)  # schema field -> raw key (also names rejects)
    names = {k: (v if isinstance(v, str) else "|".join(v) if isinstance(v, tuple) else k) for k, v in mapping.items()}
    whole_benchmark = spec.role == "benchmark" and spec.format != "pubmedqa"  # PubMedQA: test_ground_truth decides
    for path in files:
        checked_columns = False
        for line, value, error in _read(path, spec, max_row_bytes):
            if error is None and not isinstance(value, dict):
                error = f"row is a {type(value).__name__}, expected an object"
            if error is not None:
                yield Row(str(path), line, None, error)
                continue
            if path.suffix.lower() == ".csv" and not checked_columns:
                absent = [raw for key, raw in mapping.items()
                          if key in ("question", "answer") and isinstance(raw, str) and raw not in value]
                if absent:
                    raise UsageError(f"{path}: no column(s) {', '.join(absent)} (columns: {', '.join(value)})")
                checked_columns = True
            try:
                benchmark = whole_benchmark
                if spec.format == "pubmedqa":
                    fields, benchmark = _pubmedqa_fields(value, test_ids)
                else:
                    fields = _fields(value, spec, mapping)
                record = build_record(name, fields, spec.language, names, spec.label_index_base)
                canary = canary_of(value, canaries)
                if canary is not None:
                    if name in RESERVED_SET_NAMES:
                        raise UsageError(f"{path}:{line}: a row with a canary is eval-only, written to "
                                         f"data/{name}.jsonl, a reserved file name; rename the source '{name}'")
                    record["meta"]["canary"], benchmark = canary, True
                if not benchmark and spec.role == "sft" and not record["answer"]:
                    raise RowError(f"no answer to train on (field '{names.get('answer', 'answer')}'): a row with "
                                   f"only a rubric needs data.catalog.{name}.role rl or benchmark")
            except RowError as exc:
                yield Row(str(path), line, None, str(exc))
                continue
            except UsageError:
                raise
            except Exception as exc:  # never crash on a row; keep the reason and the traceback in the log
                log.debug("unexpected error on %s:%d", path, line, exc_info=True)
                yield Row(str(path), line, None, f"unexpected {type(exc).__name__}: {exc}")
                continue
            yield Row(str(path), line, record, None, benchmark)
