"""Router modes after merging, compact checkpoints, and the sorted-by-expert forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipeline.compression import as_identity_merged, compress_model, finalize_compact, low_rank_sparse_modules
from pipeline.families import adapter_for
from pipeline.families.switch import LogSumExpGroupRouter, MergedSwitchSparseMLP
from pipeline.merging import merge_model
from pipeline.modeling import STRUCTURE_FILE, count_unique_params, load_model, save_model
from pipeline.moe import LowRankSparseLinear
from pipeline.registry import UnknownChoiceError
from pipeline.routing import ROUTER_MODES, set_router_mode
from pipeline.training import model_forward
from tests.conftest import N_EXPERTS, TINY, logits, profiles_for

# Groups of each SMoE layer, dominant first. Uneven sizes so that routing mistakes show.
UNIFORM = [[2, 0, 1], [5, 3, 4, 6, 7]]
UNEVEN = {0: [[0, 1, 2, 3, 4, 5, 6], [7]], 1: [[1, 0], [2, 3], [4, 5, 6, 7]], 2: UNIFORM}


def _merge(model, per_layer: dict[int, list[list[int]]]):
    adapter = adapter_for(model)
    layers = adapter.sparse_layers(model)
    groups = {"layers": {}}
    for i, ly in enumerate(layers):
        g = per_layer.get(i)
        groups["layers"][ly.name] = {"merged": g is not None, "groups": g or [[e] for e in range(N_EXPERTS)]}
    merge_model(model, adapter, groups, profiles_for([ly.name for ly in layers]), "frequency")
    return adapter


def _redirected(original, merged_model, per_layer):
    """The merged-with-redirect model: a stock model whose every original expert slot holds a copy
    of its group's merged expert (all N slots kept, router untouched)."""
    ref = copy.deepcopy(original)
    adapter = adapter_for(ref)
    merged_layers = adapter.sparse_layers(merged_model)
    for i, ly in enumerate(adapter.sparse_layers(ref)):
        for g, members in enumerate(per_layer.get(i, [])):
            w = adapter.expert_weights(merged_layers[i], g)
            for e in members:
                adapter.set_expert_weights(ly, e, w)
    return ref


def _hidden(seed=0):
    return torch.randn(4, 12, TINY["d_model"], generator=torch.Generator().manual_seed(seed))


def test_remap_is_exactly_the_merged_with_redirect_model(tiny_model, batch):
    original = copy.deepcopy(tiny_model)
    adapter = _merge(tiny_model, UNEVEN)
    set_router_mode(tiny_model, adapter, "remap")
    reference = _redirected(original, tiny_model, UNEVEN)
    assert torch.allclose(logits(tiny_model, batch), logits(reference, batch), atol=1e-6)
    # Layer by layer too, on hidden states that spread over every expert.
    for merged, stock in zip(
        adapter.sparse_layers(tiny_model), adapter.sparse_layers(reference), strict=True
    ):
        with torch.no_grad():
            assert torch.allclose(merged.module(_hidden()), stock.module(_hidden()), atol=1e-6)


def test_prune_keeps_each_group_dominant_router_row(tiny_model):
    adapter = adapter_for(tiny_model)
    before = [adapter.router(ly).classifier.weight.clone() for ly in adapter.sparse_layers(tiny_model)]
    _merge(tiny_model, UNEVEN)
    report = set_router_mode(tiny_model, adapter, "prune")
    for i, ly in enumerate(adapter.sparse_layers(tiny_model)):
        dominant = [g[0] for g in UNEVEN[i]]
        assert torch.equal(adapter.router(ly).classifier.weight, before[i][dominant])
        assert report[ly.name]["router_outputs"] == len(UNEVEN[i]) == ly.module.router.num_experts
        assert ly.module.expert_map.tolist() == list(range(len(UNEVEN[i])))


