import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from medrl.config import Config, load_config, redact_secrets, save_config
from medrl.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_shipped_configs_validate():
    for name in ("local_tiny.yaml", "qwen3_1p7b_24gb.yaml", "qwen3_1p7b_16gb.yaml"):
        cfg = load_config(CONFIGS / name)
        assert isinstance(cfg, Config)
    assert load_config(CONFIGS / "local_tiny.yaml").model.device == "cpu"


def test_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "local_tiny.yaml", ["run.seed=7", "model.dtype=bfloat16"])
    out = save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(out)
    assert again == cfg
    assert again.run.seed == 7 and again.model.dtype == "bfloat16"


def test_override_types_and_nesting(tmp_path):
    p = _write(tmp_path, "run:\n  name: a\n")
    cfg = load_config(p, ["run.name=b", "run.seed=3", "ray.num_cpus=0.5", "ray.address=null"])
    assert (cfg.run.name, cfg.run.seed, cfg.ray.num_cpus, cfg.ray.address) == ("b", 3, 0.5, None)


def test_unknown_key_names_key_file_and_known_keys(tmp_path):
    p = _write(tmp_path, "run:\n  nmae: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: unknown key 'run.nmae' (known keys in run: name, root, seed, report_to)"


def test_unknown_override_key():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["run.sed=3"])
    assert str(e.value) == "override 'run.sed=3': unknown key 'run.sed' (known keys in run: name, root, seed, report_to)"


def test_wrong_type_names_expected_type(tmp_path):
    p = _write(tmp_path, "run:\n  seed: abc\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: key 'run.seed' expects int, got str 'abc'")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.dtype=float64"])
    assert str(e.value).startswith(
        "override 'model.dtype=float64': key 'model.dtype' expects one of 'auto', 'float32', 'bfloat16', 'float16',"
        " got str 'float64'")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.yaml")
    assert str(e.value) == f"config file not found: {tmp_path / 'nope.yaml'}"
    p = _write(tmp_path, "run: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: line ") and "is not valid YAML" in str(e.value)
    p = _write(tmp_path, "- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)


def test_bad_override_syntax():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["run.seed"])
    assert str(e.value) == "override 'run.seed' must look like section.key=value"


def test_secrets_redacted():
    tree = {"judge": {"api_key": "sk-abcdef", "api_key_env": "DEEPSEEK_API_KEY", "auth_token": "t"}, "x": [{"secret": 1}]}
    red = redact_secrets(tree)
    assert red == {"judge": {"api_key": "***", "api_key_env": "DEEPSEEK_API_KEY", "auth_token": "***"},
                   "x": [{"secret": "***"}]}


def test_saved_config_is_yaml_with_every_section(tmp_path):
    cfg = load_config(CONFIGS / "local_tiny.yaml")
    tree = yaml.safe_load(save_config(cfg, tmp_path / "c.yaml").read_text())
    assert set(tree) == set(Config.model_fields)
    assert cfg.digest() == load_config(CONFIGS / "local_tiny.yaml").digest()
    assert cfg.digest() != load_config(CONFIGS / "local_tiny.yaml", ["run.seed=1"]).digest()


def test_cross_field_check_names_the_section_not_its_dict():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["reward.judge.dimension_weights.accuracy=0.9"])
    msg = str(e.value)
    assert msg.startswith("override 'reward.judge.dimension_weights.accuracy=0.9': reward.judge.dimension_weights: ")
    assert "dimension weights must sum to 1" in msg and "{" not in msg


def test_out_of_range_value_says_so():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["eval.decoding.top_p=0"])
    assert str(e.value) == ("override 'eval.decoding.top_p=0': key 'eval.decoding.top_p' is out of range: got 0 "
                            "(Input should be greater than 0)")


def test_overrides_are_validated_together_and_errors_name_the_right_one():
    together = ["reward.judge.model=my-llm", "reward.judge.prices.my-llm={input: 0, input_cache_hit: 0, output: 0}"]
    for order in (together, together[::-1]):  # a self-hosted judge from the command line, in either order
        assert load_config(None, order).reward.judge.model == "my-llm"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["run.seed=3", "reward.judge.model=x", "run.name=y"])
    assert str(e.value).startswith("override 'reward.judge.model=x': reward.judge: judge model 'x' has no entry")


def test_a_whole_config_check_blames_the_override_it_names_not_the_last_one(tmp_path):
    with pytest.raises(ConfigError) as e:  # local_tiny runs consultations, which need a group estimator
        load_config(CONFIGS / "local_tiny.yaml", ["ppo.estimator=gae", "reward.judge.batch_size=16"])
    assert str(e.value).startswith("override 'ppo.estimator=gae': ") and \
        "needs a group ppo.estimator" in str(e.value)
    p = _write(tmp_path, "consult:\n  cases_per_step: 1\n")  # no override names a key of the message: the file
    with pytest.raises(ConfigError) as e:
        load_config(p, ["run.seed=2"])
    assert str(e.value).startswith(f"{p}: ") and "needs consult.cases" in str(e.value)


