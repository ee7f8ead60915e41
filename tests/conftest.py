"""Shared fixtures: tiny random-weight Switch models saved and re-loaded, fake tokenized rows."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pipeline.modeling import build_model, load_model

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_heads=4,
    num_layers=4,
    num_decoder_layers=2,
    num_experts=8,
    encoder_sparse_step=2,
    decoder_sparse_step=2,
    expert_capacity=64,
    dropout_rate=0.0,
)
VOCAB = 100


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Switch (3 SMoE layers x 8 experts) saved with save_pretrained."""
    model = build_model("switch_transformers", TINY, VOCAB, 0, 1, router_init_std=0.5, seed=0)
    folder = tmp_path_factory.mktemp("tiny_switch")
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def _tiny_loaded(tiny_dir):
    return load_model(tiny_dir)


@pytest.fixture
def tiny_model(_tiny_loaded):
    """A fresh copy of the re-loaded tiny model (tests may mutate it)."""
    return copy.deepcopy(_tiny_loaded).eval()


@pytest.fixture(scope="session")
def rows() -> list[dict]:
    """Fake tokenized examples of varying length (so batches carry padding)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(48):
        n = 3 + i % 9
        out.append(
            {
                "input_ids": torch.randint(3, VOCAB, (n,), generator=g).tolist() + [1],
                "labels": [5 + i % 2, 1],
                "label": i % 2,
            }
        )
    return out


@pytest.fixture(scope="session")
def batch(rows):
    from pipeline.data import collate

    return collate(rows[:16], pad_id=0)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=batch["labels"]),
        ).logits


def profiles_for(names, n_experts: int = 8, seed: int = 0) -> dict:
    """Routing profiles with random usage counts for the given layer names."""
    from pipeline.profiling import LayerProfile

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        counts = torch.randint(0, 50, (n_experts,), generator=g).float()
        out[name] = LayerProfile(name, counts, int(counts.sum()), torch.zeros(int(counts.sum()), n_experts))
    return out
