"""params.yaml validation: the shipped file is valid, and every bad value is named by its key path."""

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

from pipeline.align import ALIGNERS
from pipeline.config import ParamsError, flatten, load_params, parse_params
from pipeline.data import LM_TASKS, TASKS
from pipeline.grouping import SIMILARITIES
from pipeline.merging import MERGE_STRATEGIES

ROOT = Path(__file__).resolve().parents[1]


def _default() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _set(d: dict, path: str, value) -> dict:
    node = d
    *parents, leaf = path.split(".")
    for k in parents:
        node = node[k]
    node[leaf] = value
    return d


def test_default_params_validate():
    p = load_params(ROOT / "params.yaml")
    raw = _default()
    assert p.seed == raw["seed"]
    assert p.group.num_experts_avg <= p.model.config["num_experts"]
    assert p.compress.rank < min(p.model.config["d_model"], p.model.config["d_ff"])
    assert p.data.task in TASKS.names()


def test_defaults_fill_omitted_sections():
    p = parse_params({"model": {"config": {"num_experts": 8}}})
    assert p.merge.strategy == "frequency" and p.align.method == "weight-matching"


def _choices(names) -> str:
    return "valid choices: " + ", ".join(names)


@pytest.mark.parametrize(
    "path, value, message",
    [
        # unknown keys, at any depth
        ("merge.stratgy", "frequency", "merge.stratgy: unknown key"),
        ("seeed", 1, "seeed: unknown key"),
        ("kd.train.lrr", 0.1, "kd.train.lrr: unknown key"),
        # wrong types
        ("profile.num_samples", "many", "profile.num_samples: "),
        ("finetune.batch_size", 1.5, "finetune.batch_size: "),
        ("group.skip_first_layer", "perhaps", "group.skip_first_layer: "),
        ("group", 5, "group: "),
        ("runtime.dtype", "int8", "runtime.dtype: "),
        # out of range
        ("compress.sparse_ratio", 0, "compress.sparse_ratio: "),
        ("compress.sparse_ratio", 1.5, "compress.sparse_ratio: "),
        ("profile.num_samples", 0, "profile.num_samples: "),
        ("compress.rank", 0, "compress.rank: "),
        ("compress.rank", 128, "compress.rank=128 must be below"),  # == d_model
        ("compress.rank", 1000, "compress.rank=1000 must be below"),
        ("finetune.lr", -1.0, "finetune.lr: "),
        ("compress.warmup_frac", 0.9, "compress.warmup_frac + compress.cooldown_frac must be < 1"),
        ("group.num_experts_avg", 17, "group.num_experts_avg=17 exceeds model.config.num_experts=16"),
        # contradictory sources
        ("model.name_or_path", "google/switch-base-32", "set exactly one of model.name_or_path"),
        # unknown registry names
        (
            "group.similarity",
            "vibes",
            "group.similarity: unknown similarity 'vibes'; " + _choices(SIMILARITIES.names()),
        ),
        (
            "merge.strategy",
            "ties",
            "merge.strategy: unknown merge strategy 'ties'; " + _choices(MERGE_STRATEGIES.names()),
        ),
        (
            "align.method",
            "zip",
            "align.method: unknown alignment method 'zip'; " + _choices(ALIGNERS.names()),
        ),
        (
            "data.task",
            "imagenet",
            "data.task: unknown task 'imagenet'; " + _choices([*TASKS.names(), *LM_TASKS]),
        ),
        ("compress.schedule", "exp", "compress.schedule: unknown pruning schedule 'exp'"),
        ("model.family", "gpt2", "model.family: unknown model family 'gpt2'"),
        ("align.reference", "last", "align.reference: "),
        ("group.ratio", "greedy", "group.ratio: "),
        ("runtime.device", "tpu", "runtime.device: "),
        # methods that need data the profile does not collect by default
        ("merge.strategy", "fisher", "merge.strategy=fisher needs gradients from profiling"),
        ("group.similarity", "expert-gradient", "group.similarity=expert-gradient needs gradients"),
    ],
)
def test_bad_params_name_the_key(path, value, message):
    with pytest.raises(ParamsError) as err:
        parse_params(_set(_default(), path, value))
    text = str(err.value)
    assert message in text, text
    assert path in text  # the offending key path is always named


def test_every_error_is_reported_at_once():
    raw = _set(_set(_default(), "profile.num_samples", 0), "merge.stratgy", "x")
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert "profile.num_samples" in str(err.value) and "merge.stratgy: unknown key" in str(err.value)


def test_rank_just_below_model_width_is_fine():
    parse_params(_set(_default(), "compress.rank", 127))


