from pathlib import Path

import pytest
import yaml

from pipeline.config import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def _default() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_default_params_validate():
    p = load_params(ROOT / "params.yaml")
    assert p.group.num_experts_avg * 4 <= p.model.config["num_experts"]  # at most 25% kept


def _set(d: dict, path: str, value) -> dict:
    node = d
    *parents, leaf = path.split(".")
    for k in parents:
        node = node[k]
    node[leaf] = value
    return d


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("merge.stratgy", "frequency", "merge.stratgy: unknown key"),
        ("profile.num_samples", 0, "profile.num_samples"),
        ("profile.num_samples", "many", "profile.num_samples"),
        ("compress.sparse_ratio", 0, "compress.sparse_ratio"),
        ("compress.sparse_ratio", 1.5, "compress.sparse_ratio"),
        ("compress.rank", 128, "compress.rank=128 must be below"),
        ("group.num_experts_avg", 17, "exceeds model.config.num_experts=16"),
        (
            "group.similarity",
            "vibes",
            "valid choices: expert-feature, expert-feature-abs, expert-gradient, expert-weight, expert-weight-feature, random, router-logits, router-weight",
        ),
        ("merge.strategy", "ties", "valid choices: fisher, frequency, uniform"),
        ("merge.strategy", "fisher", "merge.strategy=fisher needs gradients from profiling"),
        ("group.similarity", "expert-gradient", "group.similarity=expert-gradient needs gradients"),
        ("align.method", "zip", "valid choices: activation-matching, none, weight-matching"),
        ("compress.schedule", "exp", "valid choices: cubic, linear, quadratic"),
        ("data.task", "imagenet", "valid choices: mrpc, sst2"),
        ("model.name_or_path", "google/switch-base-32", "exactly one of model.name_or_path"),
        ("model.family", "bert", "valid choices: switch_transformers"),
        ("runtime.device", "tpu", "runtime.device"),
        ("compress.warmup_frac", 0.9, "no pruning window"),
        ("group.ratio", "greedy", "group.ratio"),
    ],
)
def test_bad_params_name_the_key(path, value, message):
    with pytest.raises(ParamsError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_params(_set(_default(), path, value))


def test_not_yaml(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("seed: [1, 2\nmodel: {")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(f)


def test_not_a_mapping(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(f)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_every_dvc_params_key_exists():
    params = _default()
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        for key in stage.get("params", []):
            node = params
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, (
                    f"stage {name}: params key {key} not in params.yaml"
                )
                node = node[part]


def test_every_dvc_dep_exists():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    outs = {o for s in dvc["stages"].values() for o in s.get("outs", [])}
    for name, stage in dvc["stages"].items():
        for dep in stage["deps"]:
            assert dep in outs or (ROOT / dep).exists(), f"stage {name}: dep {dep} missing"
