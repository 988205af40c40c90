"""``run_prepare`` / ``medrl prepare`` end to end on the shipped samples."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from medrl.prepare.stage import OUTPUT_FILES, run_prepare
from medrl.data.schema import RECORD_FIELDS, RL_PROMPT_FIELDS, format_output
from medrl.errors import UsageError
from medrl.runs import RunDir, read_metrics, setup_logging
from local_prepare import prepare_local_tiny as _prepare

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
RISK_ORDER = {"high": 0, "medium": 1, "low": 2}


def _read(run: RunDir, name: str) -> list[dict]:
    return [json.loads(line) for line in (run.data / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("prep") / "runs")


def test_outputs_follow_the_schema(prepared):
    cfg, run, summary = prepared
    files = {name: _read(run, name) for name in (*OUTPUT_FILES, "pubmedqa", "mcq-sample", "healthbench-sample")}
    assert summary["benchmarks"] == {"pubmedqa": 16, "mcq-sample": 4, "healthbench-sample": 12}
    for name, rows in files.items():
        assert {**summary, **summary["benchmarks"]}[name] == len(rows) > 0, name
        for r in rows:
            assert tuple(r) == RECORD_FIELDS
            assert r["language"] in ("en", "zh") and r["risk"] in RISK_ORDER
            assert r["output"] == format_output(r["think"], r["answer"])
    ids = [r["id"] for rows in files.values() for r in rows]
    assert len(ids) == len(set(ids))  # every set is disjoint from every other
    train = files["train"]
    assert not {r["source"] for r in train} & {"redteam", "medical-o1-verifiable"}  # never trained on by SFT
    assert all(r["reference"] or r["rubrics"] for r in files["gold"])  # gradable: a reference or a rubric
    assert {r["source"] for r in files["gold"]} == {"medical-o1-verifiable", "pubmedqa", "datatang-style",  # MCQ: label
                                                    "rubric-prompts"}
    assert len(files["pubmedqa"]) == 16 and all(r["label"] in ("yes", "no", "maybe") for r in files["pubmedqa"])
    assert all(r["category"] and r["expected_behavior"] for r in files["redteam"])
    assert [r["label"] for r in sorted(files["mcq-sample"], key=lambda r: r["question"])] == ["B", "C", "B", "I"]
    # stratified, never-empty dev/test: every source with >= 3 pool records is in both
    for split in ("dev", "test"):
        assert {r["source"] for r in files[split]} == {"medical-o1", "medical-o1-verifiable", "delicate-medical",
                                                        "cmd-dialogue", "pubmedqa", "datatang-style",
                                                        "rubric-prompts"}
    rl = _read(run, "rl_prompts")
    assert all(tuple(r) == RL_PROMPT_FIELDS for r in rl) and len(rl) == summary["rl_prompts"] == 64
    assert not (run.data / ".spool.jsonl").exists()
    assert read_metrics(run, "prepare")[-1]["train"] == summary["train"]


def test_rl_prompts_mix_and_order(prepared):
    cfg, run, _ = prepared
    rl = _read(run, "rl_prompts")
    ranks = [RISK_ORDER[r["risk"]] for r in rl]
    assert ranks == sorted(ranks) and ranks[0] == 0  # high risk first
    pools = {name: {r["id"] for r in _read(run, name)} for name in ("redteam", "gold", "train", "dev", "test", "pubmedqa")}
    by_pool = Counter(next((p for p in ("redteam", "gold") if r["id"] in pools[p]), "train") for r in rl)
    assert by_pool == {"redteam": 6, "gold": 6, "train": 52}  # 0.1 / 0.1 / 0.8 of 64
    held_out = pools["dev"] | pools["test"] | pools["pubmedqa"]
    assert not {r["id"] for r in rl} & held_out
    from_train = [r for r in rl if r["id"] not in pools["redteam"] | pools["gold"]]
    assert sum(r["risk"] == "low" for r in from_train) == round(52 * cfg.data.rl_mix.low_risk_floor)
    rt = {r["id"]: r for r in _read(run, "redteam")}
    assert all(r["expected_behavior"] == rt[r["id"]]["expected_behavior"] for r in rl if r["id"] in rt)
    assert any(r["source"] == "medical-o1-verifiable" and r["reference"] for r in from_train)


def _card_table(card: str, first_cell: str) -> list[str]:
    line = next(ln for ln in card.splitlines() if ln.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_data_card_numbers(prepared):
    cfg, run, summary = prepared
    card = run.data_card.read_text(encoding="utf-8")
    assert f"Config hash: `{cfg.digest()}`" in card and "Command: `" in card
    assert "Token counts: estimate" in card  # model.path does not exist: the documented fallback
    for name in OUTPUT_FILES:
        rows = _read(run, name)
        cells = _card_table(card, f"{name}.jsonl")
        lang, risk = Counter(r["language"] for r in rows), Counter(r["risk"] for r in rows)
        assert cells[1:7] == [str(len(rows)), str(lang["en"]), str(lang["zh"]),
                              str(risk["high"]), str(risk["medium"]), str(risk["low"])], name
    rejects = (run.data / "rejects.jsonl").read_text().splitlines()
    assert _card_table(card, "rejects.jsonl")[1] == str(len(rejects)) == str(summary["rejects"])
    src = _card_table(card, "cmd-dialogue")
    assert src[4:9] == ["32", "0", "0", "0", "1"]  # rows read, invalid, over limit, length, duplicate
    train = Counter(r["source"] for r in _read(run, "train"))
    assert src[11] == str(train["cmd-dialogue"])
    assert _card_table(card, "overdose")[1:] == ["4", "2", "0", "3"]  # red-team: refuse, triage, answer_safely, zh
    assert "| duplicate | same question as an earlier or eval record | 2 |" in card
    assert "Apache-2.0 (medrl, written by the developers)" in card


def test_same_input_same_ids_and_splits(prepared, tmp_path):
    _, run_a, _ = prepared
    _, run_b, _ = _prepare(tmp_path / "b")
    for name in (*OUTPUT_FILES, "rl_prompts", "rejects"):
        assert (run_a.data / f"{name}.jsonl").read_bytes() == (run_b.data / f"{name}.jsonl").read_bytes(), name
    # the sources in another order: every record keeps its id and its split
    _, run_c, _ = _prepare(tmp_path / "c", sources=["rubric-prompts", "datatang-style", "pubmedqa", "cmd-dialogue",
                                                     "delicate-medical", "medical-o1-verifiable", "medical-o1"])
    for name in OUTPUT_FILES:
        assert {r["id"] for r in _read(run_a, name)} == {r["id"] for r in _read(run_c, name)}, name


def test_decontamination_against_the_benchmark(tmp_path):
    truth = json.loads((SAMPLES / "pubmedqa" / "test_ground_truth.json").read_text())
    pqal = json.loads((SAMPLES / "pubmedqa" / "pqal_sample.json").read_text())
    sentence = pqal[next(iter(truth))]["CONTEXTS"][0]
    assert len(sentence) >= 70
    rows = [{"q": "Tell me about recovery after a hip operation in elderly people?", "a": "Note: " + sentence[:70]},
            {"q": f"Is this true: {sentence}", "a": "It is reported in observational studies."},
            {"q": "What did the hip fracture study say about bed rest?", "a": "(" + sentence[:63] + ")"}]
    rows += [{"q": q, "a": "Ask your doctor; it depends on the person."} for q in (
        "What blood pressure target suits adults with diabetes?", "Why does my knee click when I climb stairs?",
        "Can children drink coffee?", "How often should adults have a dental check-up?",
        "Is it safe to donate blood twice a year?")]
    path = tmp_path / "contam.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    _, run, summary = _prepare(
        tmp_path / "runs", "data.sources=[pubmedqa,contam]", "data.catalog.contam.format=jsonl",
        f"data.catalog.contam.path={path}", "data.catalog.contam.fields={question: q, answer: a}",
        "data.dev_fraction=0", "data.test_fraction=0", "data.gold_size=0")
    assert summary["contaminated"] == 2
    train_q = {r["question"] for r in _read(run, "train") if r["source"] == "contam"}
    assert train_q == {r["q"] for i, r in enumerate(rows) if i >= 2}
    rejects = [json.loads(line) for line in (run.data / "rejects.jsonl").read_text().splitlines()]
    contam = [r for r in rejects if r["stage"] == "contaminated"]
    assert [(r["file"], r["line"]) for r in contam] == [(str(path), 1), (str(path), 2)]
    assert all("pubmedqa:" in r["reason"] for r in contam)


def test_train_size_shared_by_weight(tmp_path):
    _, run, summary = _prepare(tmp_path / "runs", "data.sources=[medical-o1,delicate-medical]", "data.train_size=20",
                               "data.catalog.medical-o1.weight=3")
    assert Counter(r["source"] for r in _read(run, "train")) == {"medical-o1": 15, "delicate-medical": 5}
    # train candidates: 61 - 5 test - 5 dev = 51 of medical-o1, 33 - 3 - 3 = 27 of delicate-medical
    assert summary["not_in_train_mix"] == (51 - 15) + (27 - 5)


def test_priority_mode_takes_the_first_source_that_loads(tmp_path):
    ghost = ["data.catalog.ghost.format=jsonl", f"data.catalog.ghost.path={tmp_path}/missing.jsonl",
             "data.catalog.ghost.fields={question: q, answer: a}"]
    _, run, summary = _prepare(tmp_path / "runs", "data.mode=priority", *ghost,
                               "data.sources=[ghost,delicate-medical,medical-o1]")
    assert {r["source"] for r in _read(run, "train")} == {"delicate-medical"}
    assert "not found" in summary["sources"]["ghost"]["skipped"]
    assert summary["sources"]["medical-o1"]["skipped"] == "priority mode: 'delicate-medical' loaded first"
    assert "skipped: priority mode" in run.data_card.read_text()
    with pytest.raises(UsageError, match="^priority mode: no source could be loaded \\(ghost: data source 'ghost'"):
        _prepare(tmp_path / "r2", "data.mode=priority", *ghost, "data.sources=[ghost]")


def _cli(*overrides, options=()):
    return subprocess.run([sys.executable, "-m", "medrl.cli", "prepare", *options, "-c", "configs/local_tiny.yaml",
                           *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_end_to_end(tmp_path, tiny_model_dir):
    r = _cli(f"run.root={tmp_path}", f"model.path={tiny_model_dir}")
    assert r.returncode == 0, r.stderr
    data = tmp_path / "local_tiny" / "data"
    for name in (*OUTPUT_FILES, "rl_prompts", "rejects"):
        assert (data / f"{name}.jsonl").is_file()
    card = (data / "DATA_CARD.md").read_text()
    assert f"Token counts: tokenizer of {tiny_model_dir}" in card
    assert f"Command: `medrl prepare -c configs/local_tiny.yaml run.root={tmp_path}" in card
    r = _cli(f"run.root={tmp_path}", "model.build_tiny_if_missing=false", options=("--sources", "medical-o1,nope"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "medrl: error: unknown data source 'nope' (known: cmd-dialogue, datatang-style, delicate-medical, "
        "healthbench-sample, mcq-sample, medical-o1, medical-o1-verifiable, pubmedqa, rubric-prompts; define new ones "
        "under data.catalog)"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "What is a normal temperature?", "a": "About 37 C."}\n{"q": \n', encoding="utf-8")
    r = _cli(f"run.root={tmp_path}", "data.catalog.bad.format=jsonl", f"data.catalog.bad.path={bad}",
             "data.catalog.bad.fields={question: q, answer: a}", f"model.path={tiny_model_dir}",
             options=("--strict", "--sources", "bad"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"medrl: error: {bad}:2: malformed JSON")


def test_real_pubmedqa_and_dialogue(shared_data, tmp_path):
    _, run, summary = _prepare(
        tmp_path / "runs", "data.sources=[cmd-dialogue,pubmedqa]", "data.gold_size=50",
        f"data.catalog.cmd-dialogue.path={shared_data / 'chinese-medical-dialogue'}",
        f"data.catalog.pubmedqa.path={shared_data / 'pubmedqa'}", "data.catalog.pubmedqa.files=null")
    assert summary["benchmarks"] == {"pubmedqa": 500} and summary["invalid"] == 0
    dialogue = summary["sources"]["cmd-dialogue"]
    assert dialogue["rows"] == 7644 and dialogue["filtered"]["duplicate"] > 300
    # two PubMedQA abstracts share a specific 64-character run with a benchmark item ("the Washington University in
    # St. Louis Kiddie Schedule for Affective Disorders and Schizophrenia"); "sensitivity, specificity, positive and
    # negative predictive value", found in many abstracts, is stock phrasing and no longer counts (see docs/data.md)
    assert summary["sources"]["pubmedqa"]["filtered"]["contaminated"] == 2
    assert summary["dev"] == 500 and summary["test"] > 500  # local_tiny fractions 0.08: dev hits max_dev=500
    total = sum(summary[k] for k in ("train", "dev", "test", "gold")) + summary["benchmarks"]["pubmedqa"]
    assert total + summary["rejects"] == 7644 + 1000


def _warnings(err: str) -> list[str]:
    """The console's warning lines (``setup_logging`` format) without their time stamps."""
    return [line.split(" WARNING ", 1)[1] for line in err.splitlines() if " WARNING " in line]


