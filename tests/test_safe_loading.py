"""Loading never runs code from a checkpoint or a data file: safetensors or weights-only loads,
no pickle, and a checkpoint's own Python code only with model.trust_remote_code."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest

from pipeline.config import parse_params
from pipeline.modeling import CheckpointError, load_model

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("pipeline", "stages", "scripts", "benchmarks")
# What a checkpoint's own code does if it ever runs: leave a marker next to it.
EVIL = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('x')\n"


def _calls():
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    yield path.relative_to(ROOT), node


def _name(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, key: str):
    return next((k.value for k in call.keywords if k.arg == key), None)


def test_every_torch_load_is_weights_only():
    found = []
    for path, call in _calls():
        if _name(call.func) == "torch.load":
            value = _kw(call, "weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{call.lineno}"
            found.append(path)
    assert found, "the training checkpoint loader should be among them"


def test_no_pickle_and_remote_code_never_hard_wired_on():
    for path, call in _calls():
        name = _name(call.func)
        assert not name.startswith(("pickle.", "joblib.", "dill.")), f"{path}:{call.lineno}: {name}"
        value = _kw(call, "trust_remote_code")
        assert not (isinstance(value, ast.Constant) and value.value is True), f"{path}:{call.lineno}"
    for folder in CODE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not imported & {"pickle", "joblib", "dill", "cloudpickle"}, path


def test_trust_remote_code_is_off_by_default():
    assert parse_params({"model": {"config": {"num_experts": 8}}}).model.trust_remote_code is False


def _with_custom_code(tiny_dir: Path, folder: Path, model_type: str | None) -> Path:
    folder.mkdir()
    for f in tiny_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSeq2SeqLM": "evil.EvilModel"}
    if model_type:
        cfg["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "evil.py").write_text(EVIL)
    return folder


def test_checkpoint_needing_its_own_code_is_refused_without_running_it(tiny_dir, tmp_path):
    folder = _with_custom_code(tiny_dir, tmp_path / "custom", model_type="evil_moe")
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    msg = str(err.value)
    assert "needs its own Python code to load (evil.EvilConfig, evil.EvilModel)" in msg
    assert "model.trust_remote_code" in msg and "switch_transformers" in msg
    assert not (folder / "RAN").exists()


def test_known_family_with_an_auto_map_loads_the_stock_class_and_ignores_the_code(tiny_dir, tmp_path):
    folder = _with_custom_code(tiny_dir, tmp_path / "stock", model_type=None)
    model = load_model(folder)
    assert type(model).__module__.startswith("transformers.")
    assert not (folder / "RAN").exists()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_pickled_weights_are_never_opened(tiny_dir, tmp_path):
    folder = tmp_path / "bin_only"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_dir / "config.json").read_bytes())
    marker = tmp_path / "RAN"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"holds no weights: .*\(safetensors only\)"):
        load_model(folder)
    assert not marker.exists()


# ---------------------------------------------------------------- non-finite weights


def _poke(file: Path, name: str, value: float) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_with_non_finite_values_are_refused_naming_the_tensor(tiny_dir, tmp_path, value):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in tiny_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    _poke(folder / "model.safetensors", "decoder.final_layer_norm.weight", value)
    with pytest.raises(
        CheckpointError, match=r"weight decoder.final_layer_norm.weight holds non-finite values \(1 of 32"
    ):
        load_model(folder)


def test_saved_merged_models_with_nan_are_refused(tiny_model, tmp_path):
    from pipeline.compression import compress_model
    from pipeline.families import adapter_for
    from pipeline.modeling import save_model

    compress_model(tiny_model, adapter_for(tiny_model), rank=4, scope="all")
    save_model(tiny_model, tmp_path / "c")
    load_model(tmp_path / "c")  # finite: loads
    from safetensors.torch import load_file

    name = next(k for k in load_file(str(tmp_path / "c" / "model.safetensors")) if k.endswith(".s"))
    _poke(tmp_path / "c" / "model.safetensors", name, float("nan"))
    with pytest.raises(CheckpointError, match=f"weight {name} holds non-finite"):
        load_model(tmp_path / "c")
