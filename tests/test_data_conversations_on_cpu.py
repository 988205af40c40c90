"""Conversation prompts and rubrics as data: the HealthBench layout, validation with file:line rejects, canaries never
trained on, prepare writing the fields through, and the one chat rendering used by SFT, RL prompts and eval."""
import hashlib
import json
from pathlib import Path

import pytest

from medrl.config import load_config
from medrl.data.config import DataConfig, SourceSpec
from medrl.data.schema import RECORD_FIELDS, RL_PROMPT_FIELDS, build_record, record_id
from medrl.data.sources import iter_rows, resolve_spec, source_files
from medrl.errors import UsageError
from medrl.models.chat import conversation, messages_for, render_prompt
from medrl.ppo.batch import prompt_turns, reward_input
from local_prepare import prepare_local_tiny

REPO = Path(__file__).resolve().parents[1]
HB = REPO / "data" / "samples" / "healthbench" / "healthbench_sample.jsonl"
CANARY = "MEDRL-TEST-CANARY-7d1e9a"
SYSTEM = "You are a careful medical assistant."


def _rows(name: str, **spec):
    data = DataConfig(catalog={name: SourceSpec(**spec)})
    resolved = resolve_spec(data, name)
    return list(iter_rows(name, resolved, source_files(name, resolved, data), data.max_row_bytes))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------------ layout and validation
def test_healthbench_layout_loads_whole_with_zero_rejects():
    rows = _rows("hb", format="healthbench", path=str(HB))
    raw = _read(HB)
    assert len(rows) == len(raw) == 12 and not [r.error for r in rows if r.error]
    assert all(r.benchmark for r in rows) and resolve_spec(DataConfig(catalog={"hb": SourceSpec(
        format="healthbench", path=str(HB))}), "hb").role == "benchmark"  # an eval layout
    for row, src in zip(rows, raw):
        rec = row.record
        assert tuple(rec) == RECORD_FIELDS
        assert rec["messages"] == src["prompt"]  # every turn, role and text
        assert rec["question"] == src["prompt"][-1]["content"]
        assert [(c["criterion"], c["points"], c["tags"]) for c in rec["rubrics"]] == [
            (c["criterion"], float(c["points"]), c["tags"]) for c in src["rubrics"]]
        assert rec["example_tags"] == src["example_tags"]
        assert rec["meta"]["raw_id"] == src["prompt_id"] and rec["meta"]["canary"] == src["canary"]
        ideal = src["ideal_completions_data"]
        assert rec["reference"] == (ideal["ideal_completion"] if ideal else None)
        if ideal:
            assert rec["meta"]["ideal_completions_data"]["ideal_completions_group"] == ideal["ideal_completions_group"]
    recs = [r.record for r in rows]
    assert sum(len(r["messages"]) > 1 for r in recs) == 4 and {r["language"] for r in recs} == {"en", "zh"}
    assert sum(c["points"] < 0 for r in recs for c in r["rubrics"]) == 12
    assert recs[1]["messages"][1] == {"role": "assistant", "content":
                                      "Sorry to hear that. Do you have a fever, trouble swallowing, or swollen glands?"}


BAD_ROWS = [
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
     "field 'prompt' must end with a user turn (the last turn is assistant)"),
    ({"prompt": [{"role": "doctor", "content": "hi"}]}, "field 'prompt.0.role' must be one of system, user, assistant"),
    ({"prompt": [{"role": "user"}]}, "missing field 'prompt.0.content'"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                 {"role": "user", "content": "c"}]},
     "field 'prompt.1.role': a system turn may only open the conversation"),
    ({"prompt": []}, "field 'prompt' must be a non-empty list"),
    ({"prompt": None}, "missing field 'prompt'"),
    ({"prompt": "just text"}, "field 'prompt' must be a non-empty list"),
    ({"rubrics": [{"criterion": "x", "points": 12, "tags": []}]},
     "field 'rubrics.0.points' must be a number in [-10, 10], got 12"),
    ({"rubrics": [{"criterion": "x", "points": "5", "tags": []}]},
     "field 'rubrics.0.points' must be a number in [-10, 10], got '5'"),
    ({"rubrics": [{"criterion": "x", "points": True}]}, "field 'rubrics.0.points' must be a number"),
    ({"rubrics": [{"criterion": "x", "points": -3, "tags": []}]},
     "field 'rubrics' has no criterion with positive points"),
    ({"rubrics": [{"criterion": " ", "points": 3}]}, "empty field 'rubrics.0.criterion'"),
    ({"rubrics": [{"criterion": "x", "points": 3, "tags": "axis:accuracy"}]}, "field 'rubrics.0.tags' must be a list"),
    ({"rubrics": []}, "field 'rubrics' must be a non-empty list"),
    ({"example_tags": "theme:hedging"}, "field 'example_tags' must be a list of strings"),
]