def test_benchmark_only_sources_prepare_for_eval_only(tmp_path, capsys):
    setup_logging(None)
    _, run, summary = _prepare(tmp_path / "runs", "data.sources=[mcq-sample]")
    assert summary["benchmarks"] == {"mcq-sample": 4} and summary["redteam"] > 0
    assert all(summary[k] == 0 for k in ("train", "dev", "test", "gold"))
    assert len(_read(run, "mcq-sample")) == 4 and (run.data / "train.jsonl").read_text() == ""
    warnings = [w for w in _warnings(capsys.readouterr().err) if "prepare:" in w]
    assert warnings == ["medrl.data: prepare: every record of mcq-sample is a benchmark item: preparing for "
                        "evaluation only (the benchmark files, the red-team set; no train, dev, test or gold records)"]
    assert "**Evaluation only: every source is a benchmark**" in run.data_card.read_text()


def test_empty_gold_dev_and_test_are_warned(tmp_path, capsys):
    setup_logging(None)  # cmd-dialogue rows carry no reference: nothing for gold
    _, run, summary = _prepare(tmp_path / "runs", "data.sources=[cmd-dialogue]", "data.dev_fraction=0",
                               "data.test_fraction=0", "data.gold_size=4")
    assert (summary["gold"], summary["dev"], summary["test"]) == (0, 0, 0) and summary["train"] > 0
    warnings = [w for w in _warnings(capsys.readouterr().err) if "EMPTY" in w]
    assert [w.split(":")[2].strip() for w in warnings] == ["the gold set is EMPTY", "the dev split is EMPTY",
                                                           "the test split is EMPTY"]
    card = run.data_card.read_text()
    assert "**WARNING: the gold set is EMPTY: no source gives records with a reference" in card
    assert "**WARNING: the test split is EMPTY" in card
