"""Building, loading and saving SMoE models, including merged/compressed ones."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from torch import nn

from pipeline.checkpointing import first_non_finite
from pipeline.families import ADAPTERS, ModelStructureError, adapter_for

STRUCTURE_FILE = "smoe_structure.json"
PARAMS_FILE = "params.yaml"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# The dtypes weights may be held in (runtime.weights_dtype); "auto" keeps a checkpoint's own.
WEIGHTS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(RuntimeError):
    """A model folder is missing, incomplete or unreadable."""


def build_model(
    family: str,
    config_kwargs: dict,
    vocab_size: int,
    pad_id: int,
    eos_id: int,
    router_init_std: float | None,
    seed: int,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A randomly initialised SMoE of ``family`` from config keyword arguments.

    Initialised in float32 whatever ``dtype`` (so one seed gives one model), then cast to ``dtype``
    (None: stays float32).
    """
    adapter = ADAPTERS.get(family)
    kwargs = dict(config_kwargs)
    if kwargs.get("vocab_size", vocab_size) < vocab_size:
        raise ValueError(
            f"model.config.vocab_size={kwargs['vocab_size']} is smaller than the tokenizer ({vocab_size})"
        )
    for key, value in adapter.config_defaults(vocab_size, pad_id, eos_id).items():
        kwargs.setdefault(key, value)
    try:
        config = adapter.config_class()(**kwargs)
    except Exception as err:  # transformers raises its own validation errors besides TypeError
        raise ValueError(f"model.config: {err}") from None
    torch.manual_seed(seed)
    model = adapter.model_class()(config)
    if router_init_std is not None:
        # The stock init (std 1.0) gives confident, collapsed routing from step one.
        with torch.no_grad():
            for layer in adapter.sparse_layers(model):
                for p in adapter.router(layer).parameters():
                    p.normal_(0.0, router_init_std) if p.dim() > 1 else p.zero_()
    _require_sparse(model)
    if dtype is not None:
        cast_weights(model, dtype, f"the {family} model built from model.config")
    return model


def weights_dtype(name: str) -> torch.dtype | None:
    """The torch dtype a ``runtime.weights_dtype`` value names; None for ``auto`` (as stored)."""
    if name == "auto":
        return None
    if name not in WEIGHTS_DTYPES:
        raise ValueError(f"unknown weights dtype {name!r}; valid choices: auto, {', '.join(WEIGHTS_DTYPES)}")
    return WEIGHTS_DTYPES[name]


def floating_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's floating-point weights are held in (the first such parameter's)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def cast_weights(model: nn.Module, dtype: torch.dtype, source: str | Path) -> nn.Module:
    """Hold every floating weight of ``model`` in ``dtype`` (in place); refuse a cast that overflows.

    A no-op (same tensors, bit for bit) when the weights already are ``dtype``. float16's range ends
    at 65504: a larger weight would become inf, so the cast is refused rather than made.
    """
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.dtype == dtype for t in tensors if t.is_floating_point()):
        return model
    if dtype == torch.float16:
        limit = torch.finfo(torch.float16).max
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and t.numel() and float(t.detach().abs().max()) > limit:
                raise CheckpointError(
                    f"{source}: weight {name} holds values beyond float16's range (|x| > {limit:.0f}); "
                    "runtime.weights_dtype: float16 would turn them into inf: use bfloat16 or float32"
                )
    model.to(dtype)
    return model


def _require_sparse(model: nn.Module) -> None:
    adapter = adapter_for(model)
    if not adapter.sparse_layers(model):
        hint = (
            "; a dense encoder becomes an MoE/MEO classifier through an upcycle section (see meo/params.yaml)"
            if adapter.sequence_classifier
            else ""
        )
        raise ModelStructureError(
            f"the model has no SMoE layer (no sparse/expert MLP found); nothing to merge{hint}"
        )


