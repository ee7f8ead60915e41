"""Layer-streamed align -> merge -> compress of a safetensors checkpoint larger than memory.

The in-memory stages load the whole model; this module never does. The model's skeleton is built
on the meta device from the folder's config, so the family adapter finds the SMoE layers and their
parameter names exactly as in memory. Then, one SMoE layer at a time, only that layer's block is
materialised on the CPU from the checkpoint's shards and the same library code the stages run is
applied to it (:func:`~pipeline.align.align_model` restricted to the layer,
:func:`~pipeline.merging.merge_model` with the layer's groups, the router mode of
:func:`~pipeline.routing.set_router_mode` and the per-layer step of
:func:`~pipeline.compression.compress_model`); its resulting tensors are written and the block goes
back to its meta form before the next one. Every other tensor is copied from the input shards to
the output one at a time. Peak memory is about two layers of experts, whatever the depth.

The output is what :func:`pipeline.modeling.save_model` writes for the same model: weights in
shards of at most ``max_shard_size`` with ``model.safetensors.index.json`` (keys as the modules
name them), the config (with the stock overrides of a uniform pruned merge, so stock
``AutoModelForCausalLM.from_pretrained`` loads it), the structure file of merged layers, and the
tokenizer files of the input; :func:`pipeline.modeling.load_model` reads it back like the
in-memory result. It is written into a temporary sibling folder that replaces ``out`` only when
everything succeeded (:func:`~pipeline.modeling.atomic_dir`).

Checkpoints in a family's original layout (Mixtral's ``block_sparse_moe.experts.N.w1``, Qwen's
``mlp.experts.N.gate_proj``) are converted on the fly with transformers' own conversion mapping of
the family, for mappings made of renamings and the stacking/concatenation of per-expert tensors
(``MergeModulelist``, ``Concatenate``); a family whose mapping needs any other operation is refused
by name before any work.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from pipeline.align import ALIGNERS, align_model
from pipeline.assignment import DEFAULT_SETTINGS, SOLVERS, SolverPool, SolverSettings
from pipeline.compression import SCOPES, as_identity_merged
from pipeline.data import read_json
from pipeline.families import ModelStructureError, MoEAdapter, adapter_for, set_submodule
from pipeline.families.decoder import DecoderAdapter
from pipeline.grouping import validate_groups
from pipeline.merging import MERGE_STRATEGIES, REPAIRS, merge_model
from pipeline.modeling import (
    PARAMS_FILE,
    STRUCTURE_FILE,
    CheckpointError,
    atomic_dir,
    check_finite_weights,
    config_dtype,
    config_slot,
    custom_code_modules,
    default_dtype,
)
from pipeline.profiling import LayerProfile, load_profile
from pipeline.routing import ROUTER_MODES
from pipeline.shards import (
    CheckpointReader,
    ShardWriter,
    natural_key,
    parse_size,
    trim_heap,
)

#: Methods that work on one layer from its own weights and its routing profile. Every other
#: registered method is refused before any work (it may need the whole model).
STREAM_ALIGNERS = ("weight-matching", "activation-matching", "none")
STREAM_STRATEGIES = ("frequency", "uniform", "dominant", "fisher", "zipit")
STREAM_REPAIRS = ("none", "repair")
#: transformers conversion operations the streamed reader applies itself.
STREAM_OPS = ("MergeModulelist", "Concatenate")
#: Files of a tokenizer, copied from the input folder as they are.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class _Target:
    """One tensor of the model and how it is read: one stored tensor under another name, or a
    conversion (``converter``) of several (``sources``: per source pattern, stored names)."""

    name: str
    source: str | None = None
    converter: object = None
    sources: dict[str, list[str]] = field(default_factory=dict)

    def stored_names(self) -> list[str]:
        if self.source is not None:
            return [self.source]
        return [n for names in self.sources.values() for n in names]


def _conversions(model: nn.Module) -> tuple[list, list]:
    """The family's checkpoint renamings and converters as transformers applies them on load."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # a transformers without conversion mappings loads keys as stored
        return [], []
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def _plan_targets(model: nn.Module, names: list[str]) -> dict[str, _Target]:
    """Model tensor name -> how to read it from the stored ``names`` (transformers' renaming rules).
    Stored tensors the model does not have are left out, as loading drops them."""
    from transformers.core_model_loading import rename_source_key

    renamings, converters = _conversions(model)
    meta_state = model.state_dict()
    targets: dict[str, _Target] = {}
    for stored in sorted(names, key=natural_key):
        name, pattern = rename_source_key(
            stored, renamings, converters, getattr(model, "base_model_prefix", None), meta_state
        )
        if name not in meta_state:
            continue
        if pattern is None:
            targets[name] = _Target(name, source=stored)
            continue
        conv = next(c for c in converters if pattern in c.source_patterns)
        unsupported = [type(op).__name__ for op in conv.operations if type(op).__name__ not in STREAM_OPS]
        if unsupported:
            raise ModelStructureError(
                f"model type {model.config.model_type!r}: its checkpoint layout converts {name} with "
                f"{', '.join(unsupported)}, which streaming does not apply; supported conversions: "
                f"{', '.join(STREAM_OPS)} (e.g. mixtral, qwen2_moe); save the model with "
                "pipeline.modeling.save_model first"
            )
        t = targets.setdefault(name, _Target(name, converter=conv))
        t.sources.setdefault(pattern, []).append(stored)
    return targets


