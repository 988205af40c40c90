"""Each source loader on the shipped samples and on the real shared files; ModelScope fetch paths."""
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from medrl.data.config import DataConfig, SourceSpec
from medrl.data.readers import decode_csv
from medrl.data.schema import RECORD_FIELDS, format_output
from medrl.data.sources import iter_rows, resolve_spec, source_files
from medrl.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"


def _load(name: str, **spec) -> tuple[list[dict], list]:
    data = DataConfig(catalog={name: SourceSpec(**spec)})
    resolved = resolve_spec(data, name)
    rows = list(iter_rows(name, resolved, source_files(name, resolved, data), data.max_row_bytes))
    return [r.record for r in rows if r.record is not None], [r for r in rows if r.error is not None]


def test_medical_o1_both_languages():
    en, bad = _load("medical-o1", path=str(SAMPLES / "medical-o1"))  # variant en by default
    assert not bad and len(en) == 31
    zh, _ = _load("medical-o1", path=str(SAMPLES / "medical-o1"), variant="zh")
    assert len(zh) == 30 and {r["language"] for r in zh} == {"zh"} and {r["language"] for r in en} == {"en"}
    raw = json.loads((SAMPLES / "medical-o1" / "medical_o1_sft.json").read_text(encoding="utf-8"))[0]
    first = en[0]
    assert list(first) == list(RECORD_FIELDS)
    assert first["question"] == raw["Question"] and first["think"] == raw["Complex_CoT"]
    assert first["output"] == f"<think>\n{raw['Complex_CoT']}\n</think>\n\n{raw['Response']}"
    assert first["reference"] is None and first["risk"] == "high"  # crushing chest pain: emergency rule
    assert first["source"] == "medical-o1" and len(first["id"]) == 16


def test_verifiable_is_rl_role_with_references():
    recs, bad = _load("medical-o1-verifiable", path=str(SAMPLES / "medical-o1-verifiable"))
    assert not bad and len(recs) == 36
    assert all(r["reference"] and r["answer"] == r["reference"] and r["think"] == "" for r in recs)
    assert resolve_spec(DataConfig(), "medical-o1-verifiable").role == "rl"
    assert Counter(r["language"] for r in recs) == {"en": 28, "zh": 8}


def test_delicate_medical_keeps_instruction_and_metrics():
    recs, bad = _load("delicate-medical", path=str(SAMPLES / "delicate-medical"))
    assert not bad and len(recs) == 33
    assert all(r["think"] and r["meta"]["instruction"] and "quality_f1" in r["meta"]["metrics"] for r in recs)
    assert recs[0]["output"] == format_output(recs[0]["think"], recs[0]["answer"])


def test_cmd_dialogue_sample_is_gbk():
    path = SAMPLES / "cmd-dialogue" / "internal_medicine_sample.csv"
    with pytest.raises(UnicodeDecodeError):
        path.read_bytes().decode("utf-8")
    recs, bad = _load("cmd-dialogue", path=str(path.parent))
    assert not bad and len(recs) == 32
    assert recs[0]["specialty"] == "心血管科" and "党参" in recs[0]["question"] and recs[0]["meta"]["title"]


def test_pubmedqa_sample_benchmark_split():
    data = DataConfig(catalog={"pubmedqa": SourceSpec(path=str(SAMPLES / "pubmedqa"),
                                                      files=["pqal_sample.json", "test_ground_truth.json"])})
    spec = resolve_spec(data, "pubmedqa")
    rows = list(iter_rows("pubmedqa", spec, source_files("pubmedqa", spec, data), data.max_row_bytes))
    truth = json.loads((SAMPLES / "pubmedqa" / "test_ground_truth.json").read_text())
    bench = [r.record for r in rows if r.benchmark]
    assert len(rows) == 40 and len(bench) == len(truth) == 16
    assert {r["meta"]["pmid"] for r in bench} == set(truth)
    assert all(truth[r["meta"]["pmid"]] == r["label"] for r in bench)


def test_generic_jsonl_field_mapping_with_mcq():
    fields = {"question": "question", "answer": "answer", "specialty": "dept", "options": "options",
              "label": "answer_idx", "id": "qid"}
    recs, bad = _load("dt", format="jsonl", path=str(SAMPLES / "generic" / "datatang_style_qa.jsonl"), fields=fields)
    assert not bad and len(recs) == 30
    mcq = [r for r in recs if r["options"]]
    assert len(mcq) == 4 and all(r["label"] in r["options"] for r in mcq)
    assert all(text in mcq[0]["question"] for text in mcq[0]["options"].values())  # options shown to the model
    assert recs[0]["meta"]["raw_id"].startswith("DT") and recs[0]["specialty"] == "儿科"