def test_prune_logsumexp_gives_each_group_its_members_probability_mass(tiny_model):
    adapter = _merge(tiny_model, UNEVEN)
    layer = adapter.sparse_layers(tiny_model)[1]
    with torch.no_grad():
        full_logits = adapter.router(layer).classifier(_hidden())
    set_router_mode(tiny_model, adapter, "prune-logsumexp")
    router = adapter.router(layer)
    assert isinstance(router, LogSumExpGroupRouter)
    with torch.no_grad():
        dispatch, top, group_logits = router(_hidden())
    p = full_logits.softmax(-1)
    mass = torch.stack([p[..., g].sum(-1) for g in UNEVEN[1]], dim=-1)
    assert torch.allclose(group_logits.softmax(-1), mass, atol=1e-6)
    assert torch.allclose(top.squeeze(-1), mass.max(-1).values, atol=1e-6)
    assert dispatch.shape[-1] == 3 and torch.equal(dispatch.argmax(-1), mass.argmax(-1))


def test_router_mode_is_set_once_and_unknown_modes_list_the_choices(tiny_model):
    adapter = _merge(tiny_model, UNEVEN)
    with pytest.raises(UnknownChoiceError, match="valid choices: prune, prune-logsumexp, remap"):
        set_router_mode(tiny_model, adapter, "top2")
    set_router_mode(tiny_model, adapter, "prune")
    with pytest.raises(ValueError, match="already has router mode 'prune'"):
        set_router_mode(tiny_model, adapter, "prune-logsumexp")
    assert ROUTER_MODES.names() == ["prune", "prune-logsumexp", "remap"]


def test_uniform_pruned_model_saved_compact_loads_in_stock_transformers(tiny_model, batch, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    adapter = _merge(tiny_model, {0: UNIFORM, 1: UNIFORM, 2: UNIFORM})
    set_router_mode(tiny_model, adapter, "prune")
    assert adapter.stock_config_overrides(tiny_model) == {"num_experts": 2}
    expected = logits(tiny_model, batch)
    save_model(tiny_model, tmp_path / "m")
    stock = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "m")).eval()
    assert type(stock).__name__ == "SwitchTransformersForConditionalGeneration"
    assert stock.config.num_experts == 2
    assert torch.allclose(logits(stock, batch), expected, atol=1e-5)
    assert count_unique_params(stock) == count_unique_params(tiny_model)
    full_params = count_unique_params(load_model_like(tiny_model))
    d, f = TINY["d_model"], TINY["d_ff"]
    # 3 layers lose 6 experts (2 matrices of d x f) and 6 router rows each.
    assert full_params - count_unique_params(stock) == 3 * 6 * (2 * d * f + d)
    for ly in adapter_for(stock).sparse_layers(stock):
        assert len(ly.module.experts) == 2 and ly.module.router.classifier.out_features == 2
    # The project's loader restores its own layers, with the same outputs.
    ours = load_model(tmp_path / "m")
    assert all(ly.module.router_mode == "prune" for ly in adapter.sparse_layers(ours))
    assert torch.allclose(logits(ours, batch), expected, atol=1e-6)


def load_model_like(model):
    """A stock model of ``model``'s config with every layer at N experts (the full size)."""
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    config = SwitchTransformersConfig(**{**model.config.to_dict(), "num_experts": N_EXPERTS})
    return SwitchTransformersForConditionalGeneration(config)


@pytest.mark.parametrize("mode", ["remap", "prune", "prune-logsumexp"])
def test_uneven_merges_reload_with_the_project_loader(tiny_model, batch, tmp_path, mode):
    adapter = _merge(tiny_model, UNEVEN)
    set_router_mode(tiny_model, adapter, mode)
    assert adapter.stock_config_overrides(tiny_model) is None
    expected = logits(tiny_model, batch)
    save_model(tiny_model, tmp_path / "m")
    assert (tmp_path / STRUCTURE_FILE).exists() or (tmp_path / "m" / STRUCTURE_FILE).is_file()
    reloaded = load_model(tmp_path / "m")
    assert reloaded.config.num_experts == N_EXPERTS
    for i, ly in enumerate(adapter.sparse_layers(reloaded)):
        assert len(ly.module.experts) == len(UNEVEN[i]) and ly.module.router_mode == mode
    assert torch.allclose(logits(reloaded, batch), expected, atol=1e-6)


