"""Config of the ``prepare`` stage (owned by medrl.data).

A *source* is a named loader: a raw format (how rows are read and mapped onto the record schema) plus where the
files come from (a local path or a ModelScope dataset id). Five sources are built in (``BUILTIN_SOURCES``); the
``catalog`` mapping overrides any of their settings or defines new generic sources (JSONL / JSON / CSV with a field
mapping), e.g. for Datatang's 203k Chinese medical QA or in-house data::

    data:
      sources: [medical-o1, datatang-qa]
      catalog:
        medical-o1: {variant: zh, limit: 5000}
        datatang-qa: {format: jsonl, path: /data/datatang.jsonl, fields: {question: 问题, answer: 答案}}
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from medrl.config_base import StrictModel

SourceFormat = Literal["medical-o1", "medical-o1-verifiable", "delicate-medical", "cmd-dialogue", "pubmedqa",
                       "huatuo-eval", "medllm-qa", "medreason", "healthbench", "jsonl", "json", "csv"]
GENERIC_FORMATS = ("jsonl", "json", "csv")
EVAL_LAYOUTS = ("huatuo-eval", "medllm-qa", "healthbench")
"""Formats of published evaluation sets: their sources default to ``role: benchmark``."""
RESERVED_SET_NAMES = ("train", "dev", "test", "gold", "redteam", "rl_prompts", "rejects")
MAPPABLE_FIELDS = ("question", "messages", "answer", "think", "reference", "specialty", "options", "label", "rubrics",
                   "example_tags", "id")


class SourceSpec(StrictModel):
    """One data source. For a built-in name every field you set overrides the built-in default."""

    format: SourceFormat | None = None
    """Raw format; built-in sources use their own name. Generic sources: ``jsonl``, ``json`` (a list of objects or
    a mapping of key -> object) or ``csv`` (header row), with ``fields``."""
    path: str | None = None
    """Local file or directory. Wins over ``modelscope`` when set."""
    modelscope: str | None = None
    """ModelScope dataset id; its ``files`` are fetched into ``<cache>/datasets/<id>/`` on first use."""
    files: list[str] | None = None
    """Files inside ``path`` (a directory) or the ModelScope repo. None: the format's default files (for
    ``medical-o1`` chosen by ``variant``), or every ``*.jsonl``/``*.json``/``*.csv`` in a ``path`` directory."""
    variant: Literal["en", "zh", "en_mix", "zh_mix"] = "en"
    """``medical-o1`` only: which of the four released files to use when ``files`` is not given."""
    fields: dict[str, str | list[str]] = {}
    """Generic formats: schema field -> raw key. A dotted key walks nested objects and indexes lists
    (``answer.0``). Keys: question or messages (one of them), answer, think, reference, specialty, options, label,
    rubrics, example_tags, id. ``messages`` holds a list of ``{role, content}`` turns ending with a user turn (the
    question is its last user turn); ``rubrics`` a list of ``{criterion, points, tags}``. ``options`` is one key
    holding an object (``{A: .., B: ..}``) or a list, or a list of keys, one per option (``options: [A, B, C, D]``
    for CMMLU-style CSVs; lettered A, B, ... in that order). Needs ``answer``, ``reference``, ``options`` + ``label``
    or ``rubrics``."""
    label_index_base: Literal[0, 1] = 0
    """How a numeric MCQ label counts options: 0 (``0`` = A) or 1 (``1`` = A). Labels may also be letters (any
    case), a list of letters (multiple answers), or the text of the correct option."""
    encoding: str = "auto"
    """CSV text encoding; ``auto`` tries UTF-8 (with or without BOM), then GB18030 (a superset of GBK)."""
    language: Literal["auto", "en", "zh"] = "auto"
    """``auto``: ``zh`` when at least 20% of the question's letters are CJK characters, else ``en``."""
    limit: int | None = Field(None, ge=1)
    """Keep at most N accepted rows of this source, in file order (benchmark items are never cut)."""
    weight: float = Field(1.0, gt=0)
    """Share of ``data.train_size`` given to this source's train records (only used when train_size is set)."""
    role: Literal["sft", "rl", "benchmark"] | None = None
    """None: ``benchmark`` for the evaluation layouts (``huatuo-eval``, ``medllm-qa``, ``healthbench``), else
    ``sft``. ``sft``: train records go to train.jsonl (and the RL pool). ``rl``: prompts with references (or
    rubrics) only — never in train.jsonl, but eligible for rl_prompts, gold, dev and test (e.g. a MedQA *train*
    split for the verifier reward). ``benchmark``: an eval-only set written whole to ``data/<name>.jsonl``
    (``eval.sets: [<name>]``): never in train/dev/test/gold/RL prompts, and train is decontaminated against it.
    (PubMedQA's format marks its benchmark by ``test_ground_truth.json``; its other rows join the training pool.)
    Rows with a canary are benchmark rows whatever the role (``data.canaries``)."""
    license: str = "unknown"
    """Shown in DATA_CARD.md."""
    rubrics: str | None = None
    """A rubrics JSONL (``{id, rubrics}`` per line, as ``medrl rubrics generate`` writes it, perhaps edited by a
    clinician): each row's rubric is attached to this source's record with that id, replacing any rubric it had;
    rows whose ``rubrics`` is null (generation failed) are passed over."""
    generate_rubrics: bool = False
    """Prepare asks the teacher (``reward.judge``, as ``medrl rubrics generate``: stored, never paid twice) for a
    rubric for every record of this source that has a reference and no rubric, and writes them, editable, to
    ``<run>/data/rubrics/<source>.jsonl`` (attach an edited copy with ``rubrics``)."""