def test_not_yaml(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("seed: [1, 2\nmodel: {")
    with pytest.raises(ParamsError, match="params.yaml is not valid YAML"):
        load_params(f)


def test_not_a_mapping(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(ParamsError, match="params must be a mapping of sections, got list"):
        load_params(f)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml not found"):
        load_params(tmp_path / "nope.yaml")


def test_flatten_uses_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}}) == {"a.b": 1, "a.c.d": 2, "e": {}}


# Each pipeline and the params file its stages read (paths from the repository root).
PIPELINES = {"dvc.yaml": "params.yaml", "llm/dvc.yaml": "llm/params.yaml", "meo/dvc.yaml": "meo/params.yaml"}


def _stages(dvc_file: str) -> dict[str, dict]:
    """Stage name -> definition; a ``foreach`` stage's definition is its ``do`` template."""
    dvc = yaml.safe_load((ROOT / dvc_file).read_text())
    return {name: stage.get("do", stage) for name, stage in dvc["stages"].items()}


def _dvc_params_keys(dvc_file: str) -> list[tuple[str, str]]:
    keys = []
    for name, stage in _stages(dvc_file).items():
        for entry in stage.get("params", []):
            if isinstance(entry, dict):  # {file: [keys]} form
                for file, ks in entry.items():
                    assert file == PIPELINES[dvc_file], f"stage {name} reads params from {file}"
                    keys += [(name, k) for k in ks or []]
            else:
                keys.append((name, entry))
    return keys


@pytest.mark.parametrize("dvc_file", PIPELINES)
def test_pipeline_params_validate(dvc_file):
    load_params(ROOT / PIPELINES[dvc_file])


@pytest.mark.parametrize("dvc_file", PIPELINES)
def test_every_dvc_params_key_exists(dvc_file):
    params = yaml.safe_load((ROOT / PIPELINES[dvc_file]).read_text())
    keys = _dvc_params_keys(dvc_file)
    assert keys
    for name, key in keys:
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, (
                f"stage {name}: params key {key} not in params.yaml"
            )
            node = node[part]


@pytest.mark.parametrize("dvc_file", PIPELINES)
def test_every_dvc_dep_exists(dvc_file):
    stages = _stages(dvc_file)
    # An out is a path, or a one-key mapping of a path to its options (e.g. cache: false).
    outs = {o if isinstance(o, str) else next(iter(o)) for s in stages.values() for o in s.get("outs", [])}
    params = yaml.safe_load((ROOT / PIPELINES[dvc_file]).read_text())
    # A matrix stage's out names its entry (${key}); a dep may name one through a params value.
    patterns = [re.compile(re.escape(o).replace(re.escape("${key}"), r"[^/]+") + "$") for o in outs]
    for name, stage in stages.items():
        for dep in stage["deps"]:
            dep = re.sub(r"\$\{(\w+)\}", lambda m: str(params[m.group(1)]), dep)
            # A folder holding other stages' outs (one per matrix entry) is made by them too.
            made = any(p.match(dep) for p in patterns) or any(o.startswith(dep + "/") for o in outs)
            assert made or (ROOT / dep).exists(), f"stage {name}: dep {dep} missing"


def _module_file(module: str) -> str | None:
    """The source file of a project module (a package's ``__init__.py``), relative to the root."""
    path = module.replace(".", "/")
    if (ROOT / f"{path}.py").is_file():
        return f"{path}.py"
    if (ROOT / path / "__init__.py").is_file():
        return f"{path}/__init__.py"
    return None


def _project_imports(module: str) -> set[str]:
    """Modules of this project that ``module`` imports anywhere in its source."""
    tree = ast.parse((ROOT / _module_file(module)).read_text())
    found = set()
    for node in ast.walk(tree):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        if names and (ROOT / names[0].replace(".", "/")).is_dir():
            # `from stages import tracking`: the names are the package's modules (or, when they
            # are not modules, names the package's __init__ defines).
            names = [node.module] + [
                f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")
            ]
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n for n in names if n.split(".")[0] in ("pipeline", "stages") and _module_file(n)}
    return found


@pytest.mark.parametrize("dvc_file", PIPELINES)
def test_every_stage_lists_the_library_modules_it_imports(dvc_file):
    # pipeline.config is the params schema, shared by every stage; its registry look-ups only
    # validate names, so it is not followed (else any schema edit would re-run every stage).
    for name, stage in _stages(dvc_file).items():
        script = re.search(r"-m (stages\.\w+)", stage["cmd"]).group(1)
        seen, todo = set(), [script]
        while todo:
            mod = todo.pop()
            if mod not in seen:
                seen.add(mod)
                if mod != "pipeline.config":
                    todo.extend(_project_imports(mod))
        needed = {_module_file(m) for m in seen} - {"pipeline/config.py", "pipeline/registry.py"}
        needed -= {"pipeline/__init__.py", "stages/__init__.py"}
        # A folder dep (a package) covers every module in it.
        folders = [d for d in stage["deps"] if (ROOT / d).is_dir()]
        missing = sorted(
            m for m in needed if m not in stage["deps"] and not any(m.startswith(f + "/") for f in folders)
        )
        assert not missing, f"stage {name} imports {missing} but dvc.yaml does not list them as deps"


