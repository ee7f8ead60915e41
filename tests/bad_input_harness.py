"""The harness of the bad-input catalogue: a scratch context and the case record.

The catalogue itself is ``tests/test_bad_inputs.py`` plus the ``CASES`` lists of the
``tests/bad_inputs_*.py`` modules it collects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SST2 = Path("glue") / "SST-2"


@dataclass
class Ctx:
    """What a case may use: a scratch folder and valid upstream outputs to break one at a time."""

    tmp: Path
    tiny_dir: Path
    prepared: Path
    profile_dir: Path
    monkeypatch: pytest.MonkeyPatch
    overrides: dict = field(default_factory=dict)

    def params(self, **overrides) -> Path:
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        for dotted, value in {**self.overrides, **overrides}.items():
            node = raw
            *parents, leaf = dotted.split(".")
            for k in parents:
                node = node.setdefault(k, {})
            node[leaf] = value
        raw["mlflow"]["tracking_uri"] = f"sqlite:///{self.tmp / 'mlflow.db'}"
        path = self.tmp / "params.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    def copy_of(self, folder: Path, name: str) -> Path:
        dst = self.tmp / name
        dst.mkdir()
        for f in folder.iterdir():
            (dst / f.name).write_bytes(f.read_bytes()) if f.is_file() else None
        return dst

    def data_dir(self, files: dict[str, str]) -> None:
        folder = self.tmp / "data"
        for name, content in files.items():
            (folder / SST2).mkdir(parents=True, exist_ok=True)
            (folder / SST2 / name).write_text(content)
        self.monkeypatch.setenv("SMOE_DATA_DIR", str(folder))


@dataclass
class Case:
    id: str
    stage: Callable
    # Sets up the bad input; returns the params file and the stage's extra arguments.
    setup: Callable[[Ctx], tuple[Path, list[str]]]
    expect: tuple[str, ...]


def checkpoint_setup(ctx: Ctx, folder: Path) -> tuple[Path, list[str]]:
    p = ctx.params(
        **{"model.name_or_path": str(folder), "model.config": None, "model.init_embeddings_from": None}
    )
    return p, ["--data", str(ctx.prepared)]


def prepared_with(ctx: Ctx, name: str, content: str):
    folder = ctx.copy_of(ctx.prepared, "prepared")
    (folder / "tokenizer").mkdir()
    for f in (ctx.prepared / "tokenizer").iterdir():
        (folder / "tokenizer" / f.name).write_bytes(f.read_bytes())
    (folder / name).write_text(content)
    return ctx.params(), ["--data", str(folder)]


def model_args(ctx: Ctx, profile_dir: Path, **extra: str) -> list[str]:
    args = ["--model", str(ctx.tiny_dir), "--profile", str(profile_dir)]
    for k, v in extra.items():
        args += [f"--{k}", v]
    return args


def params_text(ctx: Ctx, text: str):
    path = ctx.tmp / "params.yaml"
    path.write_text(text)
    return path, []


def set_params(**overrides):
    return lambda ctx: (ctx.params(**{k.replace("__", "."): v for k, v in overrides.items()}), [])


def data_files(files: dict[str, str]):
    def setup(ctx: Ctx):
        ctx.data_dir(files)
        return ctx.params(), []

    return setup


GOOD_TSV = "sentence\tlabel\na fine film\t1\ndull\t0\n"
