"""Benchmark sources: the real MedQA-USMLE and CMExam files load with their labels, every layout sample maps, and
``prepare`` keeps benchmark items out of train/dev/test/gold/RL prompts while decontaminating train against them."""
import json
import os
import re
from pathlib import Path

import pytest

from medrl.config import load_config
from medrl.data.clean import normalize_text
from medrl.data.config import DataConfig, SourceSpec
from medrl.prepare.stage import run_prepare
from medrl.data.sources import iter_rows, resolve_spec, source_files
from medrl.errors import UsageError
from medrl.runs import RunDir

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples" / "benchmarks"


def _rows(name: str, **spec):
    data = DataConfig(catalog={name: SourceSpec(**spec)})
    resolved = resolve_spec(data, name)
    return resolved, list(iter_rows(name, resolved, source_files(name, resolved, data), data.max_row_bytes))


def test_real_medqa_every_row_loads_with_its_label(shared_data):
    path = shared_data / "benchmarks" / "medqa-usmle" / "medqa_usmle_test.json"
    spec, rows = _rows("medqa", format="huatuo-eval", path=str(path))
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert spec.role == "benchmark" and len(rows) == len(raw) == 1273
    assert all(r.error is None and r.benchmark for r in rows)
    for r, src in zip(rows, raw):
        rec = r.record
        assert rec["label"] == src["answer_idx"]
        assert rec["options"] == {k: normalize_text(v) for k, v in src["options"].items()}
        assert rec["reference"] == normalize_text(src["answer"]) == rec["options"][rec["label"]]
        assert rec["question"].startswith(normalize_text(src["question"])) and "\n\nA. " in rec["question"]


def test_real_cmexam_every_row_loads_with_its_labels(shared_data):
    path = shared_data / "benchmarks" / "cmexam" / "cmexam.jsonl"
    spec, rows = _rows("cmexam", format="medllm-qa", path=str(path))
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(raw) == 6811
    bad = [r for r in rows if r.error]
    # the file's one defect: problem 5331 has 4 choices and the answer [b, c, e]; it is rejected, naming its line
    assert [(r.line, r.error) for r in bad] == [
        (5332, "label 'e' is not one of the options A, B, C, D (nor an option's text)")]
    good = [(r.record, src) for r, src in zip(rows, raw) if r.error is None]
    assert len(good) == 6810 and all(r.benchmark for r in rows if r.error is None)
    for rec, src in good:
        assert rec["label"] == "".join(sorted(a.upper() for a in src["answer"]))
        assert list(rec["options"].values()) == [normalize_text(c) for c in src["choices"]]
        assert rec["meta"]["raw_id"] == str(src["problem_id"])
    assert sum(len(rec["label"]) > 1 for rec, _ in good) == 203  # multiple-answer items keep every letter


def test_layout_samples_map_onto_records():
    _, rows = _rows("hu", format="huatuo-eval", path=str(SAMPLES / "huatuo_eval_sample.json"))
    assert [r.record["label"] for r in rows] == ["C", "B", "B", "I"]  # row 3: label from the answer text
    assert len(rows[3].record["options"]) == 10 and rows[3].record["reference"] == "Vitamin D"
    _, rows = _rows("cm", format="medllm-qa", path=str(SAMPLES / "medllm_qa_sample.jsonl"))
    assert [r.record["label"] if r.record else r.error[:9] for r in rows] == ["A", "B", "ACE", "label 'e'"]
    assert rows[2].record["reference"] == "维生素A; 维生素D; 维生素K" and rows[2].record["language"] == "zh"
    spec, rows = _rows("mr", format="medreason", path=str(SAMPLES / "medreason_sample.jsonl"), role="rl")
    assert spec.role == "rl" and [r.record["label"] for r in rows] == ["B", "C"]
    assert rows[0].record["think"].startswith("Peaked T waves") and rows[1].record["meta"]["raw_id"] == "mr-2"
    fields = {"question": "Question", "options": ["A", "B", "C", "D"], "label": "Answer"}
    spec, rows = _rows("cmmlu", format="csv", path=str(SAMPLES / "cmmlu_style_sample.csv"), fields=fields,
                       role="benchmark")
    assert [r.record["label"] for r in rows] == ["B", "B", "C"] and all(r.benchmark for r in rows)
    assert rows[2].record["options"]["C"] == "100～120次" and rows[2].record["answer"] == "C. 100～120次"
    fields = {"question": "q", "options": "opts", "label": "ans.0"}
    _, rows = _rows("idx", format="jsonl", path=str(SAMPLES / "indexed_labels_sample.jsonl"), fields=fields,
                    label_index_base=1)
    assert [r.record["label"] for r in rows] == ["B", "B", "C"] and not any(r.benchmark for r in rows)
    _, rows = _rows("idx", format="jsonl", path=str(SAMPLES / "indexed_labels_sample.jsonl"), fields=fields)
    assert [r.record["label"] for r in rows] == ["C", "C", "C"]  # 0-based: 2 = C


