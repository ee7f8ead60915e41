"""The registered choices where the paper's text, the authors' code and this project differed.

Each test is a small hand-worked example of one choice: frequency normalisation and unused experts
in the dominant-expert budget, weight matching with or without wo, router freezing and the two KD
loss forms, length-bucketed batches, and the params that select them.
"""

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.align import align_model, weight_matching_permutation
from pipeline.config import ParamsError, parse_params
from pipeline.data import batches
from pipeline.families import adapter_for
from pipeline.grouping import dominant_budget, group_experts, normalised_frequency
from pipeline.training import KDSettings, freeze_routers, kd_loss, train
from tests.conftest import CLASS_TARGETS, PAD_ID, logits, train_settings

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- frequency normalisation


# Worked by hand: a layer that spreads 100 tokens over 4 experts, and one that sends 70 to one
# expert and splits the rest between two.
EVEN = torch.tensor([30.0, 27.0, 23.0, 20.0])
PEAKED = torch.tensor([70.0, 15.0, 15.0, 0.0])


def test_sum_top1_and_max_normalise_as_worked_by_hand():
    assert normalised_frequency(EVEN, "max").tolist() == pytest.approx([1.0, 0.9, 23 / 30, 20 / 30])
    assert normalised_frequency(EVEN, "sum-top1").tolist() == pytest.approx([1.0, 0.27, 0.23, 0.20])
    assert normalised_frequency(PEAKED, "sum-top1").tolist() == pytest.approx([1.0, 0.15, 0.15, 0.0])


def test_sum_and_max_normalisation_give_different_counts():
    # "wide" spreads 100 tokens over 8 experts, "two" over 2 (60/40).
    #   max:      wide -> 1, .9, .8, .7, ...      two -> 1, .667, 0, ...
    #   sum-top1: wide -> 1, .18, .16, .14, ...   two -> 1, .4, 0, ...
    # 2 per layer = 4 dominant experts: one per layer up front, then the 2 best other scores.
    wide = torch.tensor([20.0, 18, 16, 14, 12, 10, 6, 4])
    two = torch.tensor([60.0, 40, 0, 0, 0, 0, 0, 0])
    freqs = {"wide": wide, "two": two}
    assert dominant_budget(freqs, 2, "adaptive", "max") == {"wide": 3, "two": 1}  # .9, .8
    assert dominant_budget(freqs, 2, "adaptive", "sum-top1") == {"wide": 2, "two": 2}  # .4, .18


def test_unknown_normalisation_lists_the_choices():
    with pytest.raises(ValueError, match="valid choices: max, sum-top1"):
        normalised_frequency(EVEN, "softmax")


# ---------------------------------------------------------------- unused experts


def test_unused_experts_are_never_dominant_and_the_budget_stays_unspent():
    freqs = {"a": torch.tensor([5.0, 3.0, 0.0, 0.0]), "b": torch.tensor([4.0, 4.0, 2.0, 1.0])}
    # 4 per layer = 8 asked; only 2 + 4 experts were used, so 2 places stay unspent.
    assert dominant_budget(freqs, 4, "adaptive", "sum-top1", allow_unused=False) == {"a": 2, "b": 4}
    assert dominant_budget(freqs, 4, "adaptive", "sum-top1", allow_unused=True) == {"a": 4, "b": 4}
    assert dominant_budget(freqs, 3, "uniform", allow_unused=False) == {"a": 2, "b": 3}


def test_a_layer_nobody_used_still_keeps_one():
    freqs = {"idle": torch.zeros(4), "busy": torch.tensor([3.0, 2.0, 1.0, 0.0])}
    assert dominant_budget(freqs, 2, "adaptive", "sum-top1", allow_unused=False) == {"idle": 1, "busy": 3}


