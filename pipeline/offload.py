"""Routing profiles of models bigger than one device (or than this machine's memory).

A checkpoint folder (single or sharded safetensors) is loaded through transformers' big-model path
(``from_pretrained(device_map=..., offload_folder=...)``, which builds the model on the meta
device and dispatches it with accelerate): modules mapped to GPUs live there, modules mapped to
``"cpu"`` live in RAM (or, when a GPU is the main device, are copied to it for their forward), and
modules mapped to ``"disk"`` stay on disk and are read for their forward only. With safetensors
checkpoints whose tensor names are the model's own (what this project's ``save_model`` writes, and
any transformers-5 checkpoint saved with ``save_original_format=False``), transformers 5.23 indexes
disk-offloaded weights *in the original shards*: nothing is copied to ``offload_folder``. Weights
that need a conversion at load time (Hub Mixtral checkpoints store one ``w1``/``w2``/``w3`` tensor
per expert; transformers 5 fuses them) are converted once and re-saved under ``offload_folder``.

accelerate's hooks load an offloaded module's weights right before its forward and drop them right
after, leaf module by leaf module; :func:`profile_offloaded` regroups each SMoE block under one hook
so the router and every expert are present together (the router's forward hook of
:func:`pipeline.profiling.profile_routing` may run the experts: ``expert_outputs``). Resident
weights are then the ``"cpu"``/GPU-mapped modules plus one SMoE block (or one attention) at a time.

The profile itself is :func:`pipeline.profiling.profile_routing`, unchanged: it calls
``model.to(device)``, which accelerate refuses on a model holding offloaded (meta) weights and which
would undo a spread over several GPUs, so it sees the dispatched model through a thin view whose
``to`` leaves the placement alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from pipeline.families import ModelStructureError, adapter_for
from pipeline.modeling import STRUCTURE_FILE, CheckpointError, default_dtype
from pipeline.profiling import LayerProfile, profile_routing
from pipeline.shards import DTYPE_NAMES, CheckpointReader

#: Device-map strategies of transformers/accelerate: ``auto`` and ``balanced`` spread the layers
#: evenly over the GPUs there are, ``balanced_low_0`` keeps GPU 0 light, ``sequential`` fills them
#: in order; what does not fit goes to ``cpu`` and then ``disk``.
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

_FLOATING = {name: dtype for dtype, name in DTYPE_NAMES.items() if dtype.is_floating_point}


# ------------------------------------------------------------------------------------ checkpoints


def checkpoint_shards(folder: str | Path) -> dict[str, Path]:
    """Every tensor name of a safetensors checkpoint folder and the shard that holds it.

    Reads the index and each shard's header only (no weights), through
    :class:`~pipeline.shards.CheckpointReader`, which raises :class:`CheckpointError` naming the
    first problem: no folder, no config, no safetensors weights, a shard the index names that is
    missing or unreadable, or a tensor the index puts in a shard that lacks it.
    """
    reader = CheckpointReader(folder)
    return {name: reader.folder / shard for name, shard in reader.shard_of.items()}


def stored_dtype(shards: Mapping[str, Path]) -> torch.dtype:
    """The floating dtype most of a checkpoint's weight bytes are stored in (read from headers)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, file in shards.items():
        by_file.setdefault(file, []).append(name)
    total: dict[torch.dtype, int] = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                sl = f.get_slice(name)
                dtype = _FLOATING.get(sl.get_dtype())
                if dtype is not None:
                    total[dtype] = total.get(dtype, 0) + max(1, _numel(sl.get_shape()))
    return max(total, key=total.get) if total else torch.float32


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def meta_model(folder: str | Path, dtype: torch.dtype) -> nn.Module:
    """The checkpoint's model built on the meta device in ``dtype`` (no memory, no weights)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the config of {folder}: {err}") from None
    adapter = adapter_for(config)
    with default_dtype(dtype), torch.device("meta"):
        model = adapter.model_class()(config)
    if not adapter.sparse_layers(model):
        raise ModelStructureError(f"{folder}: the model has no SMoE layer; there is no routing to profile")
    return model


# ------------------------------------------------------------------------------------ device maps


def _devices_here() -> list[str]:
    n = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(n)] + ["cpu", "disk"]


def canonical_device(value, what: str) -> int | str:
    """A device-map / max_memory device as accelerate takes it: a GPU index, ``"cpu"`` or ``"disk"``.

    Accepts ``cuda``/``cuda:N``/``N``/``torch.device``; a device this machine lacks is refused,
    naming the valid ones.
    """
    here = _devices_here()
    if isinstance(value, torch.device):
        value = str(value)
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        value = f"cuda:{int(value)}"
    if value == "cuda":
        value = "cuda:0"
    if isinstance(value, str) and value in here:
        return int(value.split(":")[1]) if value.startswith("cuda:") else value
    raise ValueError(f"{what}: unknown device {value!r}; valid here: {', '.join(here)}")


def _memory_bytes(value, what: str) -> int:
    from accelerate.utils import convert_file_size_to_int

    try:
        n = convert_file_size_to_int(value)
    except (ValueError, TypeError, AttributeError):
        n = -1
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{what}: {value!r} is not a memory size (bytes, or e.g. '2GiB', '500MB')")
    return n


def plan_device_map(
    model: nn.Module, device_map: str | Mapping, max_memory: Mapping | None = None
) -> dict[str, int | str]:
    """The module -> device map the model will be dispatched by, checked before any weight is read.

    ``device_map`` is a strategy (:data:`STRATEGIES`; ``max_memory`` caps each device, e.g.
    ``{"cpu": "8GiB"}`` sends what does not fit in 8 GiB of RAM to ``disk``; as in accelerate, a
    device left out of a given ``max_memory`` is not used, so list the GPUs too) or an explicit
    ``{module name: device}`` map that must cover every parameter of ``model`` (a meta model).
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    memory = None
    if max_memory is not None:
        if not isinstance(max_memory, Mapping):
            raise ValueError(f"max_memory must map devices to sizes, not {type(max_memory).__name__}")
        memory = {
            canonical_device(k, "max_memory"): _memory_bytes(v, f"max_memory[{k!r}]")
            for k, v in max_memory.items()
        }
    if isinstance(device_map, str):
        if device_map not in STRATEGIES:
            one = canonical_device(device_map, f"device_map {device_map!r} is neither a strategy "
                                   f"({', '.join(STRATEGIES)}) nor a device")  # fmt: skip
            return {"": one}
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        if device_map == "sequential":
            memory = get_max_memory(memory)
        else:
            memory = get_balanced_memory(
                model,
                max_memory=memory,
                no_split_module_classes=no_split,
                low_zero=device_map == "balanced_low_0",
            )
        return dict(infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split))
    if not isinstance(device_map, Mapping) or not device_map:
        raise ValueError(
            f"device_map must be one of {', '.join(STRATEGIES)}, a device, or a non-empty "
            f"{{module: device}} map; got {device_map!r}"
        )
    plan = {}
    modules = dict(model.named_modules())
    for name, device in device_map.items():
        if name not in modules:
            raise ValueError(f"device_map names module {name!r}, which the model lacks (e.g. model.layers.0)")
        plan[name] = canonical_device(device, f"device_map[{name!r}]")
    uncovered = [
        n
        for n, _ in [*model.named_parameters(), *model.named_buffers()]
        if not any(k == "" or n == k or n.startswith(k + ".") for k in plan)
    ]
    if uncovered:
        raise ValueError(
            f"device_map places no module holding {uncovered[0]} ({len(uncovered)} tensors uncovered); "
            "map every module, or use a strategy: " + ", ".join(STRATEGIES)
        )
    return plan