def custom_code_modules(path: Path) -> str | None:
    """The modules a local checkpoint's config asks to import (``auto_map``), if any."""
    try:
        auto_map = json.loads((path / "config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return ", ".join(sorted({str(v) for v in auto_map.values()})) or None


def check_finite_weights(
    weights: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], source: str | Path
) -> None:
    """Refuse loaded weights holding NaN or inf, naming the first such tensor.

    Flipped bytes in a weight file, or a checkpoint saved from a diverged run, load without any
    error and then train and score on NaN. One ``isfinite`` pass per tensor.
    """
    if isinstance(weights, nn.Module):
        named = [*weights.named_parameters(), *weights.named_buffers()]
    elif isinstance(weights, Mapping):
        named = weights.items()
    else:
        named = weights
    bad = first_non_finite(named)
    if bad is not None:
        name, n_bad, n = bad
        raise CheckpointError(
            f"{source}: weight {name} holds non-finite values ({n_bad} of {n} are NaN/inf); the weight "
            "file is corrupt or was saved from a diverged run: restore it or re-run the stage that wrote it"
        )


def _has_weights(path: Path) -> bool:
    return any((path / f).is_file() for f in WEIGHT_FILES)


@contextmanager
def float32_master_weights(model: nn.Module):
    """Train ``model`` on float32 weights, then hold them again in the dtype they had before.

    Low-precision storage is for holding and merging weights, not for optimiser steps: bfloat16
    keeps 8 significant bits, so an AdamW update below 2^-8 of a weight rounds away and training
    stalls. Autocast (``runtime.dtype``) still gives low-precision compute. A no-op on float32.
    """
    storage = floating_dtype(model)
    if storage == torch.float32:
        yield model
        return
    model.float()
    yield model
    cast_weights(model, storage, "the trained model")


def load_model(
    name_or_path: str | Path, trust_remote_code: bool = False, dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a stock checkpoint (local folder or Hub id) or one saved by :func:`save_model`.

    Weights are read from safetensors only; merged/compressed layers are rebuilt from the
    structure file before their weights are loaded. They are held in the dtype they were stored in,
    or cast to ``dtype`` when given (:func:`cast_weights`).
    """
    from transformers import AutoConfig

    path = Path(name_or_path)
    looks_local = path.is_absolute() or str(name_or_path).startswith(".") or str(name_or_path).count("/") != 1
    if not path.exists() and looks_local:
        raise CheckpointError(
            f"model folder {path} does not exist (and it is not a Hub id of the form org/name)"
        )
    if path.exists():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is not a model folder: no config.json")
        if not _has_weights(path):
            raise CheckpointError(
                f"{path} holds no weights: expected one of {list(WEIGHT_FILES)} (safetensors only)"
            )
    try:
        config = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        code = custom_code_modules(path) if not trust_remote_code else None
        if code:
            raise CheckpointError(
                f"{name_or_path} needs its own Python code to load ({code}); it is not run unless "
                "model.trust_remote_code is true. Supported families load without it: "
                f"{', '.join(ADAPTERS.names())}"
            ) from None
        raise CheckpointError(f"cannot read the config of {name_or_path}: {err}") from None
    adapter = adapter_for(config)
    structure_path = path / STRUCTURE_FILE
    try:
        if not structure_path.is_file():
            model = adapter.model_class().from_pretrained(
                str(name_or_path), use_safetensors=True, trust_remote_code=trust_remote_code
            )
        else:
            model = _load_structured(path, config, adapter, json.loads(structure_path.read_text()))
    except (CheckpointError, ModelStructureError):
        raise
    except Exception as err:  # safetensors, torch and transformers each raise their own types
        raise CheckpointError(f"cannot load weights from {name_or_path}: {err}") from None
    check_finite_weights(model, name_or_path)
    _require_sparse(model)
    if dtype is not None:
        cast_weights(model, dtype, name_or_path)
    model.eval()
    return model


def config_dtype(config) -> torch.dtype:
    """The floating dtype a saved config records (``dtype``, or ``torch_dtype`` in older files);
    float32 where it records none."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules in ``dtype`` inside the block, restoring the process default after it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _load_structured(path: Path, config, adapter, structure: dict) -> nn.Module:
    from safetensors.torch import load_file

    # Built in the dtype the checkpoint was saved in: building in float32 and copying bfloat16
    # weights in would double the memory of a bf16 model and silently change its numerics.
    with default_dtype(config_dtype(config)):
        model = adapter.model_class()(config)
        adapter.apply_structure(model, structure["layers"])
    state = {}
    if (path / "model.safetensors").is_file():
        state = load_file(str(path / "model.safetensors"))
    else:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(str(path / shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = _tied_names(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the saved structure (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.tie_weights()
    return model


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that share storage with an earlier one (dropped by safetensors on save)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            tied.add(name)
        else:
            seen[p.data_ptr()] = name
    keys = getattr(model, "_tied_weights_keys", None) or {}
    tied.update(keys if isinstance(keys, dict) else keys)
    return tied


@contextmanager
def atomic_dir(target: str | Path):
    """Yield a temporary sibling folder; it replaces ``target`` only if the block completes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A run killed outright (SIGKILL, power loss) cannot clean up after itself; the next one does.
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_model(
    model: nn.Module,
    folder: str | Path,
    params: dict | None = None,
    tokenizer=None,
    extra: dict | None = None,
) -> None:
    """Save weights (safetensors), structure, tokenizer and the resolved params that made the model."""
    folder = Path(folder)
    adapter = adapter_for(model)
    # When every SMoE layer is a plain M-expert layer, the checkpoint's config says so (M experts,
    # top-k capped at M) and loads in stock transformers; the structure file still lets this
    # project's loader restore routing.
    overrides = adapter.stock_config_overrides(model) or {}
    # Keys may name a nested config ("ffn_config.moe_num_experts" of DBRX).
    targets = {k: config_slot(model.config, k) for k in overrides}
    before = {k: getattr(obj, leaf) for k, (obj, leaf) in targets.items() if hasattr(obj, leaf)}
    for key in before:
        obj, leaf = targets[key]
        setattr(obj, leaf, overrides[key])
    try:
        # Keys as the modules name them (fused experts stay fused): what this project's loader reads,
        # and what stock transformers 5 loads too.
        model.save_pretrained(str(folder), safe_serialization=True, save_original_format=False)
    finally:
        for key, value in before.items():
            obj, leaf = targets[key]
            setattr(obj, leaf, value)
    structure = adapter.structure(model)
    if structure:
        (folder / STRUCTURE_FILE).write_text(json.dumps({"format": 1, "layers": structure}, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    if params is not None:
        (folder / PARAMS_FILE).write_text(yaml.safe_dump(params, sort_keys=False))
    if extra:
        for name, obj in extra.items():
            (folder / name).write_text(json.dumps(obj, indent=1))


def config_slot(config, key: str):
    """``(object, attribute)`` that a dotted config key names."""
    *path, leaf = key.split(".")
    for part in path:
        config = getattr(config, part)
    return config, leaf


def bytes_on_disk(folder: str | Path) -> int:
    """Bytes of the weight files of a saved model."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def count_unique_params(module: nn.Module) -> int:
    """Parameters counted once even when tied or shared (on the meta device: shared objects)."""
    seen, total = set(), 0
    for p in module.parameters():
        key = id(p) if p.is_meta else p.data_ptr()
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        # A value this machine cannot honour: bad input like any other params error.
        raise ValueError(f"runtime.device={device!r} but CUDA is not available; valid here: auto, cpu")
    return torch.device(device)


def resolve_pretrained_source(name: str) -> Path:
    """A local model folder, or an installed package that ships one (``get_model_path()``)."""
    path = Path(name)
    if path.is_dir():
        return path
    import importlib

    try:
        module = importlib.import_module(name.replace("-", "_"))
    except ImportError:
        raise CheckpointError(
            f"model.init_embeddings_from={name!r} is neither a local model folder nor an installed package shipping one"
        ) from None
    if not hasattr(module, "get_model_path"):
        raise CheckpointError(f"package {name!r} does not ship a model (no get_model_path())")
    return Path(module.get_model_path())


@torch.no_grad()
def transfer_embeddings(model: nn.Module, tokenizer, source: str | Path) -> dict:
    """Initialise ``model``'s input embeddings from a pretrained dense model's word embeddings.

    Each token of ``tokenizer`` is re-tokenised with the source model's tokenizer and gets the mean
    of those source embeddings; the result is projected to ``d_model`` by PCA and scaled to unit
    standard deviation (the scale of the stock random init), so any tokenizer and width work.
    """
    from safetensors.torch import load_file

    from pipeline.data import load_tokenizer

    folder = resolve_pretrained_source(str(source))
    # An empty tokenizer reads every token as unk: every embedding would be the mean (then NaN).
    src_tok = load_tokenizer(
        folder,
        fix="model.init_embeddings_from must be a model folder (or package) shipping its tokenizer "
        "(e.g. tokenizer.json or vocab.txt), or null for random embeddings",
    )
    weights = load_file(str(folder / "model.safetensors"))
    keys = [k for k in weights if k.endswith(("word_embeddings.weight", "embed_tokens.weight"))]
    if not keys:
        raise CheckpointError(f"{folder}: no word embedding matrix found in model.safetensors")
    check_finite_weights({keys[0]: weights[keys[0]]}, folder / "model.safetensors")
    table = weights[keys[0]].float()
    # Encoder-decoder models with untied embeddings read tokens through separate tables: fill each.
    tables = [model.get_input_embeddings()]
    for side in ("get_encoder", "get_decoder"):
        if hasattr(model, side):
            tables.append(getattr(model, side)().get_input_embeddings())
    tables = list({id(t.weight): t for t in tables}.values())
    n_tok, d_model = tables[0].weight.shape
    mean = table.mean(0)
    vectors, covered = [], 0
    for i in range(n_tok):
        text = tokenizer.decode([i]).strip()
        ids = src_tok(text, add_special_tokens=False)["input_ids"] if text else []
        ids = [j for j in ids if j != src_tok.unk_token_id]
        vectors.append(table[ids].mean(0) if ids else mean)
        covered += bool(ids)
    x = torch.stack(vectors)
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    if vh.shape[0] < d_model:
        raise ValueError(f"source embeddings have {vh.shape[0]} dims, fewer than d_model={d_model}")
    y = x @ vh[:d_model].T
    for table in tables:
        table.weight.copy_((y / y.std()).to(table.weight.dtype))
    return {"source": str(folder), "tokens_covered": covered, "tokens_total": n_tok}
