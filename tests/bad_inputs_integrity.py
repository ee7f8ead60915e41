"""Bad-input cases: weights, tokenizers and data that would give silently wrong results: non-finite values, empty tokenizers, size mismatches."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from stages import finetune, kd_finetune, prepare
from tests.bad_input_harness import GOOD_TSV, Case, Ctx, checkpoint_setup, data_files

HEADER = "sentence\tlabel\n"
JUNK_WORDS = [f"zq{i}x" for i in range(40)]  # a WordPiece vocab that knows no English word


def _prepared_vocab(ctx: Ctx) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(ctx.prepared / "tokenizer")))


def _tiny(vocab: int, seed: int = 0):
    from pipeline.modeling import build_model
    from tests.conftest import EOS_ID, PAD_ID, TINY

    return build_model("switch_transformers", TINY, vocab, PAD_ID, EOS_ID, 0.02, seed=seed)


def _edit_weights(file: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _set_nan(tensors: dict, name: str | None = None) -> None:
    key = name or next(k for k, t in tensors.items() if t.is_floating_point() and t.dim() > 1)
    tensors[key].view(-1)[3] = float("nan")


def _nan_checkpoint(ctx: Ctx):
    folder = ctx.copy_of(ctx.tiny_dir, "ckpt")
    _edit_weights(
        folder / "model.safetensors", lambda t: _set_nan(t, "encoder.block.1.layer.0.SelfAttention.k.weight")
    )
    return checkpoint_setup(ctx, folder)


def _flipped_bytes(ctx: Ctx):
    # The case a user met: 1,000 bytes of a weight file overwritten (all bits set reads as NaN).
    folder = ctx.copy_of(ctx.tiny_dir, "ckpt")
    file = folder / "model.safetensors"
    raw = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little") + 4096
    raw[start : start + 1000] = b"\xff" * 1000
    file.write_bytes(bytes(raw))
    return checkpoint_setup(ctx, folder)


def _huge_weights(ctx: Ctx):
    # Finite weights, so they load; the loss (or its gradient) overflows at the first step.
    model = _tiny(_prepared_vocab(ctx))
    model.decoder.final_layer_norm.weight.data.mul_(1e37)
    model.save_pretrained(str(ctx.tmp / "huge"))
    return checkpoint_setup(ctx, ctx.tmp / "huge")


def _built(ctx: Ctx, **overrides):
    from tests.conftest import TINY

    p = ctx.params(**{"model.config": TINY, "model.init_embeddings_from": None, **overrides})
    return p, ["--data", str(ctx.prepared)]


def _kd_stage(argv: list[str]) -> None:
    # The harness names one output (--out); kd_finetune writes three, the first being M-SMoE's.
    i = argv.index("--out")
    kd_finetune.main([*argv[:i], "--out-m-smoe", *argv[i + 1 :]])


def _kd_inputs(ctx: Ctx, vocab: int | None = None, teacher_edit=None, merged_edit=None, **overrides):
    """Teacher, merged, compressed and compressed-full models as the earlier stages save them."""
    from pipeline.compression import compress_model
    from pipeline.families import adapter_for
    from pipeline.merging import merge_model
    from pipeline.modeling import save_model
    from tests.conftest import profiles_for

    teacher = _tiny(vocab or _prepared_vocab(ctx))
    adapter = adapter_for(teacher)
    names = [ly.name for ly in adapter.sparse_layers(teacher)][1:]
    groups = {"layers": {n: {"merged": True, "groups": [[0, 1, 2, 3], [4, 5, 6, 7]]} for n in names}}
    merged = copy.deepcopy(teacher)
    merge_model(merged, adapter, groups, profiles_for(names), "frequency")
    compressed = copy.deepcopy(merged)
    compress_model(compressed, adapter, rank=4)
    full = copy.deepcopy(teacher)
    compress_model(full, adapter, rank=4, scope="all")
    folders = {}
    for name, model in (("teacher", teacher), ("merged", merged), ("compressed", compressed), ("full", full)):
        folders[name] = ctx.tmp / name
        save_model(model, folders[name])
    for name, edit in (("teacher", teacher_edit), ("merged", merged_edit)):
        if edit is not None:
            _edit_weights(folders[name] / "model.safetensors", edit)
    args = [
        "--data",
        str(ctx.prepared),
        "--teacher",
        str(folders["teacher"]),
        "--merged",
        str(folders["merged"]),
    ]
    args += ["--compressed", str(folders["compressed"]), "--compressed-full", str(folders["full"])]
    args += ["--out-mc-smoe", str(ctx.tmp / "out_mc"), "--out-c-smoe", str(ctx.tmp / "out_c")]
    return ctx.params(**overrides), args


def _scale(factor: float):
    def edit(tensors: dict) -> None:
        key = "decoder.final_layer_norm.weight"
        tensors[key] = tensors[key] * factor

    return edit


def _bert_source(ctx: Ctx, vocab_words: list[str] | None):
    """A BERT folder to take embeddings from, with no tokenizer or a degenerate one."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = ctx.tmp / "source"
    cfg = BertConfig(
        vocab_size=64, hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertModel(cfg).save_pretrained(str(folder))
    if vocab_words is not None:
        (ctx.tmp / "vocab.txt").write_text(
            "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *vocab_words]) + "\n"
        )
        BertTokenizer(str(ctx.tmp / "vocab.txt")).save_pretrained(str(folder))
    return _built(ctx, **{"model.init_embeddings_from": str(folder)})


def _prepared_tokenizer(ctx: Ctx, vocab_words: list[str] | None):
    """A copy of the prepared folder whose tokenizer folder is empty, or holds a degenerate tokenizer."""
    from transformers import BertTokenizer

    folder = ctx.copy_of(ctx.prepared, "prepared")
    (folder / "tokenizer").mkdir()
    if vocab_words is not None:
        (ctx.tmp / "vocab.txt").write_text(
            "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *vocab_words]) + "\n"
        )
        BertTokenizer(str(ctx.tmp / "vocab.txt")).save_pretrained(str(folder / "tokenizer"))
    return ctx.params(), ["--data", str(folder)]


def _tokenizer_json_only_vocab(ctx: Ctx):
    folder = ctx.copy_of(ctx.prepared, "prepared")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<unk>"}))
    return ctx.params(), ["--data", str(folder)]


CASES: list[Case] = [
    # ------------------------------------------------------------ non-finite weights at load
    Case(
        "checkpoint with a NaN tensor",
        finetune.main,
        _nan_checkpoint,
        ("weight encoder.block.1.layer.0.SelfAttention.k.weight holds non-finite values (1 of", "NaN/inf"),
    ),
    Case(
        "checkpoint with 1000 bytes overwritten",
        finetune.main,
        _flipped_bytes,
        ("ckpt: weight ", "holds non-finite values", "the weight file is corrupt"),
    ),
    Case(
        "teacher with a NaN tensor",
        _kd_stage,
        lambda c: _kd_inputs(c, teacher_edit=_set_nan),
        ("teacher: weight ", "holds non-finite values"),
    ),
    Case(
        "merged model with a NaN tensor",
        _kd_stage,
        lambda c: _kd_inputs(c, merged_edit=_set_nan),
        ("merged: weight ", "holds non-finite values", "re-run the stage that wrote it"),
    ),
    # ------------------------------------------------------------ non-finite loss in training
    Case(
        "weights so large the loss overflows",
        finetune.main,
        _huge_weights,
        ("training diverged: ", "at step 1/2 (epoch 1)", "learning rate too high", "huge weights"),
    ),
    Case(
        "learning rate that blows up the weights",
        finetune.main,
        lambda c: _built(c, **{"finetune.lr": 1e30}),
        ("training diverged:", "(epoch ", "lr=1e+30"),
    ),
    Case(
        # Every prepared dev example is positive: no classifier beats always answering "positive".
        "fine-tuned model no better than the majority class, required to be",
        finetune.main,
        # A checkpoint every step: the refused run leaves none behind either.
        lambda c: _built(c, **{"finetune.require_above_baseline": True, "checkpoints.every_steps": 1}),
        (
            "does not beat the majority baseline 100.00% (always 'positive', 8 dev examples",
            "set finetune.require_above_baseline: false to keep it anyway",
        ),
    ),
    Case(
        "teacher whose logits overflow in KD",
        _kd_stage,
        lambda c: _kd_inputs(c, teacher_edit=_scale(3e38)),
        ("training diverged: ", "at step 1/1 (epoch 1)", "non-finite or huge weights"),
    ),
    Case(
        "KD learning rate that blows up the student",
        _kd_stage,
        lambda c: _kd_inputs(c, **{"kd.train.lr": 1e30, "kd.train.epochs": 2}),
        ("training diverged:", "at step 2/2 (epoch 2)", "lr=1e+30"),
    ),
    # ------------------------------------------------------------ tokenizers
    Case(
        "embedding source without tokenizer files",
        finetune.main,
        lambda c: _bert_source(c, None),
        ("source holds no tokenizer files", "model.init_embeddings_from must be a model folder"),
    ),
    Case(
        "embedding source with an empty tokenizer",
        finetune.main,
        lambda c: _bert_source(c, []),
        ("source: the tokenizer has only 5 tokens (0 besides its special tokens)", "cannot tell words apart"),
    ),
    Case(
        "prepared tokenizer folder empty",
        finetune.main,
        lambda c: _prepared_tokenizer(c, None),
        (
            "no tokenizer in",
            "prepared/tokenizer (expected any of tokenizer.json",
            "run the prepare stage again",
        ),
    ),
    Case(
        "prepared tokenizer reads everything as unk",
        finetune.main,
        lambda c: _prepared_tokenizer(c, JUNK_WORDS),
        ("reads every word of 'the quick brown fox", "as its unknown token", "run the prepare stage again"),
    ),
    Case(
        "prepared tokenizer with a special-tokens file only",
        finetune.main,
        _tokenizer_json_only_vocab,
        ("no tokenizer in", "run the prepare stage again"),
    ),
    # ------------------------------------------------------------ tokenizer vs embedding sizes
    Case(
        "prepared data from a bigger tokenizer than the checkpoint",
        finetune.main,
        lambda c: checkpoint_setup(c, c.tiny_dir),
        (
            "the prepared train split holds token id",
            "the model's embedding table has 100 rows",
            "re-run prepare",
        ),
    ),
    Case(
        "KD on data from a bigger tokenizer than the models",
        _kd_stage,
        lambda c: _kd_inputs(c, vocab=100),
        ("holds token id", "embedding table has 100 rows (vocab size 100)", "data.tokenizer_vocab_size"),
    ),
    # ------------------------------------------------------------ header-only splits
    Case(
        "header-only train split",
        prepare.main,
        data_files({"train.tsv": HEADER, "dev.tsv": GOOD_TSV}),
        ("task 'sst2': split 'train' is empty:", "train.tsv holds only its header row"),
    ),
    Case(
        "header-only dev split",
        prepare.main,
        data_files({"train.tsv": GOOD_TSV, "dev.tsv": HEADER}),
        ("split 'dev' is empty:", "SST-2/dev.tsv holds only its header row"),
    ),
    Case(
        "header-only test split",
        prepare.main,
        data_files({"train.tsv": GOOD_TSV, "dev.tsv": GOOD_TSV, "test_labeled.tsv": HEADER}),
        ("split 'test' is empty:", "test_labeled.tsv holds only its header row", "remove the file"),
    ),
]
