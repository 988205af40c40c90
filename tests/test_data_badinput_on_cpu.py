"""Bad input never crashes a row: each rejected row lands in rejects.jsonl with file, line and reason."""
import json
from pathlib import Path

import pytest

from medrl.config import load_config
from medrl.data.config import DataConfig, SourceSpec
from medrl.prepare.stage import run_prepare
from medrl.data.readers import read_csv, read_json
from medrl.data.sources import iter_rows, resolve_spec, source_files
from medrl.errors import UsageError
from medrl.runs import RunDir

REPO = Path(__file__).resolve().parents[1]
GOOD = [
    {"question": "What are the warning signs of a stroke?", "answer": "Face drooping, arm weakness, speech difficulty."},
    {"question": "高血压患者每天应该吃多少盐？", "answer": "每天不超过5克。"},
    {"question": "How is iron deficiency anaemia treated?", "answer": "Oral iron and treating the cause of blood loss."},
]
FIELDS = {"question": "question", "answer": "answer"}


def _jsonl_lines() -> list[tuple[bytes, str | None]]:
    """(raw line, expected reject reason prefix or None for a good row)."""
    good = [json.dumps(g, ensure_ascii=False).encode() for g in GOOD]
    return [
        (good[0], None),
        (b'{"question": "Is chest pain after exercise serious?", "answer": ', "malformed JSON"),
        (b"[1, 2, 3]", "row is a list, expected an object"),
        (b'{"question": ["a", "list"], "answer": "x"}', "field 'question' must be text, got list"),
        (b'{"question": null, "answer": "x"}', "missing field 'question'"),
        (b'{"answer": "an answer without a question"}', "missing field 'question'"),
        (b'{"question": "   ", "answer": "x"}', "empty field 'question'"),
        (b'{"question": "What dose of aspirin?", "answer": ""}', "empty field 'answer'"),
        (b'{"question": "caf\xe9 \xff\xfe", "answer": "y"}', "undecodable bytes (not UTF-8)"),
        (b"\xef\xbb\xbf" + good[1], None),  # a BOM is stripped, the row is fine
        (b'{"question": "' + b"x" * 10_000_000 + b'", "answer": "huge"}', "row of 10000035 bytes exceeds"),
        (b'{"question": true, "answer": "x"}', "field 'question' must be text, got bool"),
        (good[2], None),
    ]


def _write_jsonl(path: Path) -> list[tuple[int, str | None]]:
    lines = _jsonl_lines()
    with open(path, "wb") as f:
        for raw, _ in lines:
            f.write(raw + b"\n\n")  # blank lines between rows are skipped, not rejected
    return [(2 * i + 1, why) for i, (_, why) in enumerate(lines)]


def _rows(path: Path, fmt: str = "jsonl"):
    data = DataConfig(catalog={"fuzz": SourceSpec(format=fmt, path=str(path), fields=FIELDS)})
    spec = resolve_spec(data, "fuzz")
    return list(iter_rows("fuzz", spec, source_files("fuzz", spec, data), data.max_row_bytes))


def test_jsonl_rejects_with_line_and_reason(tmp_path):
    path = tmp_path / "fuzz.jsonl"
    expected = _write_jsonl(path)
    rows = _rows(path)
    assert [(r.line, r.error is None) for r in rows] == [(line, why is None) for line, why in expected]
    for row, (_, why) in zip(rows, expected):
        if why is not None:
            assert row.error.startswith(why) and row.file == str(path)
    assert [r.record["question"] for r in rows if r.record] == [g["question"] for g in GOOD]


def test_json_array_wrong_types_and_truncation(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"question": "Q1 about asthma inhalers?", "answer": "A1"},\n  {"question": 3.5, "answer": '
                    '{"x": 1}},\n  "just a string",\n  {"question": "Q4 about gout diet?", "answer": "A4"},\n'
                    '  {"question": "Q5", "answer": oops}\n]\n', encoding="utf-8")
    rows = list(read_json(path, 10_000))
    assert [(line, err and err.split(":")[0]) for line, _, err in rows] == [
        (2, None), (3, None), (4, None), (5, None), (6, "malformed JSON")]
    parsed = _rows(path, "json")
    assert [r.error for r in parsed[:4]] == [None, "field 'answer' must be text, got dict",
                                              "row is a str, expected an object", None]
    assert parsed[4].line == 6 and "the rest of the file is skipped" in parsed[4].error


@pytest.mark.parametrize("body,reason", [(b"", "empty file"), (b"  \n", "empty file"), (b"[]", "empty file"),
                                         (b"\xef\xbb\xbf[]", "empty file")])
