"""The family walk: every MoE model type of the installed transformers, built tiny and checked.

For each model type whose modeling code has an experts module, :func:`walk_family` builds a tiny
random model from the type's config class and, when a family adapter supports it, runs the
lossless checks: the router semantics reproduce the stock router's choice; weight-matching
alignment, the identity merge (every expert its own group) under each router mode it defines,
full-rank compression and save/reload leave the logits unchanged; and a uniform pruned merge
saved by :func:`~pipeline.modeling.save_model` loads in stock transformers with the same logits.
A type no adapter supports is reported with a one-line reason. ``tests/test_family_walk.py`` runs
it and ``scripts/family_table.py`` writes the README's family table from it.
"""

from __future__ import annotations

import ast
import copy
import functools
import re
import tempfile
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.families import ADAPTERS, ModelStructureError
from pipeline.families.routers import parse_output

#: Small values for the config keys most families share; a family's ``tiny`` overrides them.
TINY = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 24,
    "shared_expert_intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_k": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 0,
    "n_group": 2,
    "topk_group": 1,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "tie_word_embeddings": False,
    # Switch Transformers
    "d_model": 32,
    "d_ff": 48,
    "d_kv": 8,
    "num_heads": 4,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_sparse_encoder_layers": 1,
    "num_sparse_decoder_layers": 1,
}

#: Model types that no adapter can take as they are, and why (one line each). Composite models
#: and their sub-models get their reason from the walk's general rule instead.
KNOWN_UNSUPPORTED: dict[str, str] = {
    "deepseek_v4": (
        "its first layers route by a fixed token-id -> expert table (hash MoE, no router rows) yet "
        "share the config's expert count with the routed layers: a pruned merge has no stock layout"
    ),
    "inkling_text": (
        "its router scores the shared experts together with the routed ones (one weight row each, "
        "weights normalised over the chosen and the shared): rows that no routed expert owns"
    ),
    "jetmoe": (
        "attention experts (MoA) and a router that returns tokens sorted by expert with group sizes, "
        "not a top-k choice per token"
    ),
    "longcat_flash": (
        "its router chooses among FFN experts and zero-compute (identity) experts: a merged group "
        "could mix the two kinds, which no experts module holds"
    ),
    "muse_spark_text": "experts normalise their output (post-expert norm): a merged expert has no such norm",
    "nllb-moe": "encoder-decoder with top-2 capacity routing; not adapted yet",
    "openai_privacy_filter": (
        "a bidirectional token-classification encoder: no language-model head, and the pipeline "
        "merges causal language models"
    ),
    "vitpose_backbone": (
        "a vision backbone whose MoE MLP takes its expert from a dataset index passed as input: "
        "no router, and no language model"
    ),
    "zaya": (
        "its router is an MLP over a state carried from the previous layer's router, with an extra "
        "'skip' class: no linear router rows to merge or prune"
    ),
}


@dataclass
class WalkResult:
    """One model type's outcome: ``supported`` when every check passed."""

    model_type: str
    supported: bool
    reason: str = ""
    checks: dict[str, str] = field(default_factory=dict)  # check -> "ok" or what failed
    semantics: str = ""
    layout: str = ""
    modes: list[str] = field(default_factory=list)  # router modes defined for the family
    shared: bool = False


def moe_model_types() -> list[str]:
    """Every model type of the installed transformers whose modeling code holds an experts module."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    root = Path(transformers.__file__).parent / "models"
    found = []
    for model_type in sorted(CONFIG_MAPPING_NAMES):
        folder = root / model_type_to_module_name(model_type)
        texts = [p.read_text() for p in folder.glob("modeling_*.py")] if folder.is_dir() else []
        if any(re.search(r"self\.experts\s*=", t) for t in texts):
            found.append(model_type)
    return found


def _config_class(model_type: str) -> type:
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def tiny_config(model_type: str, adapter=None):
    """A small config of ``model_type``: its defaults with :data:`TINY` where it has those keys,
    the token ids the adapter gives a model built from scratch, and the family's own overrides."""
    cls = _config_class(model_type)
    defaults = cls().to_dict()
    aliases = getattr(cls, "attribute_map", {}) or {}
    kwargs = {aliases.get(k, k): v for k, v in TINY.items() if k in defaults or k in aliases}
    if adapter is not None:
        kwargs.update(adapter.config_defaults(TINY["vocab_size"], 0, 1))
        kwargs.update(dict(getattr(getattr(adapter, "spec", None), "tiny", {}) or {}))
    return cls(**kwargs)