BUILTIN_SOURCES: dict[str, SourceSpec] = {
    "medical-o1": SourceSpec(
        format="medical-o1", modelscope="FreedomIntelligence/medical-o1-reasoning-SFT", license="Apache-2.0"),
    "medical-o1-verifiable": SourceSpec(
        format="medical-o1-verifiable", modelscope="FreedomIntelligence/medical-o1-verifiable-problem",
        role="rl", license="Apache-2.0"),
    "delicate-medical": SourceSpec(
        format="delicate-medical", modelscope="krisfu/delicate_medical_r1_data", license="see the dataset page"),
    "cmd-dialogue": SourceSpec(
        format="cmd-dialogue", license="MIT (Toyhom/Chinese-medical-dialogue-data)"),
    "pubmedqa": SourceSpec(format="pubmedqa", role="benchmark", license="MIT (pubmedqa/pubmedqa)"),
}
"""Built-in sources. ``cmd-dialogue`` (github.com/Toyhom/Chinese-medical-dialogue-data) and ``pubmedqa``
(github.com/pubmedqa/pubmedqa, ``data/ori_pqal.json`` + ``data/test_ground_truth.json``) need a local ``path``.
Benchmark files in the common layouts are defined in ``catalog`` with a built-in format, e.g.::

    medqa: {format: huatuo-eval, path: medqa_usmle_test.json, role: benchmark}   # {question, options, answer_idx}
    cmexam: {format: medllm-qa, path: cmexam.jsonl, role: benchmark}   # {problem_text, choices, answer: ["c"]}
    medreason: {format: medreason, path: medreason.jsonl, role: rl}   # {question, options, answer_idx | label}
"""


class RLMix(StrictModel):
    """Shares of the RL prompt set; normalised to sum to 1. A pool that runs short leaves its share to train."""

    redteam: float = Field(0.1, ge=0)
    """Share of red-team prompts (packaged set + ``data.redteam_path``)."""
    gold: float = Field(0.1, ge=0)
    """Share of prompts drawn from the gold pool (records with a reference)."""
    train: float = Field(0.8, ge=0)
    """Share of prompts drawn from the training pool."""
    low_risk_floor: float = Field(0.2, ge=0, le=1)
    """Share of each pool's prompts reserved for low-risk questions (when it has them), so RL also sees ordinary
    questions and does not drift into over-refusal; the rest is filled high-risk first."""