def test_empty_json_files(tmp_path, body, reason):
    path = tmp_path / "e.json"
    path.write_bytes(body)
    rows = _rows(path, "json")
    assert len(rows) == 1 and rows[0].error.startswith(reason) and rows[0].record is None


def test_csv_bad_rows_encodings_and_header(tmp_path):
    path = tmp_path / "d.csv"
    body = ("department,title,ask,answer\n"
            "心血管科,高血压,高血压能喝咖啡吗？,适量饮用一般可以。\n"
            "消化科,胃痛,\"多行\n的问题：胃痛怎么办？\",先明确病因。\n"
            "神经科,头痛,只有三列\n"
            "呼吸科,咳嗽,咳嗽两周怎么办？,\n").encode("utf-8")
    path.write_bytes(b"\xef\xbb\xbf" + body + "内分泌科,糖尿病,血糖高吗".encode() + b"\xff\xfe" + ",控制饮食。\n".encode())
    data = DataConfig(catalog={"cmd-dialogue": SourceSpec(path=str(tmp_path))})
    spec = resolve_spec(data, "cmd-dialogue")
    rows = list(iter_rows("cmd-dialogue", spec, source_files("cmd-dialogue", spec, data), data.max_row_bytes))
    assert [(r.line, r.error) for r in rows] == [
        (2, None), (3, None), (5, "row has 3 columns, the header has 4"), (6, "empty field 'answer'"),
        (7, "field 'ask' has undecodable bytes")]
    assert rows[1].record["question"] == "多行\n的问题：胃痛怎么办？"
    (tmp_path / "d.csv").write_text("department,title,question,answer\n内科,x,y,z\n", encoding="utf-8")
    with pytest.raises(UsageError, match="no column\\(s\\) ask \\(columns: department, title, question, answer\\)"):
        list(iter_rows("cmd-dialogue", spec, source_files("cmd-dialogue", spec, data), data.max_row_bytes))
    (tmp_path / "d.csv").write_bytes(b"")
    assert [r[2] for r in read_csv(tmp_path / "d.csv", 1000)] == ["empty file (no rows)"]


def test_unreadable_path_is_one_line_usage_error(tmp_path):
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(UsageError, match="^cannot read .*dir.json: it is a directory$"):
        list(read_json(tmp_path / "dir.json", 1000))


def _cfg(tmp_path, fuzz_file: Path, *extra: str):
    return load_config(REPO / "configs" / "local_tiny.yaml", [
        f"run.root={tmp_path / 'runs'}", f"model.path={tmp_path}/no-model", "model.build_tiny_if_missing=false",
        "data.sources=[medical-o1,fuzz]",
        "data.catalog.fuzz.format=jsonl", f"data.catalog.fuzz.path={fuzz_file}",
        "data.catalog.fuzz.fields={question: question, answer: answer}", *extra])