def test_bad_mappings_fail_with_one_line():
    with pytest.raises(UsageError, match="fields.label must be one key"):
        resolve_spec(DataConfig(catalog={"x": SourceSpec(format="jsonl", path="x", fields={
            "question": "q", "options": "o", "label": ["a", "b"]})}), "x")
    with pytest.raises(UsageError, match="data/test.jsonl, which is a reserved file name"):
        resolve_spec(DataConfig(catalog={"test": SourceSpec(format="huatuo-eval", path="x")}), "test")


def test_prepare_keeps_benchmarks_out_and_decontaminates_train(shared_data, tmp_path):
    bench = shared_data / "benchmarks"
    medqa = json.loads((bench / "medqa-usmle" / "medqa_usmle_test.json").read_text(encoding="utf-8"))
    # a user's MedQA-style "train split" (role rl, for the verifier): 2 questions copied from the test set with a
    # changed age (leaks), 2 of its own that share only stock exam phrasing with it
    older = lambda q: re.sub(r"\d+", lambda m: str(int(m.group()) + 1), q, count=1)
    leaks = [dict(r, question=older(r["question"])) for r in medqa[10:12]]
    assert all(a["question"] != b["question"] for a, b in zip(leaks, medqa[10:12]))
    own = [{"question": "A 30-year-old man has a painless penile ulcer with clean base. Which of the following is the "
                        "most appropriate pharmacotherapy?", "options": {"A": "Benzathine penicillin G",
            "B": "Acyclovir", "C": "Ceftriaxone", "D": "Metronidazole"}, "answer_idx": "A"},
           {"question": "A 6-year-old boy has a barking cough and inspiratory stridor. Which of the following is the "
                        "most likely diagnosis?", "options": {"A": "Epiglottitis", "B": "Croup", "C": "Asthma",
            "D": "Bronchiolitis"}, "answer_idx": "B"}]
    (tmp_path / "medqa_train.json").write_text(json.dumps(leaks + own), encoding="utf-8")
    cfg = load_config(REPO / "configs" / "local_tiny.yaml", [
        f"run.root={tmp_path}/runs", f"model.path={tmp_path}/no-model", "model.build_tiny_if_missing=false",
        "data.sources=[medical-o1,medical-o1-verifiable,medqa-train,medqa,cmexam]", "data.rl_mix.redteam=0",
        "data.rl_mix.gold=1", "data.rl_mix.train=1",  # every gold and train record can become an RL prompt
        f"data.catalog.medqa.path={bench / 'medqa-usmle' / 'medqa_usmle_test.json'}", "data.catalog.medqa.format=huatuo-eval",
        f"data.catalog.cmexam.path={bench / 'cmexam' / 'cmexam.jsonl'}", "data.catalog.cmexam.format=medllm-qa",
        f"data.catalog.medqa-train.path={tmp_path / 'medqa_train.json'}", "data.catalog.medqa-train.format=huatuo-eval",
        "data.catalog.medqa-train.role=rl", "data.near_dup_threshold=null"])
    run = RunDir.from_config(cfg)
    old = os.getcwd()
    os.chdir(REPO)
    try:
        summary = run_prepare(cfg, run)
    finally:
        os.chdir(old)
    read = lambda name: [json.loads(x) for x in (run.data / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
    assert summary["benchmarks"] == {"medqa": 1273, "cmexam": 6810}
    assert len(read("medqa")) == 1273 and len(read("cmexam")) == 6810
    bench_ids = {r["id"] for name in ("medqa", "cmexam") for r in read(name)}
    for name in ("train", "dev", "test", "gold"):
        assert not bench_ids & {r["id"] for r in read(name)} and not {"medqa", "cmexam"} & {
            r["source"] for r in read(name)}, name
    rl = read("rl_prompts")
    assert not bench_ids & {r["id"] for r in rl}
    # both leaks are caught as contaminated; the two own questions (stock phrasing only) survive as RL prompts
    train_src = summary["sources"]["medqa-train"]
    assert train_src["filtered"] == {"contaminated": 2}
    mcq = [r for r in rl if r["source"] == "medqa-train"]
    assert len(mcq) == 2 and {r["label"] for r in mcq} == {"A", "B"} and all(r["options"] for r in mcq)
    assert all(r["prompt"].endswith('end your answer with "The answer is X", where X is the letter of the correct '
                                    'option.') for r in mcq)
    card = run.data_card.read_text(encoding="utf-8")
    assert "Benchmarks (medqa 1273, cmexam 6810)" in card and "| medqa.jsonl | 1273 |" in card