# ---------------------------------------------------------------- second reliability pass (issue 17)


def _write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "params.yaml"
    f.write_text(text)
    return f


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: {config: {}}\nseed: 1\nseed: 2\n", "duplicate key seed at lines 2 and 3"),
        (
            "model:\n  config: {}\n  family: bert\n  family: mixtral\n",
            "duplicate key model.family at lines 3 and 4",
        ),
        (
            "model: {config: {}}\nvariants:\n  a: {seed: 1, seed: 2}\n",
            "duplicate key variants.a.seed at lines 3 and 3",
        ),
    ],
)
def test_duplicate_keys_are_refused(tmp_path, text, message):
    with pytest.raises(ParamsError, match="params.yaml: " + re.escape(message)):
        load_params(_write(tmp_path, text))


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    # A merge key may override what it merges in.
    f = _write(
        tmp_path, "model: {config: {}}\nfinetune: &f {lr: 0.001}\nkd:\n  train:\n    <<: *f\n    lr: 0.01\n"
    )
    assert load_params(f).kd.train.lr == 0.01


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("finetune.batch_size", True, "finetune.batch_size: true is a boolean, not an integer"),
        ("kd.train.lr", False, "kd.train.lr: false is a boolean, not a number"),
        ("data.max_train_samples", True, "data.max_train_samples: true is a boolean, not an integer"),
        ("model.router_init_std", True, "model.router_init_std: true is a boolean, not a number"),
        ("finetune.lr", float("inf"), "finetune.lr: Input should be a finite number"),
        ("compress.beta1", float("nan"), "compress.beta1: Input should be a finite number"),
        ("finetune.epochs", float("-inf"), "finetune.epochs: Input should be a finite number"),
    ],
)
def test_booleans_and_non_finite_numbers_are_refused(path, value, message):
    with pytest.raises(ParamsError) as err:
        parse_params(_set(_default(), path, value))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_booleans_for_bool_fields_and_ints_for_float_fields_still_work():
    raw = _set(_set(_default(), "group.skip_first_layer", False), "finetune.lr", 1)
    p = parse_params(_set(raw, "finetune.epochs", 2))
    assert p.group.skip_first_layer is False and p.finetune.lr == 1 and p.finetune.epochs == 2


@pytest.mark.parametrize(
    "family, config, message",
    [
        (
            "switch_transformers",
            {"num_expert": 8},
            "model.config.num_expert: unknown key of SwitchTransformersConfig",
        ),
        ("switch_transformers", {"d_model": "128"}, "model.config.d_model: '128' (str) is not an integer"),
        (
            "switch_transformers",
            {"num_experts": True},
            "model.config.num_experts: true (bool) is not an integer",
        ),
        (
            "switch_transformers",
            {"router_bias": "no"},
            "model.config.router_bias: 'no' (str) is not true or false",
        ),
        ("switch_transformers", {"dense_act_fn": 3}, "model.config.dense_act_fn: 3 (int) is not a string"),
        (
            "switch_transformers",
            {"dropout_rate": "x"},
            "model.config.dropout_rate: 'x' (str) is not a number",
        ),
        ("mixtral", {"num_local_expert": 8}, "did you mean num_local_experts?"),
    ],
)
def test_model_config_is_checked_against_the_config_class(family, config, message):
    raw = {
        "model": {"family": family, "config": config},
        "data": {"task": "wikitext2" if family == "mixtral" else "sst2"},
    }
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert message in str(err.value)


def test_model_config_accepts_aliases_ints_for_floats_and_none_defaults():
    cfg = {"hidden_size": 64, "dropout_rate": 0, "bos_token_id": 3, "num_labels": 2}
    p = parse_params({"model": {"config": cfg}})
    assert p.model.config == cfg
    llm = {"num_experts": 8, "hidden_size": 64, "pad_token_id": 0, "eos_token_id": [2, 3]}
    parse_params({"model": {"family": "mixtral", "config": llm}, "data": {"task": "wikitext2"}})


def test_rank_and_expert_count_use_the_config_class_defaults():
    # Mixtral's default is 8 experts; the alias num_experts names num_local_experts.
    raw = {
        "model": {"family": "mixtral", "config": {}},
        "data": {"task": "wikitext2"},
        "group": {"num_experts_avg": 9},
    }
    with pytest.raises(ParamsError, match=r"num_local_experts=8 \(the MixtralConfig default\)"):
        parse_params(raw)
    raw["model"]["config"] = {"num_experts": 16}
    parse_params(raw)