def _needs_conversion(model: nn.Module, plan: Mapping, shards: Mapping[str, Path]) -> list[str]:
    """Disk-mapped tensors the checkpoint does not store under the model's own name: transformers
    must convert them at load time and re-save them under ``offload_folder``."""
    disk = [k for k, d in plan.items() if d == "disk"]
    if not disk:
        return []
    return [
        n
        for n, _ in model.named_parameters()
        if n not in shards and any(k == "" or n == k or n.startswith(k + ".") for k in disk)
    ]


# ------------------------------------------------------------------------------------ loading


def load_offloaded(
    folder: str | Path,
    device_map: str | Mapping = "auto",
    max_memory: Mapping | None = None,
    offload_folder: str | Path | None = None,
) -> nn.Module:
    """Load a safetensors checkpoint dispatched over GPUs, RAM and disk, in its stored dtype.

    Everything is checked before the first weight is read: the folder and every shard of its
    index (:func:`checkpoint_shards`), the family, the device map (:func:`plan_device_map`; on a
    machine without GPUs, ``auto`` means RAM up to ``max_memory["cpu"]``, then disk), and that an
    ``offload_folder`` is given where disk-mapped weights need converting. A bf16 checkpoint stays
    bf16. The returned model carries ``hf_device_map``.
    """
    path = Path(folder)
    shards = checkpoint_shards(path)
    if (path / STRUCTURE_FILE).is_file():
        raise CheckpointError(
            f"{path} is a merged checkpoint ({STRUCTURE_FILE}); offloaded loading takes stock "
            "checkpoints only: load it with pipeline.modeling.load_model"
        )
    dtype = stored_dtype(shards)
    skeleton = meta_model(path, dtype)
    plan = plan_device_map(skeleton, device_map, max_memory)
    converted = _needs_conversion(skeleton, plan, shards)
    if converted and offload_folder is None:
        raise ValueError(
            f"{path}: {len(converted)} disk-offloaded tensors (e.g. {converted[0]}) are stored under other "
            "names or in another layout (the Hub's original format); transformers converts them at load "
            "time and re-saves them: pass an offload_folder"
        )
    adapter = adapter_for(skeleton.config)
    del skeleton
    try:
        model = adapter.model_class().from_pretrained(
            str(path),
            device_map=plan,
            offload_folder=None if offload_folder is None else str(offload_folder),
            dtype=dtype,
            use_safetensors=True,
        )
    except (CheckpointError, ModelStructureError, ValueError):
        raise
    except Exception as err:  # safetensors, torch, transformers and accelerate each raise their own
        raise CheckpointError(f"cannot load weights from {path}: {err}") from None
    model.eval()
    return model