def test_grouping_reports_unspent_budget():
    from tests.test_grouping import _data

    freqs = {"a": torch.tensor([5.0, 3.0, 0.0, 0.0]), "b": torch.tensor([4.0, 4.0, 2.0, 1.0])}
    data = {n: _data(4, seed=i, name=n) for i, n in enumerate(freqs)}
    groups = group_experts(data, freqs, list(freqs), 4, "router-logits", "adaptive", "sum-top1", False)
    assert groups["budget_unspent"] == 2 and groups["dominant_experts"] == 6
    # The unused experts of "a" join a dominant one instead of leading a group.
    assert sorted(g[0] for g in groups["layers"]["a"]["groups"]) == [0, 1]


# ---------------------------------------------------------------- weight matching without wo


def test_include_wo_false_matches_on_wi_alone():
    g = torch.Generator().manual_seed(0)
    axes = {"wi": 0, "wo": 1}
    ref = {"wi": torch.randn(6, 4, generator=g), "wo": torch.randn(4, 6, generator=g)}
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    # "other" has ref's wi permuted but an unrelated wo: only the wi-only cost recovers perm.
    other = {"wi": ref["wi"][perm.argsort()], "wo": torch.randn(4, 6, generator=g) * 50}
    found = weight_matching_permutation(ref, other, axes, include_wo=False)
    assert torch.equal(other["wi"][found], ref["wi"])
    with_wo = weight_matching_permutation(ref, other, axes, include_wo=True)
    assert not torch.equal(other["wi"][with_wo], ref["wi"])


def test_alignment_without_wo_leaves_outputs_unchanged(tiny_model, batch):
    before = logits(tiny_model, batch)
    report = align_model(tiny_model, adapter_for(tiny_model), "weight-matching", "first", include_wo=False)
    assert sum(r["neurons_moved"] for r in report.values()) > 0
    assert torch.allclose(logits(tiny_model, batch), before, atol=1e-5)


# ---------------------------------------------------------------- KD: routers and loss forms


def test_kd_loss_forms_on_a_known_pair_of_distributions():
    # One sequence, two target positions, two classes. Teacher p = (.5, .5) at both; the student's
    # logits give q = (e/(1+e), 1/(1+e)) at T=1. KL(p||q) per position, worked by hand:
    q1 = math.e / (1 + math.e)
    kl = 0.5 * math.log(0.5 / q1) + 0.5 * math.log(0.5 / (1 - q1))
    student = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    teacher = torch.zeros(1, 2, 2)
    labels = torch.tensor([[0, 1]])
    # hinton: mean over the 2 target tokens x T^2; reference: summed over positions / batch of 1.
    assert float(kd_loss(student, teacher, labels, 1.0, form="hinton")) == pytest.approx(kl, rel=1e-5)
    assert float(kd_loss(student, teacher, labels, 1.0, form="reference")) == pytest.approx(2 * kl, rel=1e-5)
    # At T=2 the logits halve; hinton multiplies by 4, reference does not.
    q2 = math.exp(0.5) / (1 + math.exp(0.5))
    kl2 = 0.5 * math.log(0.5 / q2) + 0.5 * math.log(0.5 / (1 - q2))
    assert float(kd_loss(student, teacher, labels, 2.0, form="hinton")) == pytest.approx(4 * kl2, rel=1e-5)
    assert float(kd_loss(student, teacher, labels, 2.0, form="reference")) == pytest.approx(2 * kl2, rel=1e-5)


def test_unknown_kd_loss_lists_the_choices():
    with pytest.raises(ValueError, match="valid choices: hinton, reference"):
        kd_loss(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.tensor([[0]]), 1.0, form="mse")


def test_frozen_routers_are_unchanged_by_a_kd_step(tiny_model, rows):
    teacher = copy.deepcopy(tiny_model)
    adapter = adapter_for(tiny_model)
    routers = {ly.name: adapter.router(ly) for ly in adapter.sparse_layers(tiny_model)}
    before = {n: [p.detach().clone() for p in r.parameters()] for n, r in routers.items()}
    experts_before = adapter.expert_weights(adapter.sparse_layers(tiny_model)[0], 0)["wi"].clone()
    assert freeze_routers(tiny_model) == sum(len(b) for b in before.values())
    settings = train_settings(router_aux_loss_coef=1e-2)
    train(
        tiny_model,
        rows[:32],
        rows[:8],
        CLASS_TARGETS,
        PAD_ID,
        settings,
        CPU,
        kd=KDSettings(teacher, 0.5, 2.0, "reference"),
        progress=False,
    )
    for n, r in routers.items():
        for old, new in zip(before[n], r.parameters(), strict=True):
            assert torch.equal(old, new), n
    layer0 = adapter.sparse_layers(tiny_model)[0]
    assert not torch.equal(adapter.expert_weights(layer0, 0)["wi"], experts_before)