def test_prepare_keeps_good_rows_and_lists_rejects(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    fuzz = tmp_path / "fuzz.jsonl"
    expected = _write_jsonl(fuzz)
    cfg = _cfg(tmp_path, fuzz)
    run = RunDir.from_config(cfg)
    summary = run_prepare(cfg, run)
    rejects = [json.loads(line) for line in (run.data / "rejects.jsonl").read_text().splitlines()]
    parse = [r for r in rejects if r["stage"] == "parse"]
    assert [(r["file"], r["line"]) for r in parse] == [(str(fuzz), line) for line, why in expected if why]
    assert summary["invalid"] == len(parse) == 10
    kept = set()
    for name in ("train", "dev", "test", "gold"):
        kept |= {json.loads(line)["question"] for line in (run.data / f"{name}.jsonl").read_text().splitlines()}
    assert {g["question"] for g in GOOD} <= kept


def test_strict_turns_a_reject_into_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    fuzz = tmp_path / "fuzz.jsonl"
    _write_jsonl(fuzz)
    cfg = _cfg(tmp_path, fuzz)
    with pytest.raises(UsageError) as e:
        run_prepare(cfg, RunDir.from_config(cfg), strict=True)
    assert str(e.value).startswith(f"{fuzz}:3: malformed JSON") and "--strict" in str(e.value)
    assert not RunDir.from_config(cfg).data_card.exists()


def test_deeply_nested_json_is_a_reject_not_a_crash(tmp_path):
    """A 100k-deep array as a whole file, as a row, as a JSONL line or in a JSONL field: one reject each, the good
    rows around it kept (json raises RecursionError on it)."""
    deep = "[" * 100_000 + "]" * 100_000
    good = [json.dumps(g, ensure_ascii=False) for g in GOOD]
    files = {"file.json": (deep, 0), "row.json": (f"[{good[0]}, {deep}, {good[1]}]", 2),
             "line.jsonl": f"{good[0]}\n{deep}\n{good[1]}\n", "field.jsonl": f'{good[0]}\n{{"question": {deep}}}\n'}
    for name, content in files.items():
        text, kept = content if isinstance(content, tuple) else (content, 1 + ("line" in name))
        (tmp_path / name).write_text(text, encoding="utf-8")
        rows = _rows(tmp_path / name, name.rsplit(".", 1)[1])
        assert sum(r.record is not None for r in rows) == kept, name
        assert [r.error for r in rows if r.record is None] == [
            "JSON nested too deeply to read (arrays/objects over ~1,000 levels deep)"], name


def test_unclosed_csv_quote_rejects_one_line_and_keeps_the_rest(tmp_path):
    lines = ["question,answer,department,title", '"What is fever?,A raised temperature.,general,fever']
    lines += [f"What helps symptom {i}?,Rest and fluids.,general,t{i}" for i in range(26)]
    (tmp_path / "q.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = _rows(tmp_path / "q.csv", "csv")
    assert sum(r.record is not None for r in rows) == 26
    rejects = [(r.line, r.error) for r in rows if r.record is None]
    assert rejects == [(2, "unclosed quote: a quoted field opened on line 2 runs to line 28 (1 columns, the header "
                           "has 4); lines 3-28 are read again as rows")]
    assert [r.line for r in rows if r.record is not None] == list(range(3, 29))


def test_an_unclosed_quote_after_unicode_line_separators_restarts_at_the_right_line(tmp_path):
    """U+2028 / form feed in an earlier field are no line breaks to the csv module: the rows after an unclosed
    quote are read again from the line after it, with their own line numbers."""
    path = tmp_path / "seps.csv"
    path.write_text('question,answer,x\nq0,a\u2028b\x0cc,0\nq1,"unclosed,1\nq2,two,2\nq3,fine,3\n', encoding="utf-8")
    rows = list(read_csv(path, 10**6))
    assert [(line, row and row["question"], bool(err)) for line, row, err in rows] == [
        (2, "q0", False), (3, None, True), (4, "q2", False), (5, "q3", False)]


def test_non_finite_json_numbers_are_rejects_with_their_line(tmp_path):
    good = json.dumps(GOOD[0])
    lines = [good, '{"question": "Dose?", "answer": NaN}', '{"question": "Dose?", "answer": Infinity}',
             '{"question": "Dose?", "answer": -Infinity}', '{"question": "Dose?", "answer": 1e999}',
             '{"question": "Dose?", "answer": 2.5e3}']
    path = tmp_path / "nf.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = _rows(path)
    assert [(r.line, r.error) for r in rows] == [
        (1, None), (2, "non-finite number NaN (not valid JSON)"), (3, "non-finite number Infinity (not valid JSON)"),
        (4, "non-finite number -Infinity (not valid JSON)"), (5, "number 1e999 is too large for a float"),
        (6, None)]
    assert rows[5].record["answer"] == "2500.0"
    array = tmp_path / "nf.json"  # in an array: the row is rejected, the rows after it are kept
    array.write_text("[\n" + ",\n".join(lines) + "\n]\n", encoding="utf-8")
    assert [(r.line, r.error is None) for r in _rows(array, "json")] == [
        (2, True), (3, False), (4, False), (5, False), (6, False), (7, True)]


def test_csv_duplicate_column_and_nul_rows_are_rejects(tmp_path):
    dup = tmp_path / "dup.csv"
    dup.write_text("question,answer,answer\nFever?,Rest.,Paracetamol.\n", encoding="utf-8")
    assert list(read_csv(dup, 10_000)) == [
        (1, None, "duplicate column 'answer' in the header (columns 2 and 3): the file is skipped")]
    nul = tmp_path / "nul.csv"
    nul.write_bytes(b"question,answer\nFever?,Rest.\n\x00\x00\x00,\x00\x00\nCough?,Fl\x00uids.\n\n")
    assert list(read_csv(nul, 10_000)) == [(2, {"question": "Fever?", "answer": "Rest."}, None),
                                          (3, None, "row holds only NUL bytes"),
                                          (4, {"question": "Cough?", "answer": "Fluids."}, None)]