# ------------------------------------------------------------------------------------ profiling


def _hook(module: nn.Module):
    return getattr(module, "_hf_hook", None)


def group_block_offload(model: nn.Module) -> int:
    """Put each fully offloaded SMoE block under one accelerate hook that loads all of its weights
    (router, experts, shared experts) for the block's forward; returns how many blocks changed.

    accelerate hooks offloaded leaf modules one by one, so inside the router's forward hook the
    experts would still be on the meta device: ``expert_outputs`` then comes out NaN, silently.
    Blocks that are not offloaded, or only partly, are left as they are.
    """
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
    from accelerate.utils import PrefixedDataset

    changed = 0
    for layer in adapter_for(model).sparse_layers(model):
        block = layer.module
        own = _hook(block)
        if own is not None and getattr(own, "offload", False) and getattr(own, "place_submodules", False):
            continue  # grouped already (an earlier profile of this model)
        tensors = [*block.parameters()]
        if not tensors or any(t.device.type != "meta" for t in tensors):
            continue
        leaf = next(
            (
                (name, h)
                for name, m in block.named_modules()
                if (h := _hook(m)) is not None and getattr(h, "offload", False) and h.weights_map is not None
            ),
            None,
        )
        if leaf is None or not isinstance(leaf[1].weights_map, PrefixedDataset):
            continue
        name, h = leaf
        if h.weights_map.prefix != f"{layer.name}.{name}.":
            continue
        remove_hook_from_module(block, recurse=True)
        add_hook_to_module(
            block,
            AlignDevicesHook(
                execution_device=h.execution_device,
                offload=True,
                weights_map=PrefixedDataset(h.weights_map.dataset, f"{layer.name}."),
                offload_buffers=h.offload_buffers,
                place_submodules=True,
                skip_keys=h.skip_keys,
                tied_params_map=h.tied_params_map,
            ),
        )
        changed += 1
    return changed


class _Placed:
    """A dispatched model as ``profile_routing`` sees it: ``to()`` keeps its placement."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def to(self, *_args, **_kwargs) -> _Placed:
        return self

    def eval(self) -> _Placed:
        self._model.eval()
        return self

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def input_device(model: nn.Module) -> torch.device:
    """Where batches go: the CPU for a dispatched model (accelerate's top hook moves them to the
    main device; the token masks stay on the CPU, from where they can index tensors on any GPU);
    otherwise the device of the model's weights."""
    if _hook(model) is not None:
        return torch.device("cpu")
    return next(model.parameters()).device


@torch.no_grad()
def profile_offloaded(
    model: nn.Module,
    rows: list[dict],
    pad_id: int,
    batch_size: int,
    max_inputs: int = 1024,
    expert_outputs: bool = False,
) -> dict[str, LayerProfile]:
    """:func:`pipeline.profiling.profile_routing` on a model from :func:`load_offloaded` (or any
    accelerate-dispatched model), without moving it: the same profile, layer by layer."""
    group_block_offload(model)
    return profile_routing(
        _Placed(model), rows, pad_id, batch_size, input_device(model), max_inputs, expert_outputs
    )


def check_rows(rows: list[dict], vocab_size: int) -> None:
    """Refuse an empty calibration set or token ids outside the vocabulary (before loading)."""
    if not rows:
        raise ValueError("no samples to profile")
    for i, r in enumerate(rows):
        ids = r.get("input_ids") or []
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"sample {i}: token id {bad[0]} is outside the model's vocabulary of {vocab_size}"
            )


def profile_checkpoint(
    folder: str | Path,
    rows: list[dict],
    pad_id: int,
    batch_size: int,
    device_map: str | Mapping = "auto",
    max_memory: Mapping | None = None,
    offload_folder: str | Path | None = None,
    max_inputs: int = 1024,
    expert_outputs: bool = False,
) -> dict[str, LayerProfile]:
    """Load ``folder`` with :func:`load_offloaded` and profile ``rows`` on it (rows checked first)."""
    from transformers import AutoConfig

    checkpoint_shards(folder)
    vocab = getattr(AutoConfig.from_pretrained(str(folder)), "vocab_size", None)
    check_rows(rows, vocab if isinstance(vocab, int) else 2**62)
    model = load_offloaded(folder, device_map, max_memory, offload_folder)
    return profile_offloaded(model, rows, pad_id, batch_size, max_inputs, expert_outputs)