# ---------------------------------------------------------------- length-bucketed batches


def _rows_of_lengths(lengths):
    return [{"input_ids": [5] * n, "labels": [1], "label": 0} for n in lengths]


def test_bucketed_batches_cover_every_row_once_with_little_padding():
    lengths = [(i * 37) % 50 + 1 for i in range(400)]
    rows = _rows_of_lengths(lengths)
    plain = list(batches(rows, 8, 0, shuffle=True, seed=3))
    bucketed = list(batches(rows, 8, 0, shuffle=True, seed=3, bucket_batches=10))
    assert sum(b["input_ids"].shape[0] for b in bucketed) == len(rows)
    assert sorted(int(n) for b in bucketed for n in b["attention_mask"].sum(1)) == sorted(lengths)
    padded = sum(b["input_ids"].numel() for b in bucketed)
    assert padded < 0.7 * sum(b["input_ids"].numel() for b in plain)
    again = list(batches(rows, 8, 0, shuffle=True, seed=3, bucket_batches=10))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(bucketed, again, strict=True))


def test_bucketing_is_off_without_shuffle():
    rows = _rows_of_lengths([3, 1, 2, 5])
    out = list(batches(rows, 2, 0, bucket_batches=4))
    assert [int(n) for b in out for n in b["attention_mask"].sum(1)] == [3, 1, 2, 5]


# ---------------------------------------------------------------- params


def _params(**sections) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in sections.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return raw


@pytest.mark.parametrize(
    "key, bad, choices",
    [
        ("group__frequency_norm", "softmax", "max, sum-top1"),
        ("compress__prune_axis", "diagonal", "column, row"),
        ("compress__prune_score", "median", "mean, sum"),
        ("kd__loss", "mse", "hinton, reference"),
    ],
)
def test_unknown_choice_names_are_params_errors_listing_the_valid_ones(key, bad, choices):
    with pytest.raises(ParamsError, match=f"valid choices: {choices}"):
        parse_params(_params(**{key: bad}))


def test_beta2_of_one_is_accepted_and_above_one_is_not():
    assert parse_params(_params(compress__beta2=1.0)).compress.beta2 == 1.0
    with pytest.raises(ParamsError, match="compress.beta2"):
        parse_params(_params(compress__beta2=1.5))


def test_defaults_follow_the_authors_where_the_paper_is_silent():
    p = parse_params(_params())
    assert p.group.frequency_norm == "sum-top1" and p.group.dominant_unused is False
    assert p.kd.loss == "reference" and p.kd.freeze_router is True
    assert p.kd.train.router_z_loss_coef == 0 and p.kd.train.router_aux_loss_coef == 0
    assert p.compress.prune_axis == "column" and p.compress.prune_score == "mean"
    assert p.align.include_wo is True and p.evaluate.split == "test"


# ---------------------------------------------------------------- knock-out


def test_zero_experts_silences_only_the_named_layers(tiny_model, batch):
    from pipeline.knockout import zero_experts

    adapter = adapter_for(tiny_model)
    layers = adapter.sparse_layers(tiny_model)
    keep, gone = layers[0], layers[1]
    kept_before = adapter.expert_weights(keep, 0)["wi"].clone()
    before = logits(tiny_model, batch)
    assert zero_experts(tiny_model, adapter, {gone.name}) == 1
    for e in range(adapter.num_experts(gone)):
        assert all(float(w.abs().sum()) == 0.0 for w in adapter.expert_weights(gone, e).values())
    assert torch.equal(adapter.expert_weights(keep, 0)["wi"], kept_before)
    after = logits(tiny_model, batch)
    assert torch.isfinite(after).all() and not torch.allclose(after, before)