@pytest.mark.parametrize("override,message", [
    ("ppo.kl.target=.inf", "key 'ppo.kl.target' must be a finite number, got inf"),
    ("reward.judge.budget_usd=.nan", "key 'reward.judge.budget_usd' must be a finite number, got nan"),
    ("ray.num_cpus=-1", "key 'ray.num_cpus' is out of range: got -1"),
    ("ray.num_cpus=0", "key 'ray.num_cpus' is out of range: got 0"),
])
def test_bounds_and_non_finite_numbers(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_duplicate_keys_and_non_utf8_files_name_file_and_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "run:\n  seed: 1\n  name: a\n  seed: 2\n"))
    assert str(e.value) == f"{tmp_path}/c.yaml: line 4 is not valid YAML (duplicate key 'seed' (first at line 2))"
    (tmp_path / "l1.yaml").write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "l1.yaml")
    assert str(e.value) == f"{tmp_path}/l1.yaml: not UTF-8 text (byte 0xe9 at line 2): save the file as UTF-8"
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize("value", ["sk-" + "live0123456789abcdef0123", "a1B2c3D4e5F6g7H8i9J0k1L2m3", "hf_AbCdEf"])
def test_a_key_pasted_as_the_variable_name_is_refused_unseen(tmp_path, value):
    for source in ([f"reward.judge.api_key_env={value}"], _write(tmp_path, f"reward:\n  judge:\n    api_key_env: {value}\n")):
        with pytest.raises(ConfigError) as e:
            load_config(None, source) if isinstance(source, list) else load_config(source)
        assert value not in str(e.value) and "looks like an API key itself" in str(e.value)
    assert load_config(None, ["reward.judge.api_key_env=MY_JUDGE_KEY_2"]).reward.judge.api_key_env == "MY_JUDGE_KEY_2"


def test_vllm_rollouts_refuse_a_nucleus_below_one():
    """vLLM's log-probs are renormalised over the nucleus: with top_p < 1 the weight-sync check would stop the run."""
    with pytest.raises(ConfigError, match=r"ppo.rollout: engine vllm needs generation.top_p=1 \(got 0.9\)"):
        load_config(None, ["ppo.generation.top_p=0.9", "ppo.rollout.engine=vllm"])
    assert load_config(None, ["ppo.generation.top_p=0.9"]).ppo.rollout.engine == "hf"  # HF scores separately


def _walk(model, prefix=""):
    """(dotted key, FieldInfo) of every field of the config tree; the entries of a mapping of sections as
    ``<name>``."""
    for name, field in model.model_fields.items():
        key = prefix + name
        yield key, field
        ann = field.annotation
        if typing.get_origin(ann) is dict:
            inner, sep = typing.get_args(ann)[1], ".<name>."
        else:
            inner, sep = next((a for a in (ann, *typing.get_args(ann)) if isinstance(a, type)
                               and issubclass(a, BaseModel)), None), "."
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            yield from _walk(inner, key + sep)


def test_every_field_is_documented_and_explained(capsys):
    from medrl.cli import main
    from medrl.config_help import all_keys, doc_text, explain

    fields = dict(_walk(Config))
    assert len(fields) > 250 and set(fields) == set(all_keys())
    undocumented = [k for k, f in fields.items() if not (f.description or "").strip()]
    assert undocumented == []
    for key, field in fields.items():  # what `medrl config explain KEY` prints, for every field: its doc and type
        out = explain(key)
        assert out.startswith(f"{key}: ") and " ".join(out.split()).find(" ".join(doc_text(field).split())[:60]) > 0
    assert main(["config", "explain", "ppo.kl.target"]) == 0
    assert capsys.readouterr().out == ("ppo.kl.target: float (> 0)\n  Target of the adaptive controller: mean "
                                       "per-token KL (nats) of the batch.\n  default: 0.1\n")
    assert main(["config", "explain", "data.catalog.medqa.limit"]) == 0  # any entry name of a mapping
    assert capsys.readouterr().out.startswith("data.catalog.medqa.limit: int or null (>= 1)\n  Keep at most N")


def test_config_explain_unknown_key_exits_2(capsys):
    from medrl.cli import main

    assert main(["config", "explain", "ppo.kl.targt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "medrl: error: unknown config key 'ppo.kl.targt' (known keys in ppo.kl: mode, init_coef, placement, target")
    assert main(["config", "explain", "ppo.steps.x"]) == 2
    assert "'ppo.steps' is a value, not a section" in capsys.readouterr().err


def test_config_show_is_the_resolved_config_with_docs_and_defaults(capsys):
    from medrl.cli import main

    assert main(["config", "show", "-c", str(CONFIGS / "local_tiny.yaml"), "ppo.kl.target=0.3"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(CONFIGS / "local_tiny.yaml", ["ppo.kl.target=0.3"])
    assert yaml.safe_load(out) == cfg.to_dict()  # valid YAML of exactly the resolved config
    lines = out.splitlines()
    i = lines.index("    target: 0.3  # default: 0.1")
    assert lines[i - 1] == "    # Target of the adaptive controller: mean per-token KL (nats) of the batch."
    assert "  horizon: 10000  # default" in [line[2:] for line in lines]
    assert "  name: local_tiny  # default: default" in lines
    assert sum(1 for line in lines if "# default" in line) > 250