def _densified(model):
    """Reference forward of a compressed model: every U V + S replaced by one dense matrix."""
    ref = copy.deepcopy(model)
    for name, m in low_rank_sparse_modules(ref).items():
        lin = nn.Linear(m.in_features, m.out_features, bias=False)
        with torch.no_grad():
            lin.weight.copy_(m.dense_weight())
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent), child, lin)
    return ref


def test_fast_forward_matches_the_reference_for_full_model(tiny_model, batch):
    reference = copy.deepcopy(tiny_model)
    adapter = adapter_for(tiny_model)
    for ly in adapter.sparse_layers(tiny_model):
        as_identity_merged(tiny_model, adapter, ly)
    assert all(isinstance(ly.module, MergedSwitchSparseMLP) for ly in adapter.sparse_layers(tiny_model))
    assert torch.allclose(logits(tiny_model, batch), logits(reference, batch), atol=1e-5)
    for fast, stock in zip(adapter.sparse_layers(tiny_model), adapter.sparse_layers(reference), strict=True):
        with torch.no_grad():
            assert torch.allclose(fast.module(_hidden(1)), stock.module(_hidden(1)), atol=1e-5)


@pytest.mark.parametrize("mode", ["remap", "prune", "prune-logsumexp"])
def test_fast_forward_matches_the_reference_for_merged_and_compressed(tiny_model, batch, mode):
    original = copy.deepcopy(tiny_model)
    adapter = _merge(tiny_model, UNEVEN)
    if mode == "remap":
        reference = _redirected(original, tiny_model, UNEVEN)
        assert torch.allclose(logits(tiny_model, batch), logits(reference, batch), atol=1e-5)
    set_router_mode(tiny_model, adapter, mode)
    compress_model(tiny_model, adapter, rank=4, scope="all")
    # Prune half the columns of every S so the compact sparse path runs.
    for m in low_rank_sparse_modules(tiny_model).values():
        with torch.no_grad():
            m.s_mask[::2] = False
    finalize_compact(tiny_model)
    assert all(m.compact for m in low_rank_sparse_modules(tiny_model).values())
    assert isinstance(next(iter(low_rank_sparse_modules(tiny_model).values())), LowRankSparseLinear)
    reference = _densified(tiny_model)
    assert torch.allclose(logits(tiny_model, batch), logits(reference, batch), atol=1e-5)


def test_router_losses_when_merged_layers_have_different_router_widths(tiny_model, batch):
    adapter = _merge(tiny_model, {1: UNEVEN[1], 2: UNIFORM})  # widths 8, 3 and 2
    set_router_mode(tiny_model, adapter, "prune-logsumexp")
    tiny_model.train()
    out = model_forward(tiny_model, batch)
    for name in ("encoder_z_loss", "encoder_aux_loss", "decoder_z_loss", "decoder_aux_loss"):
        assert torch.isfinite(getattr(out, name)) and getattr(out, name) > 0
    (out.encoder_aux_loss + out.encoder_z_loss).backward()
    for ly in adapter.sparse_layers(tiny_model)[:2]:
        assert adapter.router(ly).classifier.weight.grad.abs().sum() > 0


def test_router_losses_of_equal_width_layers_are_the_stock_ones(tiny_model, batch):
    stock = model_forward(tiny_model, batch)
    # Force the per-layer path: the z-loss (a mean over tokens) must not change.
    adapter = adapter_for(tiny_model)
    for ly in adapter.sparse_layers(tiny_model):
        as_identity_merged(tiny_model, adapter, ly)
    set_router_mode(tiny_model, adapter, "prune-logsumexp")  # identity groups: same logits
    ours = model_forward(tiny_model, batch)
    assert torch.allclose(ours.encoder_z_loss, stock.encoder_z_loss, atol=1e-6)
    assert torch.allclose(ours.decoder_z_loss, stock.decoder_z_loss, atol=1e-6)
    assert torch.allclose(ours.logits, stock.logits, atol=1e-5)