def _sub_configs(config_cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """Every model-specific sub-config class under ``config_cls`` (not the generic AutoConfig) with
    its key path (``thinker_config.text_config``), outer ones first."""
    from transformers import PretrainedConfig

    out = []
    for key, sub in (getattr(config_cls, "sub_configs", None) or {}).items():
        if isinstance(sub, type) and issubclass(sub, PretrainedConfig):
            out.append((prefix + key, sub))
    for path, sub in list(out):
        out += _sub_configs(sub, path + ".")
    return out


def _role(path: str) -> str:
    """``talker_config.text_config`` -> ``talker text``."""
    return " ".join(part.removesuffix("_config") for part in path.split(".")).replace("_", " ")


@functools.cache
def _folder_classes(folder: str) -> dict[str, ast.ClassDef]:
    """The classes of a transformers model folder's modeling files, by name (parsed, not imported)."""
    import transformers

    root = Path(transformers.__file__).parent / "models" / folder
    classes = {}
    for path in sorted(root.glob("modeling_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                classes[node.name] = node
    return classes


def _has_experts(model_type: str) -> bool:
    """Whether the model class of ``model_type`` holds an experts module anywhere below it: the
    classes its constructors name, followed through its folder's modeling code."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    classes = _folder_classes(model_type_to_module_name(model_type))
    config_name = CONFIG_MAPPING_NAMES[model_type]
    todo = [MODEL_MAPPING_NAMES[model_type]] if model_type in MODEL_MAPPING_NAMES else []
    if not todo:  # a sub-model without an auto class: the classes whose config is this one
        for name, node in classes.items():
            for stmt in node.body:
                annotated = isinstance(stmt, ast.AnnAssign) and ast.unparse(stmt.annotation) == config_name
                assigned = isinstance(stmt, ast.Assign) and ast.unparse(stmt.value) == config_name
                if annotated or assigned:
                    todo.append(name)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in classes:
            continue
        seen.add(name)
        node = classes[name]
        todo += [ast.unparse(b) for b in node.bases]
        for fn in node.body:
            if isinstance(fn, ast.FunctionDef) and fn.name == "__init__":
                for sub in ast.walk(fn):
                    if (
                        isinstance(sub, ast.Attribute)
                        and sub.attr == "experts"
                        and isinstance(sub.ctx, ast.Store)
                    ):
                        return True
                    if isinstance(sub, ast.Name):
                        todo.append(sub.id)
    return False


def _reason_without_adapter(model_type: str) -> str:
    """Why a model type that no adapter takes is not merged: a composite model (its language model
    is another type), a sub-model of one (with or without experts of its own), or no adapter."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = _config_class(model_type)
    subs = [(path, sub) for path, sub in _sub_configs(cls) if sub.model_type in CONFIG_MAPPING_NAMES]
    texts = [(path, sub.model_type) for path, sub in subs if path.endswith("text_config")]
    if not texts and "text_config" in (getattr(cls, "sub_configs", None) or {}):
        # A generic text config: the default one's type.
        default = getattr(getattr(cls(), "text_config", None), "model_type", None)
        texts = [("text_config", default)] if default else []
    if texts:
        # Its language model is the first text model; every other part with experts stays as it is.
        language = texts[0]
        others = [(path, sub.model_type) for path, sub in subs if path != language[0]]
        # A part that holds the language model is no other part.
        others = [(path, t) for path, t in others if not language[0].startswith(path + ".")]
        unmerged = [t for _path, t in others if not _sub_configs(_config_class(t)) and _has_experts(t)]
        reason = f"composite (multimodal) model: its language model is model type {language[1]!r}"
        if unmerged:
            reason += f"; the experts of {', '.join(map(repr, unmerged))} are not merged: only its language model's are"
        return reason
    folder = model_type_to_module_name(model_type)
    for parent in sorted(CONFIG_MAPPING_NAMES):
        if parent == model_type or model_type_to_module_name(parent) != folder:
            continue
        path = next((path for path, sub in _sub_configs(_config_class(parent)) if sub is cls), None)
        if path is None:
            continue
        role = _role(path)
        if path.endswith("text_config"):
            if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
                break  # a language model of its own: the catalog lacks it
            return (
                f"the {role} model of {parent!r} has no causal-LM class of its own: transformers builds "
                "it only inside the multimodal model, which the pipeline does not load"
            )
        if _has_experts(model_type):
            return f"{role} experts are not merged: only language models are (the {role} model of {parent!r})"
        return f"no experts of its own: the {role} model of {parent!r}"
    if subs:
        return "composite model without a language model of its own"
    return "no adapter: its router and experts are not described in the catalog"


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 10), generator=torch.Generator().manual_seed(seed))


def _inputs(adapter, model, ids: torch.Tensor) -> dict:
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return adapter.task_inputs(model, batch)


@torch.no_grad()
def _logits(adapter, model, ids) -> torch.Tensor:
    return adapter.forward(model, **_inputs(adapter, model, ids)).logits.float()


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = float((a - b).abs().max())
    if err > 1e-4 * (1.0 + float(b.abs().max())):
        raise AssertionError(f"{what}: logits moved by {err:.2e}")


def _decisive_routers(adapter, model, seed: int) -> None:
    """Router weights of unit scale (and small random correction biases, in the router or among
    the per-expert router tensors the block holds), so that top-k choices are far from ties and
    float rounding cannot flip them, and every per-expert tensor takes part in the checks."""
    from pipeline.families.decoder import resolve

    spec = getattr(adapter, "spec", None)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter.sparse_layers(model):
            for p in adapter.router(layer).parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if p.dim() > 1 else 0.1))
            for name, b in adapter.router(layer).named_buffers():
                if b.is_floating_point() and "bias" in name:
                    b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            for path, _axis in spec.rows[1:] if spec is not None else ():
                if path.startswith("block."):
                    t = resolve(path, layer.module, spec.router)
                    if t is not None and t.is_floating_point():
                        t.copy_(torch.randn(t.shape, generator=gen) * 0.1)


