"""Figures of the paper's analyses, drawn from stage outputs (PNG, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # stages run headless
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    # A stage killed while drawing must not leave a truncated PNG that looks finished.
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(tmp, path)


def _short(name: str) -> str:
    parts = name.split(".")
    return f"{parts[0]}.{parts[2]}" if len(parts) > 2 else name


def plot_expert_usage(frequencies: dict[str, torch.Tensor], path: Path) -> None:
    """Heatmap of usage frequency, SMoE layers x experts (MC-SMoE Figure 3)."""
    plt = _pyplot()
    names = list(frequencies)
    data = torch.stack([frequencies[n].float() for n in names]).numpy()
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * data.shape[1] + 2), 0.6 * len(names) + 1.5))
    im = ax.imshow(data, cmap="viridis", aspect="auto", vmin=0)
    ax.set_yticks(range(len(names)), [_short(n) for n in names])
    ax.set_xticks(range(data.shape[1]))
    ax.set_xlabel("expert")
    ax.set_title("Expert usage frequency (profiled tokens)")
    fig.colorbar(im, ax=ax, label="share of the layer's tokens")
    fig.tight_layout()
    _save(plt, fig, path)


def plot_groups(groups: dict, path: Path) -> None:
    """Which experts merged into which, per layer: colour = group, box = dominant expert."""
    plt = _pyplot()
    layers = groups["layers"]
    names = list(layers)
    n_exp = max(max(e for g in v["groups"] for e in g) + 1 for v in layers.values())
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * n_exp + 2), 0.6 * len(names) + 1.5))
    cmap = plt.get_cmap("tab20")
    for row, name in enumerate(names):
        for gi, members in enumerate(layers[name]["groups"]):
            for e in members:
                ax.add_patch(plt.Rectangle((e - 0.45, row - 0.4), 0.9, 0.8, color=cmap(gi % 20)))
                ax.text(e, row, str(gi), ha="center", va="center", fontsize=7)
            if layers[name]["merged"]:
                d = members[0]
                ax.add_patch(plt.Rectangle((d - 0.45, row - 0.4), 0.9, 0.8, fill=False, lw=2, ec="black"))
    ax.set_xlim(-0.6, n_exp - 0.4)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_yticks(range(len(names)), [_short(n) + ("" if layers[n]["merged"] else " (kept)") for n in names])
    ax.set_xticks(range(n_exp))
    ax.set_xlabel("expert (number = its group; black box = dominant expert)")
    ax.set_title(f"Expert groups ({groups.get('similarity', '')}, {groups.get('ratio', '')})")
    fig.tight_layout()
    _save(plt, fig, path)


def plot_stable_rank_change(change: dict[str, dict], path: Path) -> None:
    """Per merged layer, mean relative change of the dominant experts' stable rank (MC-SMoE Figure 4)."""
    plt = _pyplot()
    names = list(change)
    values = [100 * change[n]["mean_change_ratio"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 3.8))
    ax.bar(range(len(names)), values, color=["tab:red" if v < 0 else "tab:blue" for v in values])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), [_short(n) for n in names])
    ax.set_ylabel("stable rank change (%)")
    ax.set_title("Dominant experts' stable rank: change by merging")
    fig.tight_layout()
    _save(plt, fig, path)


def plot_remaining_params(ratios: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Heatmaps, one per compressed variant: share of each expert's parameters kept (MC-SMoE Figure 5)."""
    plt = _pyplot()
    variants = list(ratios)
    n_exp = max(len(r) for v in variants for r in ratios[v].values())
    n_rows = max(len(ratios[v]) for v in variants)
    fig, axes = plt.subplots(
        len(variants),
        1,
        figsize=(max(6, 0.45 * n_exp + 2), (0.6 * n_rows + 1.2) * len(variants)),
        squeeze=False,
    )
    for ax, v in zip(axes[:, 0], variants, strict=True):
        names = list(ratios[v])
        data = torch.full((len(names), n_exp), float("nan"))
        for i, n in enumerate(names):
            data[i, : len(ratios[v][n])] = torch.tensor(ratios[v][n])
        im = ax.imshow(data.numpy(), cmap="magma", aspect="auto", vmin=0, vmax=1)
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                if not torch.isnan(data[i, j]):
                    ax.text(
                        j, i, f"{100 * data[i, j]:.0f}", ha="center", va="center", fontsize=6, color="grey"
                    )
        ax.set_yticks(range(len(names)), [_short(n) for n in names])
        ax.set_xticks(range(n_exp))
        ax.set_xlabel("expert")
        ax.set_title(f"{v}: remaining parameters per expert (%)")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    _save(plt, fig, path)


def headline_metric(results: dict[str, dict]) -> str:
    """The quality metric a variant table is read by: accuracy, or a decoder's mean zero-shot
    accuracy, or perplexity when there is neither."""
    first = next(iter(results.values()), {})
    for key in ("accuracy", "mean_accuracy", "test_perplexity"):
        if key in first:
            return key
    raise ValueError(
        f"no quality metric among {sorted(first)}; expected accuracy, mean_accuracy or test_perplexity"
    )


def accuracy_vs_size_figure(results: dict[str, dict]):
    """Each variant's quality metric against its expert parameters (a matplotlib figure)."""
    plt = _pyplot()
    metric = headline_metric(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        x, y = r.get("expert_params", r.get("params_total", 0)) / 1e6, r[metric]
        ax.scatter([x], [y])
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("expert parameters (M)")
    ax.set_ylabel(metric)
    ax.set_title("quality against size, per variant")
    fig.tight_layout()
    return fig
