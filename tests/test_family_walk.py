"""The family walk over every MoE model type of the installed transformers (see
``pipeline/family_walk.py``), and the README's family table generated from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.family_walk import family_table, moe_model_types, walk
from scripts.family_table import END, START

ROOT = Path(__file__).resolve().parents[1]
# The families the issue names, on top of the four the project started with.
REQUIRED = {
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "gpt_oss",
    "phimoe",
    "llama4_text",
    "qwen3_next",
    "qwen3_5_moe_text",
    "ernie4_5_moe",
    "granitemoe",
    "dbrx",
    "minimax",
    "jamba",
}


@pytest.fixture(scope="module")
def results():
    import transformers

    transformers.logging.set_verbosity_error()
    return walk()


def test_the_walk_covers_every_moe_type(results):
    assert [r.model_type for r in results] == moe_model_types()
    assert len(results) > 40


def test_at_least_twelve_families_pass_every_lossless_check(results):
    supported = {r.model_type for r in results if r.supported}
    assert len(supported) >= 12
    assert supported >= REQUIRED, f"not passing: {sorted(REQUIRED - supported)}"
    for r in results:
        if r.supported:
            assert set(r.checks) >= {
                "alignment",
                "identity merge",
                "full-rank compression",
                "save/reload",
                "stock reload",
            }
            assert r.modes[:2] == ["remap", "prune"]


def test_every_other_type_has_a_one_line_reason(results):
    for r in results:
        if not r.supported:
            assert r.reason and "\n" not in r.reason, r.model_type


def test_readme_family_table_is_the_walks(results):
    text = (ROOT / "README.md").read_text()
    block = text[text.index(START) + len(START) : text.index(END)].strip("\n") + "\n"
    assert block == family_table(results), "README family table is stale: run `make families`"
