"""``medrl demo RUN_DIR``: a gradio app with the base, SFT and RL models answering one question side by side.

Answers stream into three panes (think blocks folded); "Judge it" scores the three answers with the run's
configured teacher judge (cached, budgeted, rate limited); example questions come from the run's gold and red-team
sets (a conversation example shows its earlier turns above the question, and the models answer the whole
conversation). The consultation tab: each model interviews the simulated patient of a case, streamed as a chat, then
its outcome (``medrl.demo.consult``). Bound to 127.0.0.1 by default; ``--host`` elsewhere needs a password in ``--password-env``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from medrl.errors import UsageError

log = logging.getLogger("medrl.demo")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
EXAMPLES_PER_SET = 6
TITLES = {"base": "Base model", "sft": "SFT adapter", "rl": "RL adapter"}
MISSING = {"sft": "no SFT adapter in this run (run `medrl sft`)", "rl": "no RL adapter in this run (run `medrl ppo`)"}
CSS = """
.medrl-think summary{color:#666;cursor:pointer}.medrl-think-text,.medrl-answer{white-space:pre-wrap}
.medrl-turns{border-left:3px solid #9cf;padding-left:.5em;margin-bottom:.5em}.medrl-turn-text{white-space:pre-wrap}
.medrl-think-text{color:#555;font-size:.9em;border-left:3px solid #ccc;padding-left:.5em}
.medrl-response{max-height:36em;overflow-y:auto}
.medrl-chat-turn{margin:.3em 0}.medrl-chat-turn[data-role="patient"]{background:#f3f7ff;padding:.2em .4em}
.medrl-outcome{border-top:1px solid #ccc;padding-top:.3em;font-size:.9em}
.medrl-scores{overflow-x:auto;font-size:.85em}.medrl-scores table{border-collapse:collapse;width:100%}
.medrl-scores td,.medrl-scores th{border:1px solid #ccc;padding:2px 4px}
"""


def example_records(run) -> list[dict]:
    """The first questions of the gold set and one per category of the red-team set (then more red-team)."""
    from medrl.jsonl import read_jsonl

    out = []
    for name in ("gold", "redteam"):
        path = run.data / f"{name}.jsonl"
        if not path.is_file():
            continue
        rows = read_jsonl(path, ("question",))
        if name == "redteam":  # the first row of each category, in the order the categories first appear
            first_of: dict = {}
            for r in rows:
                first_of.setdefault(r.get("category"), r)
            picked = {id(r) for r in first_of.values()}
            rows = [*first_of.values(), *(r for r in rows if id(r) not in picked)]
        out += [{**r, "set": name} for r in rows[:EXAMPLES_PER_SET]]
    return out


def turns_for(question: str, examples: dict[str, dict]) -> list[dict]:
    """The conversation the models answer: an example's earlier turns then the question (a question typed in, or an
    example without a conversation: the question alone)."""
    from medrl.models.chat import conversation

    return conversation(examples.get(question.strip()) or {}, question)


def reward_input(question: str, response: str, name: str, examples: dict[str, dict]):
    """What the judge sees: an example question brings its reference, risk, expected behaviour, conversation and
    rubric; a question typed in gets its risk from the data stage's rules."""
    from medrl.data.risk import classify_risk
    from medrl.reward.types import RewardInput

    rec = examples.get(question.strip())
    if rec is not None:
        return RewardInput(id=f"demo/{name}/{rec['id']}", prompt=question, response=response,
                           reference=rec.get("reference"), risk=rec.get("risk") or "low",
                           expected_behavior=rec.get("expected_behavior"), language=rec.get("language"),
                           messages=tuple(turns_for(question, examples)) if rec.get("messages") else None,
                           rubrics=tuple(rec["rubrics"]) if rec.get("rubrics") else None)
    return RewardInput(id=f"demo/{name}", prompt=question, response=response, risk=classify_risk(question)[0])


def build_app(models, judge, examples: list[dict], max_new_tokens: int, consultation=None):
    """``consultation``: ``(cases, where they come from, DemoPatient, ConsultSettings)`` for the consultation tab."""
    import gradio as gr

    from medrl import RESEARCH_NOTICE

    with gr.Blocks(title="medrl demo") as app:
        gr.Markdown("## medrl: base vs SFT vs RL\nOne base model in memory, the LoRA adapters switched per answer. "
                    f"Judge: `{judge.cfg.judge.judge_id}`.")
        gr.Markdown(f"**{RESEARCH_NOTICE}**", elem_id="research-notice")
        with gr.Tab("Question", elem_id="question-tab"):
            question_tab(gr, models, judge, examples, max_new_tokens)
        if consultation is not None:
            with gr.Tab("Consultation", elem_id="consult-tab"):
                consultation_tab(gr, models, *consultation)
    return app


def question_tab(gr, models, judge, examples: list[dict], max_new_tokens: int):
    """One question (or an example conversation), the three models' answers streamed, and "Judge it"."""
    from medrl.demo.engine import MODEL_NAMES, render_response, render_scores, render_turns

    by_question = {r["question"].strip(): r for r in examples}

    def answer(question, new_tokens, temperature):
        question = (question or "").strip()
        panes = {n: "" if n in models.available else f"<p><i>{MISSING[n]}</i></p>" for n in MODEL_NAMES}
        texts: dict[str, str] = {}
        if not question:
            yield *panes.values(), texts, *[""] * 3
            return
        turns = turns_for(question, by_question)
        for name in models.available:
            for text in models.stream(name, turns, int(new_tokens), float(temperature)):
                texts[name] = text
                panes[name] = render_response(text, done=False)
                yield *panes.values(), texts, *[""] * 3
            panes[name] = render_response(texts.get(name, ""), done=True)
            yield *panes.values(), texts, *[""] * 3

    def judge_it(question, texts):
        question = (question or "").strip()
        if not texts or not question:
            return ["<p><i>answer a question first</i></p>"] * 3
        if judge.unavailable:
            return [f"<p><i>{judge.unavailable}</i></p>"] * 3
        names = [n for n in MODEL_NAMES if n in texts]
        results = judge.score([reward_input(question, texts[n], n, by_question) for n in names])
        stats = judge.ledger.stats()
        shown = dict(zip(names, (render_scores(r, stats) for r in results)))
        return [shown.get(n, "") for n in MODEL_NAMES]

    earlier = gr.HTML(elem_id="earlier-turns")
    question = gr.Textbox(label="Question", lines=3, elem_id="question")
    with gr.Row():
        tokens = gr.Slider(16, 4096, value=max_new_tokens, step=16, label="max new tokens")
        temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="temperature (0 = greedy)")
    with gr.Row():
        ask = gr.Button("Answer", variant="primary", elem_id="answer-btn")
        judge_btn = gr.Button("Judge it", elem_id="judge-btn")
    texts = gr.State({})
    panes, scores = [], []
    with gr.Row(equal_height=False):
        for name in MODEL_NAMES:
            with gr.Column():
                gr.Markdown(f"### {TITLES[name]}")
                panes.append(gr.HTML(elem_id=f"pane-{name}"))
                scores.append(gr.HTML(elem_id=f"scores-{name}"))
    if examples:
        gr.Examples([[r["question"]] for r in examples], inputs=[question],
                    label="Examples from the gold and red-team sets")
    question.change(lambda q: render_turns(turns_for(q or "", by_question)[:-1]), [question], [earlier])
    ask.click(answer, [question, tokens, temperature], [*panes, texts, *scores])
    judge_btn.click(judge_it, [question, texts], scores)


def consultation_panes(models, patient, case, settings):
    """The three panes (base, SFT, RL) after every piece of every model's interview of ``case``'s patient (one model
    after the other)."""
    from medrl.demo.consult import interview, render_dialogue
    from medrl.demo.engine import MODEL_NAMES

    panes = {n: "" if n in models.available else f"<p><i>{MISSING[n]}</i></p>" for n in MODEL_NAMES}
    if case is None or patient.unavailable:
        note = f"<p><i>{patient.unavailable or 'pick a case first'}</i></p>"
        yield [note if n in models.available else panes[n] for n in MODEL_NAMES]
        return
    for name in models.available:
        for d, writing in interview(models, patient, case, name, settings):
            panes[name] = render_dialogue(d, writing, settings.max_turns)
            yield list(panes.values())


def consultation_tab(gr, models, cases, source, patient, settings):
    """A case picked by its opening; each model interviews the simulated patient, streamed as a chat."""
    from medrl.demo.consult import case_label, render_case
    from medrl.demo.engine import MODEL_NAMES

    by_id = {c.id: c for c in cases}
    gr.Markdown(f"Each model plays the doctor: it asks the {patient.name} one question per turn, at most "
                f"{settings.max_turns} turns of {settings.turn_tokens} tokens, and ends with `FINAL ANSWER:`. "
                f"Cases from {source}.")

    def run(case_id):
        yield from consultation_panes(models, patient, by_id.get(case_id or ""), settings)

    first = cases[0].id if cases else None
    pick = gr.Dropdown([(case_label(c), c.id) for c in cases], value=first, label="Case", elem_id="consult-case")
    shown = gr.HTML(render_case(by_id[first]) if first else "", elem_id="consult-case-view")
    go = gr.Button("Interview the patient", variant="primary", elem_id="consult-btn")
    panes = []
    with gr.Row(equal_height=False):
        for name in MODEL_NAMES:
            with gr.Column():
                gr.Markdown(f"### {TITLES[name]}")
                panes.append(gr.HTML(elem_id=f"consult-{name}"))
    pick.change(lambda i: render_case(by_id[i]) if i in by_id else "", [pick], [shown])
    go.click(run, [pick], panes)


def run_demo(args) -> int:
    from medrl.config import load_config, secret_env_names
    from medrl.demo.consult import ConsultSettings, DemoPatient, demo_cases
    from medrl.demo.engine import DemoJudge, DemoModels
    from medrl.runs import RunDir, setup_logging

    if not args.run_dir.is_dir():
        raise UsageError(f"run directory not found: {args.run_dir}")
    password = os.environ.get(args.password_env) or ""
    if not password and args.host not in LOOPBACK:
        raise UsageError(f"--host {args.host} opens the demo beyond this machine: set a password in the environment "
                         f"variable {args.password_env} (--password-env)")
    auth = (args.username, password) if password else None
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no call home
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError("the demo needs gradio: pip install 'medrl[demo]'") from None
    run = RunDir(args.run_dir)
    config = args.config or (run.config_path if run.config_path.is_file() else None)
    cfg = load_config(config, args.overrides)
    setup_logging(None, secret_envs=[*secret_env_names(cfg), args.password_env])
    if not Path(cfg.model.path).exists() and cfg.model.build_tiny_if_missing:
        from medrl.models.tiny import build_tiny_model

        build_tiny_model(cfg.model.path)
    adapters = {name: path for name, path in (("sft", run.sft_adapter), ("rl", run.ppo_adapter))
                if (path / "adapter_config.json").is_file()}
    log.info("demo: base %s with adapters %s", cfg.model.path, ", ".join(adapters) or "none")
    models = DemoModels(cfg.model, adapters)
    judge = DemoJudge(cfg.reward)
    patient = None
    try:
        cases, source = demo_cases(cfg.consult)
        patient = DemoPatient(cfg, judge)
        settings = ConsultSettings(cfg.consult.max_turns, cfg.consult.turn_tokens, cfg.model.system_prompt)
        app = build_app(models, judge, example_records(run), min(cfg.eval.decoding.max_new_tokens, 4096),
                        (cases, source, patient, settings))
        app.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, auth=auth,
                                                      ssr_mode=False, share=False, css=CSS, footer_links=[])
    finally:
        if patient is not None:
            patient.close()
        judge.close()
    return 0