def test_bad_messages_and_rubrics_are_rejects_with_file_line_and_key(tmp_path):
    good = {"prompt": [{"role": "user", "content": "Is 37.5 C a fever?"}], "prompt_id": "p",
            "rubrics": [{"criterion": "Says it is a low-grade temperature.", "points": 5, "tags": ["axis:accuracy"]}],
            "example_tags": ["theme:communication"], "ideal_completions_data": None, "canary": "c"}
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({**good, **bad}) + "\n" for bad, _ in BAD_ROWS) + json.dumps(good) + "\n",
                    encoding="utf-8")
    rows = _rows("hb", format="healthbench", path=str(path))
    assert [(r.file, r.line) for r in rows] == [(str(path), i + 1) for i in range(len(BAD_ROWS) + 1)]
    for row, (_, why) in zip(rows, BAD_ROWS):
        assert row.record is None and row.error.startswith(why), (row.error, why)
    assert rows[-1].error is None and rows[-1].record["rubrics"][0]["points"] == 5.0
    # --strict: the first bad row stops prepare with file:line: reason
    with pytest.raises(UsageError) as e:
        prepare_local_tiny(tmp_path / "runs", "data.sources=[medical-o1,hb]", "data.catalog.hb.format=healthbench",
                           f"data.catalog.hb.path={path}", strict=True)
    assert str(e.value).startswith(f"{path}:1: {BAD_ROWS[0][1]}")


def test_generic_jsonl_maps_messages_and_rubrics(tmp_path):
    path = tmp_path / "conv.jsonl"
    turns = [{"role": "system", "content": "Answer as a GP."}, {"role": "user", "content": "I have a rash."},
             {"role": "assistant", "content": "Where is it, and is it itchy?"},
             {"role": "user", "content": "On my arms, very itchy, since I started a new soap."}]
    crit = [{"criterion": "Suggests stopping the new soap.", "points": 6, "tags": ["axis:accuracy"]},
            {"criterion": "Recommends oral steroids.", "points": -5, "tags": []}]
    path.write_text(json.dumps({"chat": {"turns": turns}, "reply": "Stop the soap; try an emollient.", "crit": crit,
                                "tags": ["theme:x"]}) + "\n" + json.dumps({"chat": {"turns": turns[:2]}, "crit": crit})
                    + "\n", encoding="utf-8")
    fields = {"messages": "chat.turns", "answer": "reply", "rubrics": "crit", "example_tags": "tags"}
    rows = _rows("conv", format="jsonl", path=str(path), fields=fields)
    rec = rows[0].record
    assert rec["messages"] == turns and rec["question"] == turns[-1]["content"] and rec["answer"].startswith("Stop")
    assert [c["points"] for c in rec["rubrics"]] == [6.0, -5.0] and rec["example_tags"] == ["theme:x"]
    # a rubric without an answer has nothing to train on: a reject in an sft source, a prompt in an rl source
    assert rows[1].error == "no answer to train on (field 'reply'): a row with only a rubric needs " \
                            "data.catalog.conv.role rl or benchmark"
    rl = _rows("conv", format="jsonl", path=str(path), fields=fields, role="rl")
    assert rl[1].record["answer"] == "" and rl[1].record["rubrics"] and rl[1].error is None
    with pytest.raises(UsageError, match="question or messages \\(one of them\\)"):
        resolve_spec(DataConfig(catalog={"x": SourceSpec(format="jsonl", path=str(path), fields={
            **fields, "question": "q"})}), "x")


def test_record_ids_change_only_for_conversations():
    rec = build_record("s", {"question": "What is a normal temperature?", "answer": "About 37 C."})
    blob = "\x1f".join(("What is a normal temperature?", "", "About 37 C.", "", ""))
    assert rec["id"] == hashlib.sha256(blob.encode()).hexdigest()[:16]  # the formula of every existing record
    assert rec["messages"] is None and rec["rubrics"] is None and rec["example_tags"] is None
    one = build_record("s", {"messages": [{"role": "user", "content": "What is a normal temperature?"}],
                             "answer": "About 37 C."})
    two = build_record("s", {"messages": [{"role": "user", "content": "I feel hot."},
                                          {"role": "assistant", "content": "Have you measured it?"},
                                          {"role": "user", "content": "What is a normal temperature?"}],
                             "answer": "About 37 C."})
    assert one["question"] == two["question"] == rec["question"]
    assert len({rec["id"], one["id"], two["id"]}) == 3
    assert one["id"] == record_id(one["question"], "", "About 37 C.", None, None, one["messages"])
    # risk reads every user turn, not only the last one
    risky = build_record("s", {"messages": [{"role": "user", "content": "I have crushing chest pain."},
                                            {"role": "assistant", "content": "When?"},
                                            {"role": "user", "content": "An hour ago. What now?"}],
                               "answer": "Call 120."})
    assert risky["risk"] == "high"


