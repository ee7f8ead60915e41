"""Embedding transfer from a pretrained dense model (here a tiny random BERT saved to disk)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from pipeline.data import train_bpe_tokenizer
from pipeline.modeling import CheckpointError, build_model, transfer_embeddings
from tests.conftest import TINY

WORDS = ["good", "bad", "movie", "film", "great", "awful", "the", "a", "plot", "acting"]


@pytest.fixture(scope="module")
def dense_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(str(folder))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertModel(cfg).save_pretrained(str(folder))
    return folder, vocab


def _switch(tok, tie: bool):
    cfg = {**TINY, "tie_word_embeddings": tie}
    return build_model("switch_transformers", cfg, len(tok), tok.pad_token_id, tok.eos_token_id, 0.02, 0)


@pytest.mark.parametrize("tie", [True, False])
def test_transfer_fills_every_input_table(dense_source, tie):
    folder, _ = dense_source
    tok = train_bpe_tokenizer([" ".join(WORDS)] * 50, 300, ["negative", "positive"])
    model = _switch(tok, tie)
    report = transfer_embeddings(model, tok, folder)
    assert report["tokens_total"] == len(tok)
    assert 0 < report["tokens_covered"] <= len(tok)
    emb = model.get_input_embeddings().weight
    assert emb.shape == (len(tok), TINY["d_model"])
    assert torch.isclose(emb.std(), torch.tensor(1.0), atol=1e-3)
    # Untied encoder/decoder tables are what the stacks read: they must carry the same vectors.
    assert torch.equal(model.get_encoder().get_input_embeddings().weight, emb)
    assert torch.equal(model.get_decoder().get_input_embeddings().weight, emb)


def test_transfer_rejects_unknown_source():
    tok = train_bpe_tokenizer(["a b c"] * 10, 300, [])
    with pytest.raises(CheckpointError, match="neither a local model folder nor an installed package"):
        transfer_embeddings(_switch(tok, True), tok, "no-such-package-xyz")