class DataConfig(StrictModel):
    # ---- sources
    sources: list[str] = ["medical-o1", "medical-o1-verifiable", "delicate-medical"]
    """Source names to load, in order (built-in names or ``catalog`` keys). ``--sources a,b`` replaces it."""
    mode: Literal["mix", "priority"] = "mix"
    """``mix``: load every source. ``priority``: use only the first source that loads (benchmark sources are always
    loaded)."""
    catalog: dict[str, SourceSpec] = {}
    """Per-source settings: overrides of built-in sources and definitions of generic ones."""
    cache_dir: str | None = None
    """ModelScope download cache; default ``$MODELSCOPE_CACHE`` or ``~/.cache/modelscope``."""
    max_row_bytes: int = Field(1_000_000, ge=1024)
    """Raw rows larger than this are rejected before parsing."""
    canaries: list[str] = []
    """Canary strings of benchmark data (e.g. BIG-bench's GUID): a raw row containing one anywhere is eval-only,
    whatever its source's role, like a row with a HealthBench ``canary`` field: written to ``data/<source>.jsonl``,
    never to train, dev, test, gold or the RL prompts."""

    # ---- cleaning (token bounds use the tokenizer of ``model.path``; a char estimate when it cannot load)
    min_question_tokens: int = Field(3, ge=1)
    """Questions shorter than this are rejected (recorded in rejects.jsonl)."""
    max_question_tokens: int = Field(1024, ge=1)
    """PubMedQA questions carry their abstract (~300-600 tokens)."""
    min_answer_tokens: int = Field(1, ge=1)
    """Final answers (the output after ``<think>``) shorter than this are rejected."""
    max_output_tokens: int = Field(4096, ge=1)
    """Bound on ``output`` (think + answer); medical-o1 chains of thought run to ~2-3k tokens."""
    near_dup_threshold: float | None = Field(0.8, gt=0, le=1)
    """Drop a question whose estimated Jaccard similarity (character 5-gram MinHash) to an earlier one is at least
    this; None disables near-duplicate removal."""
    decontam_chars: int = Field(64, ge=16)
    """Drop a training record sharing a run of this many characters with any eval item (dev, test, gold,
    red-team, benchmarks), unless the run is stock phrasing (``decontam_phrase_items``)."""
    decontam_phrase_items: int | None = Field(3, ge=2)
    """Stock phrasing is not leakage: a ``decontam_chars // 2``-character window found in at least this many distinct
    eval texts is exam boilerplate ("Which of the following is the most appropriate next step in management?"),
    and a shared run counts only with >= ``decontam_chars // 2`` characters outside such windows. None: every
    shared run counts. (Real MedQA halves: 237 of 624 false hits -> 22; ``bench/decontam_benchmarks.py``.)"""

    # ---- splits and sets
    split_seed: int = 0
    """Salt of the split hash; changing it reshuffles dev/test/gold, nothing else does."""
    dev_fraction: float = Field(0.02, ge=0, lt=0.5)
    """Share of the pool held out as dev (SFT eval loss), chosen by split hash; capped by ``max_dev``."""
    test_fraction: float = Field(0.02, ge=0, lt=0.5)
    """Share of the pool held out as test (``medrl eval``), chosen by split hash; capped by ``max_test``."""
    max_dev: int = Field(500, ge=1)
    """Most dev records."""
    max_test: int = Field(1000, ge=1)
    """Most test records."""
    gold_size: int = Field(200, ge=0)
    """Gold items: records with a reference, chosen by split hash round-robin over sources, held out of training."""
    train_size: int | None = Field(None, ge=1)
    """Cap on train records, shared among sources by ``weight``; None keeps every train record."""
    redteam_path: str | None = None
    """JSONL of extra red-team prompts (category, language, prompt, expected_behavior, rationale) added to the
    packaged set."""
    rl_prompts: int = Field(2000, ge=0)
    """Size of rl_prompts.jsonl (fewer when the pools run short)."""
    rl_mix: RLMix = RLMix()
    """Where the RL prompts come from (shares of red-team, gold and train pools)."""