# ------------------------------------------------------------------------------------------ prepare end to end
LEAKY = [  # a role sft source: two rows carry a HealthBench canary field, two the configured canary string
    {"messages": [{"role": "user", "content": "What helps a tension headache?"}], "answer": "Rest and fluids."},
    {"messages": [{"role": "user", "content": "How long does a cold last?"}], "answer": "About 7 to 10 days."},
    {"messages": [{"role": "user", "content": "Is a resting pulse of 72 normal?"}], "answer": "Yes, 60-100 is normal."},
    {"messages": [{"role": "user", "content": "Can I exercise with a mild cold?"}], "answer": "Light exercise is ok."},
    {"messages": [{"role": "user", "content": "What is a healthy BMI range?"}], "answer": "18.5 to 24.9.",
     "canary": "healthbench:0b0e-test"},
    {"messages": [{"role": "user", "content": "How much sleep do adults need?"},
                  {"role": "assistant", "content": "Why?"},
                  {"role": "user", "content": "I sleep five hours. Is that enough?"}],
     "answer": "Adults need 7 to 9 hours.", "canary": "healthbench:0b0f-test"},
    {"messages": [{"role": "user", "content": "What is normal blood sugar fasting?"}],
     "answer": f"About 3.9 to 5.5 mmol/L. {CANARY}"},
    {"messages": [{"role": "user", "content": f"[{CANARY}] Which vitamin do vegans lack most often?"}],
     "answer": "Vitamin B12."},
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    leaky = root / "leaky.jsonl"
    leaky.write_text("".join(json.dumps(r) + "\n" for r in LEAKY), encoding="utf-8")
    return prepare_local_tiny(
        root / "runs", "data.sources=[medical-o1,medical-o1-verifiable,healthbench-sample,rubric-prompts,leaky]",
        "data.catalog.leaky.format=jsonl", f"data.catalog.leaky.path={leaky}",
        "data.catalog.leaky.fields={messages: messages, answer: answer}", f"data.canaries=[{CANARY}]")


def test_canary_rows_are_never_trained_on(prepared):
    _, run, summary = prepared
    held = _read(run.data / "leaky.jsonl")  # eval-only, whatever the source's role
    assert summary["benchmarks"]["leaky"] == 4 and len(held) == 4
    assert sorted(r["meta"]["canary"] for r in held) == sorted([CANARY, CANARY, "healthbench:0b0e-test",
                                                               "healthbench:0b0f-test"])
    held_ids = {r["id"] for r in held}
    for name in ("train", "dev", "test", "gold", "rl_prompts"):
        rows = _read(run.data / f"{name}.jsonl")
        assert not held_ids & {r["id"] for r in rows}, name
        assert not any(CANARY in json.dumps(r) or "healthbench:" in json.dumps(r.get("meta") or {}) for r in rows)
    kept = [r for n in ("train", "dev", "test") for r in _read(run.data / f"{n}.jsonl") if r["source"] == "leaky"]
    assert len(kept) == 4  # the other rows of the source are ordinary records


def test_prepare_writes_conversations_and_rubrics_through(prepared):
    _, run, summary = prepared
    hb = _read(run.data / "healthbench-sample.jsonl")
    assert summary["benchmarks"]["healthbench-sample"] == 12 and all(tuple(r) == RECORD_FIELDS for r in hb)
    src = {r["prompt_id"]: r for r in _read(HB)}
    for r in hb:
        assert r["messages"] == src[r["meta"]["raw_id"]]["prompt"]
        assert [c["points"] for c in r["rubrics"]] == [c["points"] for c in src[r["meta"]["raw_id"]]["rubrics"]]
    records = {r["id"]: r for n in ("train", "dev", "test", "gold") for r in _read(run.data / f"{n}.jsonl")}
    rl = _read(run.data / "rl_prompts.jsonl")
    assert all(tuple(r) == RL_PROMPT_FIELDS for r in rl)
    generated = [r for r in rl if r["rubrics"] and r["source"] == "medical-o1-verifiable"]  # generate_rubrics: true
    lead = {"en": "The response states: ", "zh": "回答指出："}
    assert {r["language"] for r in generated} == {"en", "zh"}
    for r in generated:  # the offline rubric: a reference sentence (short here) per criterion, Essential first
        assert r["messages"] is None and r["rubrics"][0]["tags"] == ["axis:accuracy", "category:essential"]
        assert all(c["criterion"].startswith(lead[r["language"]]) and c["points"] > 0
                   and c["criterion"][len(lead[r["language"]]):] in r["reference"] for c in r["rubrics"])
    rubric_rows = [r for r in rl if r["rubrics"] and r not in generated]
    assert len(rubric_rows) >= 8 and any(len(r["messages"]) > 1 for r in rubric_rows)
    for row in rubric_rows:
        assert row["prompt"] == row["messages"][-1]["content"] and row["source"] == "rubric-prompts"
        assert row["example_tags"] and all(set(c) == {"criterion", "points", "tags"} for c in row["rubrics"])
        if row["id"] in records:  # a gold record keeps its conversation in the RL row
            assert records[row["id"]]["messages"] == row["messages"]
        inp = reward_input(row, 3, 1, "<think>\n\n</think>\n\nanswer")
        assert inp.messages == tuple(row["messages"]) and inp.rubrics == tuple(row["rubrics"])
        assert prompt_turns(row) == row["messages"]
    plain = next(r for r in rl if not r["messages"])
    assert reward_input(plain, 0, 0, "x").messages is None and prompt_turns(plain) == [
        {"role": "user", "content": plain["prompt"]}]


def test_length_bounds_and_duplicates_read_the_whole_conversation(tmp_path):
    long_history = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "Go on."},
                    {"role": "user", "content": "What should I do about my cough?"}]
    rows = [{"messages": long_history, "answer": "See a doctor if it lasts three weeks."},
            {"messages": [{"role": "user", "content": "What should I do about my cough?"}], "answer": "Rest."},
            {"messages": [{"role": "user", "content": "Earlier I asked about fever."}, {"role": "assistant",
              "content": "Yes?"}, {"role": "user", "content": "What should I do about my cough?"}], "answer": "Rest."}]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    _, run, summary = prepare_local_tiny(
        tmp_path / "runs", "data.sources=[medical-o1,c]", "data.catalog.c.format=jsonl", f"data.catalog.c.path={path}",
        "data.catalog.c.fields={messages: messages, answer: answer}", "data.max_question_tokens=200")
    rejects = [r for r in _read(run.data / "rejects.jsonl") if r["source"] == "c"]
    assert [(r["line"], r["stage"]) for r in rejects] == [(1, "length")]  # 300 words of history count
    assert summary["duplicates"] == 0  # the same last question after different histories is not a duplicate