def _read_target(reader: CheckpointReader, target: _Target) -> torch.Tensor:
    stored = reader.read(target.stored_names())
    if target.source is not None:
        return stored[target.source]
    conv = target.converter
    # The order transformers uses: source patterns as the converter lists them, each pattern's
    # tensors in natural key order (expert 0, 1, ...).
    data = {
        p: [stored.pop(n) for n in sorted(target.sources[p], key=natural_key)]
        for p in conv.source_patterns
        if p in target.sources
    }
    del stored
    for op in conv.operations:
        data = op.convert(data, source_patterns=conv.source_patterns, target_patterns=conv.target_patterns)
    if len(data) != 1:
        raise CheckpointError(
            f"{reader.folder}: converting to {target.name} gave {len(data)} tensors, not one"
        )
    return next(iter(data.values())).contiguous()


# ------------------------------------------------------------------------------------ the model


def _load_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        code = custom_code_modules(folder)
        if code:
            raise CheckpointError(
                f"{folder} needs its own Python code to load ({code}); streaming does not run it"
            ) from None
        raise CheckpointError(f"cannot read the config of {folder}: {err}") from None


def meta_skeleton(config) -> tuple[nn.Module, MoEAdapter]:
    """The model of ``config`` on the meta device, in the dtype the config records, and its adapter."""
    adapter = adapter_for(config)
    if not isinstance(adapter, DecoderAdapter):
        raise ModelStructureError(
            f"model type {config.model_type!r}: streaming takes decoder families (mixtral, qwen2_moe, "
            "deepseek_v2, ...); load this model whole with pipeline.modeling.load_model"
        )
    with default_dtype(config_dtype(config)), torch.device("meta"):
        model = adapter.model_class()(config)
    model.eval()
    if not adapter.sparse_layers(model):
        raise ModelStructureError(
            "the model has no SMoE layer (no sparse/expert MLP found); nothing to merge"
        )
    return model, adapter


def _tied_duplicates(model: nn.Module) -> set[str]:
    """Names of parameters that are the same object as an earlier one (not stored on save)."""
    seen, dup = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            dup.add(name)
        seen.add(id(p))
    return dup


class _Shell(nn.Module):
    """A module holding only ``block`` at its path ``name``: a one-layer view of the model."""

    def __init__(self, name: str, block: nn.Module) -> None:
        super().__init__()
        *parents, leaf = name.split(".")
        node: nn.Module = self
        for part in parents:
            child = nn.Module()
            node.add_module(part, child)
            node = child
        node.add_module(leaf, block)


