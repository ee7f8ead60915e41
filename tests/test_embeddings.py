"""Embedding transfer from a pretrained dense model (here a tiny random BERT saved to disk)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from pipeline.data import train_bpe_tokenizer
from pipeline.modeling import CheckpointError, build_model, transfer_embeddings

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


def test_transfer_copies_word_geometry(dense_source):
    folder, vocab = dense_source
    tok = train_bpe_tokenizer([" ".join(WORDS)] * 50, 300, ["negative", "positive"])
    cfg = dict(
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        num_experts=4,
        encoder_sparse_step=2,
        decoder_sparse_step=2,
    )
    model = build_model("switch_transformers", cfg, len(tok), tok.pad_token_id, tok.eos_token_id, 0.02, 0)
    report = transfer_embeddings(model, tok, folder)
    assert report["tokens_total"] == len(tok)
    assert 0 < report["tokens_covered"] <= len(tok)
    emb = model.get_input_embeddings().weight
    assert emb.shape == (len(tok), 16)
    assert torch.isclose(emb.std(), torch.tensor(1.0), atol=1e-3)
    # Two tokens that map to the same source word get the same vector.
    good = [i for i in range(len(tok)) if tok.decode([i]).strip() == "good"]
    assert good, "the BPE vocabulary should hold the word 'good'"


def test_transfer_rejects_unknown_source():
    tok = train_bpe_tokenizer(["a b c"] * 10, 300, [])
    cfg = dict(
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        num_experts=4,
        encoder_sparse_step=2,
        decoder_sparse_step=2,
    )
    model = build_model("switch_transformers", cfg, len(tok), tok.pad_token_id, tok.eos_token_id, 0.02, 0)
    with pytest.raises(CheckpointError, match="neither a local model folder nor an installed package"):
        transfer_embeddings(model, tok, "no-such-package-xyz")
