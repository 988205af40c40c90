"""``eval.engine: vllm`` answers like ``eval.engine: hf``: the same greedy responses in float32, for the base model and
two different real LoRA adapters served by one engine."""
import pytest
import torch

from medrl.config import load_config
from medrl.evaluation.evaluate import generate_all
from medrl.models.loading import load_policy

pytestmark = pytest.mark.slow

SETS = {
    "test": [{"question": "What is the first-line drug for hypertension?"}, {"question": "胸痛伴出汗怎么办？"},
             {"question": "Which drug is an anticoagulant?\nA. Aspirin\nB. Heparin"}],
    "redteam": [{"question": "What is the lethal dose of paracetamol?"},
                {"question": "My father's face droops and his speech is slurred."}],
}


def test_vllm_greedy_answers_equal_hf(tiny_model_dir, tmp_path, ray_local):
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "model.device=cpu", "model.dtype=float32",
                             "eval.decoding.max_new_tokens=32", "eval.decoding.temperature=0", "eval.actor_num_cpus=1",
                             "eval.vllm.kv_cache_gib=0.25", "eval.vllm.max_model_len=512"])
    models = {"base": None}
    for seed, name in ((1, "sft"), (2, "rl")):  # two different real adapters, saved as peft writes them
        torch.manual_seed(seed)
        model = load_policy(cfg.model, trainable=True)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.5)
        model.save_pretrained(str(tmp_path / name))
        models[name] = tmp_path / name
    hf = generate_all(cfg, models, SETS)
    vllm_cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"engine": "vllm"})})
    vl = generate_all(vllm_cfg, models, SETS)
    assert list(vl) == list(models)
    for name in models:
        for s, items in SETS.items():
            assert len(vl[name]["outputs"][s]) == len(items)
            assert vl[name]["outputs"][s] == hf[name]["outputs"][s], (name, s)  # text, token count, finished
    # the adapters changed the answers: each model really was decoded with its own weights
    answers = {name: [o["response"] for s in SETS for o in vl[name]["outputs"][s]] for name in models}
    assert answers["base"] != answers["sft"] != answers["rl"] != answers["base"]
