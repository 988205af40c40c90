"""The user-facing docs stay true to the tools: the memory figures of docs/ppo.md are what ``medrl estimate-memory``
prints for the shipped configs, the README lists every guide, and no doc points at the development workspace."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
USER_DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("name", ["qwen3_1p7b_16gb", "qwen3_1p7b_24gb", "qwen3_1p7b_2x24gb"])
def test_ppo_doc_memory_table_is_the_estimate(name, capsys):
    from medrl.config import load_config
    from medrl.ppo.memory import run_estimate_memory

    result = run_estimate_memory(load_config(REPO / "configs" / f"{name}.yaml"))
    capsys.readouterr()
    row = next(line for line in (REPO / "docs" / "ppo.md").read_text().splitlines()
               if line.startswith(f"| `{name}.yaml`"))
    figures = [float(x) for x in re.findall(r"\d+\.\d\d", row)]
    gib = result["gib"]
    assert figures[0] == round(gib["learner_peak"], 2)
    if "rollout_gpu_gib" in result:  # the engine on a GPU of its own
        assert figures[1:] == [round(result["rollout_gpu_gib"], 2), round(gib["gpu_peak"], 2),
                               round(result["rollout_gpu_gib"], 2)]
    else:
        assert figures[1:] == [round(gib["rollout_actor"], 2), round(gib["rollouts_asleep"], 2),
                               round(gib["gpu_peak"], 2)]


def test_readme_lists_every_guide_and_no_doc_points_at_the_workspace():
    readme = (REPO / "README.md").read_text()
    guides = readme.split("## Stage guides", 1)[1]
    for doc in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{doc.name})" in guides, doc.name
    assert [str(p.relative_to(REPO)) for p in USER_DOCS if "../shared" in p.read_text()] == []