# ------------------------------------------------------------------------------------------ rendering
TURNS = [{"role": "user", "content": "I have had a cough for a week."},
         {"role": "assistant", "content": "<think>\nask about fever\n</think>\n\nDo you have a fever?"},
         {"role": "user", "content": "No fever. Should I worry?"}]


def test_chat_template_renders_the_whole_conversation(tiny_model_dir):
    from medrl.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    text = render_prompt(tok, SYSTEM, TURNS)
    assert text == ("<|im_start|>system\nYou are a careful medical assistant.<|im_end|>\n"
                    "<|im_start|>user\nI have had a cough for a week.<|im_end|>\n"
                    "<|im_start|>assistant\nDo you have a fever?<|im_end|>\n"  # an earlier turn's think is dropped
                    "<|im_start|>user\nNo fever. Should I worry?<|im_end|>\n<|im_start|>assistant\n")
    own = [{"role": "system", "content": "Answer in one line."}, *TURNS]
    assert render_prompt(tok, SYSTEM, own).startswith("<|im_start|>system\nAnswer in one line.<|im_end|>\n"
                                                      "<|im_start|>user\nI have")  # the record's system turn only
    assert SYSTEM not in render_prompt(tok, SYSTEM, own)
    assert render_prompt(tok, SYSTEM, "No fever. Should I worry?") == render_prompt(
        tok, SYSTEM, conversation({"question": "No fever. Should I worry?"}, "No fever. Should I worry?"))
    # the eval's MCQ wording replaces only the last user turn
    assert conversation({"messages": TURNS}, "WORDED")[:-1] == TURNS[:-1]
    assert conversation({"messages": TURNS}, "WORDED")[-1] == {"role": "user", "content": "WORDED"}
    assert messages_for(None, TURNS)[0] == TURNS[0]