def test_generic_csv_and_json_with_dotted_fields(tmp_path):
    (tmp_path / "qa.json").write_text(json.dumps(
        [{"q": {"text": "What is the normal adult resting heart rate range?"}, "a": "60 to 100 beats per minute."},
         {"q": {"text": "正常成人的静息心率范围是多少？"}, "a": "每分钟60到100次。"}], ensure_ascii=False), encoding="utf-8")
    recs, bad = _load("mine", format="json", path=str(tmp_path / "qa.json"), fields={"question": "q.text", "reference": "a"})
    assert not bad and [r["language"] for r in recs] == ["en", "zh"] and recs[1]["reference"] == "每分钟60到100次。"
    (tmp_path / "qa.csv").write_bytes("\ufeffQ,A\nIs fever above 38 C in a 2-week-old baby an emergency?,Yes.\n".encode())
    recs, bad = _load("mine", format="csv", path=str(tmp_path / "qa.csv"), fields={"question": "Q", "answer": "A"})
    assert not bad and len(recs) == 1 and recs[0]["risk"] == "medium"  # children rule (no drug word)


def test_real_pubmedqa(shared_data):
    data = DataConfig(catalog={"pubmedqa": SourceSpec(path=str(shared_data / "pubmedqa" / "ori_pqal.json"))})
    spec = resolve_spec(data, "pubmedqa")
    files = source_files("pubmedqa", spec, data)
    assert [f.name for f in files] == ["ori_pqal.json", "test_ground_truth.json"]
    rows = list(iter_rows("pubmedqa", spec, files, data.max_row_bytes))
    assert len(rows) == 1000 and not [r for r in rows if r.error]
    bench = [r.record for r in rows if r.benchmark]
    truth = json.loads((shared_data / "pubmedqa" / "test_ground_truth.json").read_text())
    assert len(bench) == 500 and {r["meta"]["pmid"] for r in bench} == set(truth)
    assert Counter(r["label"] for r in bench) == Counter(truth.values())
    rec = bench[0]
    assert "\n\nContext:\n" in rec["question"] and rec["question"].endswith("Answer yes, no or maybe.")
    assert rec["answer"].lower().startswith(rec["label"]) and rec["reference"] in rec["answer"]


def test_real_dialogue_csv_encoding(shared_data):
    path = shared_data / "chinese-medical-dialogue" / "internal_medicine_sample_5000-6000.csv"
    text, encoding = decode_csv(path.read_bytes(), "auto")
    assert encoding == "gb18030" and text.startswith("department,title,ask,answer")
    recs, bad = _load("cmd-dialogue", path=str(path.parent))
    assert not bad and len(recs) == 7644
    assert Counter(r["specialty"] for r in recs).most_common(1) == [("肝病科", 3121)]
    # rows whose "ask" is only "无" (none) take their question from the title
    assert not [r for r in recs if r["question"] == "无"]
    assert any(r["question"] == r["meta"]["title"] for r in recs)


def test_unknown_source_and_missing_path(tmp_path):
    with pytest.raises(UsageError, match="unknown data source 'nope' \\(known: cmd-dialogue, delicate-medical"):
        resolve_spec(DataConfig(), "nope")
    with pytest.raises(UsageError, match="must map question or messages \\(one of them\\) and answer, reference, "
                                         "rubrics or options \\+ label"):
        resolve_spec(DataConfig(catalog={"x": SourceSpec(format="jsonl", fields={"question": "q"})}), "x")
    data = DataConfig(catalog={"delicate-medical": SourceSpec(path=str(tmp_path / "none"))})
    with pytest.raises(UsageError, match="not found \\(set data.catalog.delicate-medical.path"):
        source_files("delicate-medical", resolve_spec(data, "delicate-medical"), data)
    with pytest.raises(UsageError, match="cmd-dialogue' has neither a path nor a ModelScope id"):
        source_files("cmd-dialogue", resolve_spec(DataConfig(), "cmd-dialogue"), DataConfig())


def test_modelscope_unreachable_fails_fast(tmp_path, monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("MODELSCOPE_DOMAIN", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    data = DataConfig(cache_dir=str(tmp_path))
    t0 = time.time()
    with pytest.raises(UsageError) as e:
        source_files("medical-o1", resolve_spec(data, "medical-o1"), data)
    assert time.time() - t0 < 5
    msg = str(e.value)
    assert "cannot reach ModelScope" in msg and "FreedomIntelligence/medical-o1-reasoning-SFT" in msg
    assert "set data.catalog.medical-o1.path" in msg and "\n" not in msg


def test_modelscope_cache_is_used_offline(tmp_path, monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("MODELSCOPE_DOMAIN", f"http://127.0.0.1:{free_port()}")
    target = tmp_path / "datasets" / "FreedomIntelligence" / "medical-o1-reasoning-SFT"
    target.mkdir(parents=True)
    shutil.copy(SAMPLES / "medical-o1" / "medical_o1_sft_Chinese.json", target)
    data = DataConfig(cache_dir=str(tmp_path), catalog={"medical-o1": SourceSpec(variant="zh")})
    spec = resolve_spec(data, "medical-o1")
    assert spec.modelscope == "FreedomIntelligence/medical-o1-reasoning-SFT" and spec.license == "Apache-2.0"
    files = source_files("medical-o1", spec, data)
    assert files == [target / "medical_o1_sft_Chinese.json"]
    assert len(list(iter_rows("medical-o1", spec, files, data.max_row_bytes))) == 30