def _uniform_profiles(model: nn.Module, adapter: MoEAdapter) -> dict[str, LayerProfile]:
    out = {}
    for ly in adapter.sparse_layers(model):
        n = adapter.num_experts(ly)
        out[ly.name] = LayerProfile(ly.name, torch.ones(n), n, torch.zeros(0, n))
    return out


def _check_methods(align: str, strategy: str, repair: str, router: str, scope: str) -> None:
    for what, value, allowed, registry in (
        ("align.method", align, STREAM_ALIGNERS, ALIGNERS),
        ("merge.strategy", strategy, STREAM_STRATEGIES, MERGE_STRATEGIES),
        ("merge.repair", repair, STREAM_REPAIRS, REPAIRS),
    ):
        if value not in allowed:
            known = "" if value in registry else " (not a registered method)"
            raise ValueError(
                f"{what}={value}{known} is not supported by layer streaming (it may need the whole "
                f"model); supported: {', '.join(allowed)}"
            )
    ROUTER_MODES.get(router)
    SCOPES.get(scope)


def _check_inputs(
    model: nn.Module,
    adapter: MoEAdapter,
    groups: dict | None,
    profiles: dict[str, LayerProfile],
    profiled: bool,
    align: str,
    strategy: str,
    repair: str,
    router: str,
    rank: int | None,
) -> None:
    """Everything that can be checked on the skeleton, before any tensor is read."""
    layers = adapter.sparse_layers(model)
    n_exp = {ly.name: adapter.num_experts(ly) for ly in layers}
    merged = []
    if groups is not None:
        if not isinstance(groups, dict) or not isinstance(groups.get("layers"), dict):
            raise ValueError("groups file has no 'layers' mapping; run the group stage again")
        unknown = sorted(set(groups["layers"]) - set(n_exp), key=natural_key)
        if unknown:
            raise ValueError(
                f"groups name layer {unknown[0]}, which the model does not have; its SMoE layers: "
                f"{', '.join(list(n_exp)[:3])}{' ...' if len(n_exp) > 3 else ''}"
            )
        validate_groups(groups, n_exp)
        merged = [n for n, spec in groups["layers"].items() if spec.get("merged")]
    needs = []
    if align == "activation-matching":
        needs.append(("align.method=activation-matching", "inputs", list(n_exp)))
    if strategy == "zipit":
        needs.append(("merge.strategy=zipit", "inputs", merged))
    if repair == "repair":
        needs.append(("merge.repair=repair", "inputs", merged))
    if strategy == "fisher":
        needs.append(("merge.strategy=fisher", "fisher", merged))
    for what, attr, names in needs:
        for name in names:
            value = getattr(profiles[name], attr)
            if not profiled or value is None or (attr == "inputs" and len(value) < 2):
                raise ValueError(
                    f"{what} needs the profiled layer {attr} of {name}"
                    + ("" if profiled else " (no routing profile was given)")
                )
    by_name = {ly.name: ly for ly in layers}
    make = ROUTER_MODES.get(router)
    for name in merged:
        spec = groups["layers"][name]
        expert_map = [0] * n_exp[name]
        for g, members in enumerate(spec["groups"]):
            for e in members:
                expert_map[int(e)] = g
        plan = make(expert_map, [int(m[0]) for m in spec["groups"]])
        why = adapter.router_mode_refusal(router, plan, by_name[name])
        if why:
            raise ModelStructureError(f"{name}: {why}")
    if rank is not None:
        dims = [min(w.shape) for ly in layers for w in adapter.expert_weights(ly, 0).values() if w.dim() == 2]
        if not isinstance(rank, int) or rank < 1 or rank >= min(dims):
            raise ValueError(
                f"compress.rank={rank} must be at least 1 and below the smallest expert matrix dimension {min(dims)}"
            )