def test_sft_trains_on_the_last_assistant_turn_only(tiny_model_dir):
    from medrl.models.loading import load_tokenizer
    from medrl.sft.data import encode_example

    tok = load_tokenizer(str(tiny_model_dir))
    rec = build_record("s", {"messages": TURNS, "think": "No red flags.",
                             "answer": "Usually not; see a GP at 3 weeks."})
    ex = encode_example(tok, SYSTEM, rec)
    ids, mask = ex["input_ids"], ex["completion_mask"]
    assert len(ids) == len(mask)
    first = mask.index(1)
    assert set(mask[first:]) == {1} and set(mask[:first]) == {0}
    trained = tok.decode(ids[first:])
    assert trained == "<think>\nNo red flags.\n</think>\n\nUsually not; see a GP at 3 weeks.<|im_end|>\n"
    context = tok.decode(ids[:first])
    assert context.endswith("<|im_start|>user\nNo fever. Should I worry?<|im_end|>\n<|im_start|>assistant\n")
    assert "Do you have a fever?" in context  # the earlier assistant turn is context, masked out of the loss
    # by hand: the tokens of the earlier assistant turn carry mask 0
    earlier = tok("Do you have a fever?", add_special_tokens=False)["input_ids"]
    at = next(i for i in range(len(ids)) if ids[i:i + len(earlier)] == earlier)
    assert at < first and mask[at:at + len(earlier)] == [0] * len(earlier)


def test_eval_generation_answers_the_conversation(tiny_model_dir):
    from medrl.evaluation.evaluate import generate_all
    from medrl.models.generation import generate
    from medrl.models.loading import load_policy, load_tokenizer

    # sampled with a fixed seed (the tiny random model's greedy answer is the same run of newlines for any prompt)
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "model.device=cpu", "model.dtype=float32",
                             "eval.decoding.max_new_tokens=12", "eval.decoding.temperature=1.0",
                             "eval.decoding.seed=7", "eval.use_ray=false"])
    item = build_record("hb", {"messages": TURNS, "rubrics": [{"criterion": "Reassures.", "points": 5}]})
    out = generate_all(cfg, {"base": None}, {"hb": [item]})["base"]["outputs"]["hb"][0]
    assert out["prompt"] == "No fever. Should I worry?"
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_policy(cfg.model).eval()

    def sample(turns) -> str:
        return generate(model, tok, [render_prompt(tok, cfg.model.system_prompt, turns)], max_new_tokens=12,
                        temperature=1.0, seed=7)[0].text

    assert out["response"] == sample(TURNS) != sample(TURNS[-1]["content"])


def test_demo_and_review_carry_the_conversation():
    from medrl.demo.app import reward_input as demo_input
    from medrl.demo.app import turns_for
    from medrl.demo.engine import render_turns
    from medrl.review.forms import question_text
    from medrl.review.items import items_from_eval

    rec = build_record("gold", {"messages": TURNS, "rubrics": [{"criterion": "Reassures <b>calmly</b>.", "points": 5}],
                                "answer": "Usually not."})
    examples = {rec["question"]: rec}
    assert turns_for(rec["question"], examples) == TURNS and turns_for("typed", examples) == [
        {"role": "user", "content": "typed"}]
    shown = render_turns(turns_for(rec["question"], examples)[:-1])
    assert "Conversation so far (2 turns)" in shown and shown.count('class="medrl-turn"') == 2
    assert "&lt;think&gt;" in shown and "<think>" not in shown  # escaped text, never markup
    assert render_turns([]) == ""
    inp = demo_input(rec["question"], "ok", "sft", examples)
    assert inp.messages == tuple(TURNS) and inp.rubrics == tuple(rec["rubrics"])
    assert demo_input("typed", "ok", "sft", examples).messages is None
    row = {**rec, "model": "sft", "set": "gold", "response": "<think>\nx\n</think>\n\nUsually not.", "judge": {},
           "rules": {}}
    item = items_from_eval([row])[0]
    assert item["messages"] == TURNS
    assert question_text(item) == ("[user] I have had a cough for a week.\n\n[assistant] <think>\nask about fever\n"
                                   "</think>\n\nDo you have a fever?\n\n[user] No fever. Should I worry?")
    assert question_text({"question": "q", "messages": None}) == "q"
