"""Shared fixtures: a tiny random-weight Switch model saved and re-loaded, fake tokenized rows.

Every model a test sees went through ``save_pretrained`` and :func:`pipeline.modeling.load_model`,
so the tests exercise the same loading path as the stages.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from pipeline.modeling import build_model, load_model
from pipeline.training import TrainSettings

# The offline task files live next to the checkout: <parent of repo>/shared/data.
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
PAD_ID, EOS_ID = 0, 1
# A tiny Mixtral (2 decoder layers, top-2); tests set num_local_experts.
TINY_MIXTRAL = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 64,
}
N_EXPERTS = TINY["num_experts"]
# Class targets of the fake rows: token 5 or 6, then EOS.
CLASS_TARGETS = [[5, EOS_ID], [6, EOS_ID]]


def pytest_configure(config):
    # The models are tiny: extra intra-op threads only add synchronisation overhead, and when
    # another process keeps the cores busy they make each small matmul take milliseconds.
    torch.set_num_threads(1)


def stage_env(**extra: str) -> dict[str, str]:
    """The environment for a stage or `dvc` subprocess: this interpreter first on PATH (stage
    commands say `python`), and none of the MLflow state that in-process stage runs export
    (mlflow's set_tracking_uri and set_experiment set MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID),
    so each subprocess logs to its own params' store."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return {**env, **extra}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The offline GLUE files; tests needing them are skipped when the folder is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"offline data folder {DATA_DIR} missing")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Switch (3 SMoE layers x 8 experts: 2 encoder, 1 decoder) saved with save_pretrained."""
    model = build_model("switch_transformers", TINY, VOCAB, PAD_ID, EOS_ID, router_init_std=0.02, seed=0)
    folder = tmp_path_factory.mktemp("tiny_switch")
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def _tiny_loaded(tiny_dir):
    return load_model(tiny_dir)


@pytest.fixture
def tiny_model(_tiny_loaded):
    """A fresh deep copy of the re-loaded tiny model (tests may mutate it)."""
    return copy.deepcopy(_tiny_loaded).eval()


@pytest.fixture(scope="session")
def rows() -> list[dict]:
    """Fake tokenized examples of varying length (so batches carry padding); sources end with EOS."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(48):
        n = 3 + i % 9
        out.append(
            {
                "input_ids": torch.randint(3, VOCAB, (n,), generator=g).tolist() + [EOS_ID],
                "labels": list(CLASS_TARGETS[i % 2]),
                "label": i % 2,
            }
        )
    return out


@pytest.fixture(scope="session")
def batch(rows):
    from pipeline.data import collate

    return collate(rows[:16], pad_id=PAD_ID)


def logits(model, batch) -> torch.Tensor:
    """Teacher-forced decoder logits of ``batch`` (no gradients)."""
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=batch["labels"]),
        ).logits


def backward(model, batch) -> None:
    """Fresh gradients of the seq2seq loss on ``batch`` (what the pruner scores columns by)."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()


def profiles_for(names, n_experts: int = N_EXPERTS, seed: int = 0) -> dict:
    """Routing profiles with random usage counts for the given layer names."""
    from pipeline.profiling import LayerProfile

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        counts = torch.randint(0, 50, (n_experts,), generator=g).float()
        out[name] = LayerProfile(name, counts, int(counts.sum()), torch.zeros(int(counts.sum()), n_experts))
    return out


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A prepared sst2 folder as the prepare stage writes it: tokenizer, task.json, 8 rows per split."""
    from pipeline.data import Example, tokenize_split, train_bpe_tokenizer, write_jsonl

    folder = tmp_path_factory.mktemp("prepared")
    tok = train_bpe_tokenizer(
        ["a fine film", "dull", "great acting", "weak plot"] * 10, 300, ["negative", "positive"]
    )
    tok.save_pretrained(str(folder / "tokenizer"))
    (folder / "task.json").write_text(
        json.dumps({"task": "sst2", "label_words": ["negative", "positive"], "metric": "accuracy"})
    )
    examples = [Example(f"sst2 sentence: {t}", "positive", 1) for t in ("a fine film", "great acting")] * 4
    rows = tokenize_split(tok, examples, 16)
    for split in ("train", "dev"):
        write_jsonl(rows, folder / f"{split}.jsonl")
    return folder


def train_settings(**overrides) -> TrainSettings:
    """Fine-tuning settings for the tiny models (one epoch, small batches), with ``overrides``."""
    base = dict(
        epochs=1,
        batch_size=16,
        eval_batch_size=16,
        lr=3e-3,
        weight_decay=0.0,
        warmup_steps=1,
        max_grad_norm=1.0,
        router_z_loss_coef=1e-3,
        router_aux_loss_coef=1e-3,
        eval_every_epochs=1.0,
    )
    return TrainSettings(**{**base, **overrides})


@pytest.fixture(scope="session")
def wiki_valid(data_dir) -> str:
    """WikiText-2 valid, read from the offline data folder."""
    from pipeline.zeroshot import load_wikitext

    return load_wikitext(data_dir, "valid")


@pytest.fixture(scope="session")
def wiki_tokenizer(wiki_valid):
    """Byte-level BPE (no bos token) trained on the first lines of WikiText-2 valid."""
    from pipeline.data import train_bpe_tokenizer

    lines = [line for line in wiki_valid.splitlines() if line.strip()][:300]
    return train_bpe_tokenizer(lines, vocab_size=500, extra_tokens=[])


@pytest.fixture(scope="session")
def wiki_lm(wiki_tokenizer):
    """A random 2-layer Mixtral (4 experts, top-2) over the tokenizer's vocabulary (do not mutate)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=len(wiki_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return MixtralForCausalLM(config).eval()


def run_decoder_stages(params: Path, out: Path, *evaluate_args: str) -> None:
    """Every stage of ``llm/dvc.yaml`` in-process on ``params``, each output a folder of ``out``
    (``evaluate_args``: extra arguments of evaluate, e.g. its predictions file)."""
    from stages import align, compress, evaluate, finetune, group, kd_finetune, merge, prepare, profile

    def run(stage, *argv):
        name = stage.__name__.split(".")[-1]
        stage.main(["--params", str(params), "--metrics", str(out / f"{name}.json"), *argv])

    d = out
    run(prepare, "--out", str(d / "data"))
    run(finetune, "--data", str(d / "data"), "--out", str(d / "full"))
    run(profile, "--data", str(d / "data"), "--model", str(d / "full"), "--out", str(d / "profile"))
    run(align, "--data", str(d / "data"), "--model", str(d / "full"), "--profile", str(d / "profile"),
        "--out", str(d / "aligned"))  # fmt: skip
    run(group, "--model", str(d / "aligned"), "--profile", str(d / "profile"), "--out", str(d / "groups"))
    run(merge, "--model", str(d / "aligned"), "--profile", str(d / "profile"),
        "--groups", str(d / "groups" / "groups.json"), "--out", str(d / "merged"))  # fmt: skip
    run(compress, "--model", str(d / "merged"), "--full", str(d / "full"), "--out", str(d / "compressed"),
        "--out-c", str(d / "c_compressed"))  # fmt: skip
    run(kd_finetune, "--data", str(d / "data"), "--teacher", str(d / "full"), "--merged", str(d / "merged"),
        "--compressed", str(d / "compressed"), "--compressed-full", str(d / "c_compressed"),
        "--out-m-smoe", str(d / "m_smoe"), "--out-mc-smoe", str(d / "mc_smoe"), "--out-c-smoe", str(d / "c_smoe"))  # fmt: skip
    run(evaluate, "--data", str(d / "data"), "--full", str(d / "full"), "--merged", str(d / "merged"),
        "--m-smoe", str(d / "m_smoe"), "--mc-smoe", str(d / "mc_smoe"), "--c-smoe", str(d / "c_smoe"),
        *evaluate_args)  # fmt: skip