def _materialise(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Put a CPU copy of the meta block ``name`` holding ``tensors`` (its state dict) into ``model``."""
    meta_block = model.get_submodule(name)
    live = copy.deepcopy(meta_block)
    expected = live.state_dict()
    local = {}
    for k, meta in expected.items():
        t = tensors.pop(f"{name}.{k}")
        if tuple(t.shape) != tuple(meta.shape):
            raise CheckpointError(
                f"{name}.{k}: stored shape {tuple(t.shape)}, the config gives {tuple(meta.shape)}"
            )
        local[k] = t if t.dtype == meta.dtype else t.to(meta.dtype)
    live.load_state_dict(local, strict=True, assign=True)
    left = [n for n, t in [*live.named_parameters(), *live.named_buffers()] if t.is_meta]
    if left:
        raise ModelStructureError(
            f"{name}.{left[0]} is not stored in the checkpoint (a non-persistent buffer); streaming "
            "cannot build it"
        )
    set_submodule(model, name, live)
    return meta_block


def _set_router(adapter: MoEAdapter, layer, mode: str) -> dict:
    """:func:`pipeline.routing.set_router_mode` for one merged layer."""
    state = adapter.merged_routing(layer)
    plan = ROUTER_MODES.get(mode)(state["expert_map"], state["dominant"])
    adapter.set_router(layer, plan, mode)
    return {"router_outputs": plan.outputs, "experts": adapter.num_experts(layer)}


def _compress(model: nn.Module, adapter: MoEAdapter, layer, rank: int, scope: str) -> dict | None:
    """The step :func:`pipeline.compression.compress_model` takes for one layer."""
    if not SCOPES.get(scope)(adapter, layer):
        return None
    was_merged = adapter.merged_routing(layer) is not None
    if not was_merged:
        as_identity_merged(model, adapter, layer)
    adapter.compress_layer(layer, rank)
    return {"experts": adapter.num_experts(layer), "rank": rank, "merged": was_merged}


def _write_config(model: nn.Module, folder: Path, src: Path, overrides: dict | None) -> None:
    config = copy.deepcopy(model.config)
    for key, value in (overrides or {}).items():
        obj, leaf = config_slot(config, key)
        if hasattr(obj, leaf):
            setattr(obj, leaf, value)
    config.save_pretrained(str(folder))
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", folder / "generation_config.json")


def stream_merge(
    model: str | Path,
    out: str | Path,
    groups: dict | str | Path | None = None,
    profile: str | Path | dict[str, LayerProfile] | None = None,
    *,
    align: str = "weight-matching",
    reference: str = "first",
    include_wo: bool = True,
    solver: str = "exact",
    settings: SolverSettings = DEFAULT_SETTINGS,
    workers: int | str | None = 1,
    min_gain: float = 0.0,
    device: torch.device | str | None = None,
    strategy: str = "frequency",
    repair: str = "none",
    router: str = "remap",
    rank: int | None = None,
    scope: str = "merged",
    max_shard_size: int | str = "2GB",
    params: dict | None = None,
    extra: dict | Callable[[dict], dict] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Align (``align``, ``reference``, ``include_wo``, ``solver``, ``settings``,
    ``workers``, ``min_gain``: align params; ``device``: where similarities are built), merge (``groups``: the group
    stage's JSON or its dict, None for no merge; ``strategy``, ``repair``, ``router``: merge params)
    and compress (``rank``: None for no compression; ``scope``) the checkpoint folder ``model``
    layer by layer into the folder ``out``, as the align, merge and compress stages would in memory.

    ``profile``: the profile stage's folder (or :func:`~pipeline.profiling.load_profile`'s dict);
    None for uniform usage, where no method needs profiled inputs or Fisher diagonals.
    ``params``/``extra``: written like :func:`~pipeline.modeling.save_model` writes them; ``extra``
    may be a function of the per-layer report (``{"layers": ...}``) returning the files to write.
    Bad input (an unsupported method, a missing shard, groups of a layer the model lacks) raises a
    one-line error before any tensor is read, and ``out`` is left as it was. Returns a report:
    per layer what each step did, seconds per phase, shards and bytes written.
    """
    t_start = time.perf_counter()
    src, out = Path(model), Path(out)
    say = progress or (lambda _msg: None)
    _check_methods(align, strategy, repair, router, scope)
    SOLVERS.get(solver)
    if src.exists() and out.resolve() == src.resolve():
        raise ValueError(f"the output folder {out} is the input folder; write the result elsewhere")
    max_bytes = parse_size(max_shard_size)
    if max_bytes <= 0:
        raise ValueError(f"max_shard_size={max_shard_size!r} must be positive")
    reader = CheckpointReader(src)
    if (src / STRUCTURE_FILE).is_file():
        raise CheckpointError(
            f"{src} holds merged or compressed layers ({STRUCTURE_FILE}); streaming takes a stock checkpoint"
        )
    config = _load_config(src)
    skeleton, adapter = meta_skeleton(config)
    for ly in adapter.sparse_layers(skeleton):
        adapter.check_block(ly)
    if isinstance(groups, str | Path):
        groups = read_json(Path(groups), "expert groups")
    if isinstance(profile, str | Path):
        profiles, profiled = load_profile(Path(profile), skeleton), True
    elif profile is not None:
        profiles, profiled = profile, True
        lacking = [ly.name for ly in adapter.sparse_layers(skeleton) if ly.name not in profiles]
        if lacking:
            raise ValueError(f"the routing profile lacks SMoE layers {lacking[:4]}")
    else:
        profiles, profiled = _uniform_profiles(skeleton, adapter), False
    _check_inputs(skeleton, adapter, groups, profiles, profiled, align, strategy, repair, router, rank)

    targets = _plan_targets(skeleton, reader.names)
    tied = _tied_duplicates(skeleton)
    missing = [n for n in skeleton.state_dict() if n not in targets and n not in tied]
    if missing:
        raise CheckpointError(
            f"{src}: the checkpoint lacks {missing[0]}"
            + (f" (and {len(missing) - 1} more tensors)" if len(missing) > 1 else "")
            + f" that the {config.model_type} config asks for"
        )
    layer_names = [ly.name for ly in adapter.sparse_layers(skeleton)]
    owner = {}
    for name in targets:
        owner[name] = next((ly for ly in layer_names if name.startswith(ly + ".")), None)
    units: list[tuple[str, str]] = []
    emitted = set()
    for name in sorted(targets, key=natural_key):
        ly = owner[name]
        if ly is None:
            if name not in tied:
                units.append(("copy", name))
        elif ly not in emitted:
            emitted.add(ly)
            units.append(("layer", ly))

    freqs = {n: p.frequency for n, p in profiles.items()}
    inputs = {n: p.inputs for n, p in profiles.items() if p.inputs is not None}
    seconds = dict.fromkeys(("read", "align", "merge", "compress", "write", "copy"), 0.0)
    report: dict = {"layers": {}}
    structure: dict = {}
    stock: list[dict | None] = []
    meta_state = skeleton.state_dict()

    # One solver pool for every layer: its worker processes start once.
    with atomic_dir(out) as tmp, SolverPool(workers) as pool:
        writer = ShardWriter(tmp, max_bytes)
        for kind, name in units:
            if kind == "copy":
                t0 = time.perf_counter()
                t = _read_target(reader, targets[name])
                want = meta_state[name]
                if tuple(t.shape) != tuple(want.shape):
                    raise CheckpointError(
                        f"{name}: stored shape {tuple(t.shape)}, the config gives {tuple(want.shape)}"
                    )
                t = t if t.dtype == want.dtype else t.to(want.dtype)
                check_finite_weights({name: t}, src)
                writer.add(name, t)
                del t
                seconds["copy"] += time.perf_counter() - t0
                continue
            entry: dict = {}
            t0 = time.perf_counter()
            block_targets = [n for n in targets if owner[n] == name]
            tensors = {n: _read_target(reader, targets[n]) for n in block_targets}
            check_finite_weights(tensors, src)
            meta_block = _materialise(skeleton, name, tensors)
            del tensors
            t1 = time.perf_counter()
            seconds["read"] += t1 - t0
            entry["align"] = align_model(
                skeleton,
                adapter,
                align,
                reference,
                freqs,
                inputs,
                layers={name},
                include_wo=include_wo,
                solver=solver,
                settings=settings,
                min_gain=min_gain,
                device=device,
                pool=pool,
            )[name]
            t2 = time.perf_counter()
            seconds["align"] += t2 - t1
            spec = (groups or {}).get("layers", {}).get(name)
            if spec is not None and spec.get("merged"):
                entry["merge"] = merge_model(
                    skeleton, adapter, {"layers": {name: spec}}, profiles, strategy, repair
                )[name]
                layer = next(ly for ly in adapter.sparse_layers(skeleton) if ly.name == name)
                entry["router"] = _set_router(adapter, layer, router)
            t3 = time.perf_counter()
            seconds["merge"] += t3 - t2
            if rank is not None:
                layer = next(ly for ly in adapter.sparse_layers(skeleton) if ly.name == name)
                done = _compress(skeleton, adapter, layer, rank, scope)
                if done is not None:
                    entry["compress"] = done
            t4 = time.perf_counter()
            seconds["compress"] += t4 - t3
            live = skeleton.get_submodule(name)
            structure.update(adapter.structure(skeleton))
            stock.append(adapter.stock_config_overrides(_Shell(name, live)))
            for k, t in live.state_dict(prefix=f"{name}.").items():
                writer.add(k, t)
            # Back to the stock meta block: the layer's memory is released before the next one.
            set_submodule(skeleton, name, meta_block)
            del live
            trim_heap()
            seconds["write"] += time.perf_counter() - t4
            report["layers"][name] = entry
            say(f"{name}: {json.dumps({k: v for k, v in entry.items() if k != 'merge'})}")
        t0 = time.perf_counter()
        weight_map = writer.finish()
        overrides = stock[0] if stock and all(s is not None and s == stock[0] for s in stock) else None
        _write_config(skeleton, tmp, src, overrides)
        if structure:
            (tmp / STRUCTURE_FILE).write_text(json.dumps({"format": 1, "layers": structure}, indent=1))
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / f)
        if params is not None:
            (tmp / PARAMS_FILE).write_text(yaml.safe_dump(params, sort_keys=False))
        files = extra(report) if callable(extra) else extra
        for fname, obj in (files or {}).items():
            (tmp / fname).write_text(json.dumps(obj, indent=1))
        seconds["write"] += time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    report.update(
        {
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "shards": len(set(weight_map.values())),
            "total_size": writer.total_size,
            "stock_config_overrides": overrides,
            "profile": "given" if profiled else "uniform usage (no routing profile)",
        }
    )
    return report


def meta_model_of(folder: str | Path) -> nn.Module:
    """The model a saved folder holds, on the meta device (merged and compressed layers rebuilt from
    its structure file): shapes and parameter counts without reading a weight. Its stored buffers
    (small: e.g. the pruning masks of S, which the counts of kept parameters read) are read."""
    folder = Path(folder)
    config = _load_config(folder)
    model, adapter = meta_skeleton(config)
    structure = folder / STRUCTURE_FILE
    if structure.is_file():
        with default_dtype(config_dtype(config)), torch.device("meta"):
            adapter.apply_structure(model, json.loads(structure.read_text())["layers"])
    reader = CheckpointReader(folder)
    names = [n for n, _ in model.named_buffers() if n in reader.shard_of]
    for name, t in reader.read(names).items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module.register_buffer(leaf, t, persistent=leaf not in module._non_persistent_buffers_set)
    return model