def _checkpoint(tmp_path: Path, **cfg) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _from_checkpoint(folder, **over) -> dict:
    raw = _default()
    raw["model"].update(name_or_path=str(folder), config=None, init_embeddings_from=None)
    for k, v in over.items():
        _set(raw, k, v)
    return raw


SWITCH = {"model_type": "switch_transformers", "num_experts": 8, "d_model": 32, "d_ff": 64}


@pytest.mark.parametrize(
    "cfg, over, message",
    [
        (
            SWITCH,
            {"group.num_experts_avg": 9},
            "group.num_experts_avg=9 exceeds num_experts=8 of the checkpoint",
        ),
        (
            SWITCH,
            {"compress.rank": 40},
            "compress.rank=40 must be below the expert matrix size min(d_model, d_ff)=32",
        ),
        (SWITCH, {"model.family": "mixtral"}, "set model.family: switch_transformers"),
        (
            {
                "model_type": "qwen2_moe",
                "num_experts": 4,
                "hidden_size": 64,
                "moe_intermediate_size": 16,
                "intermediate_size": 256,
            },
            {"model.family": "qwen2_moe", "compress.rank": 16},
            "min(hidden_size, moe_intermediate_size)=16",
        ),
        (
            {"model_type": "mixtral", "num_local_experts": 2, "hidden_size": 64, "intermediate_size": 64},
            {"model.family": "mixtral", "group.num_experts_avg": 3},
            "group.num_experts_avg=3 exceeds num_local_experts=2 of the checkpoint",
        ),
    ],
)
def test_checkpoint_config_json_is_checked(tmp_path, cfg, over, message):
    with pytest.raises(ParamsError) as err:
        parse_params(_from_checkpoint(_checkpoint(tmp_path, **cfg), **over))
    assert message in str(err.value)


def test_checkpoint_checks_pass_on_a_fitting_checkpoint(tmp_path):
    parse_params(_from_checkpoint(_checkpoint(tmp_path, **SWITCH), **{"compress.rank": 31}))


def _hub_cache(monkeypatch, root: Path, repo_id: str | None = None, cfg: dict | None = None) -> None:
    """Point the Hugging Face cache at ``root``, holding ``repo_id``'s config.json when given."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    if repo_id:
        repo = root / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("abc123")
        (repo / "snapshots" / "abc123").mkdir(parents=True)
        (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps(cfg))


def test_a_cached_hub_checkpoint_is_checked_like_a_local_folder(tmp_path, monkeypatch):
    _hub_cache(monkeypatch, tmp_path / "hub", "openai/gpt-oss-20b", {"model_type": "gpt_oss"})
    with pytest.raises(ParamsError, match="config.json has model_type 'gpt_oss'; set model.family: gpt_oss"):
        parse_params(_from_checkpoint("openai/gpt-oss-20b"))
    _hub_cache(monkeypatch, tmp_path / "hub2", "acme/dense-7b", {"model_type": "llama"})
    with pytest.raises(ParamsError, match="config.json has model_type 'llama'; that is no supported family"):
        parse_params(_from_checkpoint("acme/dense-7b"))


def test_hub_ids_and_custom_code_are_left_to_the_loader(tmp_path, monkeypatch):
    # Nothing is downloaded at validation: a Hub id that is not in the local cache is not checked here.
    _hub_cache(monkeypatch, tmp_path / "empty-hub")
    parse_params(_from_checkpoint("google/switch-base-8", **{"group.num_experts_avg": 100}))
    custom = _checkpoint(tmp_path, model_type="my_moe", auto_map={"AutoConfig": "x.Y"})
    parse_params(_from_checkpoint(custom))


def test_upcycled_package_checkpoint_is_checked():
    raw = yaml.safe_load((ROOT / "meo" / "params.yaml").read_text())
    load_params(ROOT / "meo" / "params.yaml")
    with pytest.raises(ParamsError, match=r"group.num_experts_avg=5 exceeds upcycle.num_experts=4"):
        parse_params(_set(raw, "group.num_experts_avg", 5))
    raw = yaml.safe_load((ROOT / "meo" / "params.yaml").read_text())
    with pytest.raises(ParamsError, match=r"min\(hidden_size, intermediate_size\)=384 of the checkpoint"):
        parse_params(_set(raw, "compress.rank", 384))


def test_mlflow_section():
    assert parse_params(_set(_default(), "mlflow.tracking_uri", None)).mlflow.tracking_uri is None
    assert parse_params({"model": {"config": {}}}).mlflow.tracking_uri == "sqlite:///mlflow.db"
    for key, value in (("mlflow.experiment", ""), ("mlflow.experiment", " \t"), ("mlflow.tracking_uri", "")):
        with pytest.raises(ParamsError, match=re.escape(f"{key}: is empty")):
            parse_params(_set(_default(), key, value))