def _merge(model, adapter, groups_of) -> None:
    """Frequency-merge every SMoE layer with the groups ``groups_of(num_experts)``."""
    from pipeline.merging import merge_model
    from pipeline.profiling import LayerProfile

    spec, profiles = {"layers": {}}, {}
    for ly in adapter.sparse_layers(model):
        n = adapter.num_experts(ly)
        counts = torch.arange(n, 0, -1).float()  # expert 0 most used: dominant of its group
        profiles[ly.name] = LayerProfile(ly.name, counts, int(counts.sum()), torch.zeros(1, n))
        spec["layers"][ly.name] = {"merged": True, "groups": groups_of(n)}
    merge_model(model, adapter, spec, profiles, "frequency")


def _check_semantics(adapter, model, ids) -> None:
    """The registered semantics, applied to the stock router's logits, gives the stock choice."""
    seen = []
    layers = adapter.sparse_layers(model)
    hooks = [
        adapter.router(ly).register_forward_hook(lambda _m, _i, out, ly=ly: seen.append((ly, out)))
        for ly in layers
    ]
    try:
        _logits(adapter, model, ids)
    finally:
        for h in hooks:
            h.remove()
    for ly, out in seen:
        kind = adapter.spec.output
        logits, weights, idx = parse_output(kind, out)
        if weights is None and kind == "dense-scores":
            scores = out[0].reshape(-1, out[0].shape[-1]).float()
        elif weights is None:
            continue  # the block routes from the logits: the identity merge checks it
        else:
            scores = torch.zeros_like(logits, dtype=torch.float).scatter(1, idx, weights.float())
        w, i = adapter.semantics.select(logits.float(), adapter.params(ly), None)
        mine = torch.zeros_like(logits, dtype=torch.float).scatter(1, i, w.float())
        if not torch.allclose(mine, scores, atol=1e-5, rtol=1e-4):
            raise AssertionError(f"{adapter.spec.semantics} differs from the stock router of {ly.name}")


def _stock_reload(adapter, model, ids, folder: Path) -> None:
    from pipeline.modeling import save_model
    from pipeline.routing import set_router_mode

    _merge(model, adapter, lambda n: [[e, e + 1] for e in range(0, n, 2)])
    set_router_mode(model, adapter, "prune")
    expected = _logits(adapter, model, ids)
    if adapter.stock_config_overrides(model) is None:
        raise AssertionError("a uniform pruned merge is not in the stock layout")
    save_model(model, folder)
    stock = adapter.model_class().from_pretrained(str(folder)).eval()
    _close(_logits(adapter, stock, ids), expected, "stock reload of a uniform pruned merge")


def _run_checks(adapter, model_type: str, result: WalkResult, seed: int) -> None:
    from pipeline.align import align_model
    from pipeline.compression import compress_model
    from pipeline.modeling import load_model, save_model
    from pipeline.routing import ROUTER_MODES, set_router_mode

    spec = getattr(adapter, "spec", None)
    config = tiny_config(model_type, adapter)
    torch.manual_seed(seed)
    model = adapter.model_class()(config).eval()
    layers = adapter.sparse_layers(model)
    if not layers:
        raise ModelStructureError("the tiny model has no SMoE layer")
    for ly in layers:
        if hasattr(adapter, "check_block"):
            adapter.check_block(ly)
    result.shared = any(adapter.shared_experts(ly) for ly in layers)
    if spec is not None:
        result.semantics = spec.semantics
        ex = ly.module.experts
        result.layout = adapter._layout(ex).name
    _decisive_routers(adapter, model, seed)
    ids = _ids(int(getattr(config, "vocab_size", 96)), seed)
    reference = _logits(adapter, model, ids)

    def check(name: str, fn) -> None:
        fn()
        result.checks[name] = "ok"

    if spec is not None:
        check("semantics", lambda: _check_semantics(adapter, model, ids))

    def aligned():
        m = copy.deepcopy(model)
        align_model(m, adapter, "weight-matching", "first")
        _close(_logits(adapter, m, ids), reference, "alignment")

    check("alignment", aligned)
    identity = copy.deepcopy(model)
    _merge(identity, adapter, lambda n: [[e] for e in range(n)])
    _close(_logits(adapter, identity, ids), reference, "identity merge (remap)")
    for mode in ROUTER_MODES.names():
        if mode == "remap":
            continue
        if adapter.router_mode_refusal(mode, None, adapter.sparse_layers(identity)[0]):
            continue
        variant = copy.deepcopy(identity)
        set_router_mode(variant, adapter, mode)
        _close(_logits(adapter, variant, ids), reference, f"identity merge ({mode})")
        result.modes.append(mode)
    result.modes.insert(0, "remap")
    result.checks["identity merge"] = "ok"

    def full_rank():
        ly = adapter.sparse_layers(identity)[0]
        rank = min(min(w.shape) for w in adapter.expert_weights(ly, 0).values() if w.dim() == 2)
        compress_model(identity, adapter, rank, "all")
        _close(_logits(adapter, identity, ids), reference, "full-rank compression")

    check("full-rank compression", full_rank)
    with tempfile.TemporaryDirectory(prefix="walk-") as tmp:

        def reload():
            save_model(identity, Path(tmp) / "compressed")
            _close(_logits(adapter, load_model(Path(tmp) / "compressed"), ids), reference, "save/reload")

        check("save/reload", reload)
        check("stock reload", lambda: _stock_reload(adapter, copy.deepcopy(model), ids, Path(tmp) / "pruned"))


@contextmanager
def _one_thread():
    """Torch on one thread: the walk's matrices are tiny, and on a busy machine threads that wait
    for each other cost many times the work (the whole walk: minutes instead of seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def walk_family(model_type: str, seed: int = 0) -> WalkResult:
    """Build a tiny ``model_type`` and run the lossless checks, or say why it is not supported."""
    with _one_thread():
        return _walk_family(model_type, seed)


def _walk_family(model_type: str, seed: int) -> WalkResult:
    if model_type in KNOWN_UNSUPPORTED:
        return WalkResult(model_type, False, KNOWN_UNSUPPORTED[model_type])
    if model_type not in ADAPTERS:
        return WalkResult(model_type, False, _reason_without_adapter(model_type))
    result = WalkResult(model_type, True)
    try:
        _run_checks(ADAPTERS.get(model_type), model_type, result, seed)
    except Exception as err:  # any failure is this family's result, not the walk's
        last = traceback.extract_tb(err.__traceback__)[-1]
        result.supported = False
        result.reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} ({Path(last.filename).name}:{last.lineno})"
    return result


def walk(model_types: list[str] | None = None) -> list[WalkResult]:
    """:func:`walk_family` over ``model_types`` (default: every MoE type of transformers)."""
    return [walk_family(t) for t in (model_types or moe_model_types())]


def family_table(results: list[WalkResult]) -> str:
    """The README's family table (markdown): supported families first, then the rest with reasons."""
    lines = [
        "| model type | router semantics | experts layout | router modes | shared experts |",
        "|---|---|---|---|---|",
    ]
    for r in sorted((r for r in results if r.supported), key=lambda r: r.model_type):
        lines.append(
            f"| `{r.model_type}` | {r.semantics or 'top-1 with capacity'} | {r.layout or 'module per expert'} "
            f"| {', '.join(r.modes)} | {'kept as is' if r.shared else ''} |"
        )
    lines += ["", "| model type | not supported because |", "|---|---|"]
    for r in sorted((r for r in results if not r.supported), key=lambda r: r.model_type):
        lines.append(f"| `{r.model_type}` | {r.reason} |")
    return "\n".join(lines) + "\n"
