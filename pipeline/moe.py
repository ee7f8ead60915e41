"""Family-independent building blocks of merged and compressed SMoE layers."""

from __future__ import annotations

import torch
from torch import nn


class LowRankSparseLinear(nn.Module):
    """A bias-free linear layer stored as ``W = U V + S`` (LoSparse).

    ``S`` is either dense with a column mask (while it is being pruned) or compact: only the kept
    columns and their input indices, so pruned columns cost neither memory nor bytes on disk.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, kept_columns: int | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.u = nn.Parameter(torch.empty(out_features, rank))
        self.v = nn.Parameter(torch.empty(rank, in_features))
        if kept_columns is None:
            self.s = nn.Parameter(torch.zeros(out_features, in_features))
            self.register_buffer("s_mask", torch.ones(in_features, dtype=torch.bool))
        else:
            self.s = nn.Parameter(torch.zeros(out_features, kept_columns))
            self.register_buffer("s_index", torch.zeros(kept_columns, dtype=torch.long))

    @property
    def compact(self) -> bool:
        return hasattr(self, "s_index")

    @classmethod
    def from_weight(cls, weight: torch.Tensor, rank: int) -> LowRankSparseLinear:
        """Initialise from a dense ``[out, in]`` weight: truncated SVD plus the exact residual."""
        out_f, in_f = weight.shape
        if not 0 < rank <= min(out_f, in_f):
            raise ValueError(f"rank {rank} must be in [1, {min(out_f, in_f)}] for a {out_f}x{in_f} matrix")
        w = weight.detach().float()
        u, sig, vh = torch.linalg.svd(w, full_matrices=False)
        root = sig[:rank].sqrt()
        mod = cls(in_f, out_f, rank).to(w.device)
        with torch.no_grad():
            mod.u.copy_(u[:, :rank] * root)
            mod.v.copy_(root[:, None] * vh[:rank])
            mod.s.copy_(w - mod.u @ mod.v)
        return mod.to(weight.dtype)

    def sparse_weight(self) -> torch.Tensor:
        """S as a dense ``[out, in]`` matrix (pruned columns are zero)."""
        if self.compact:
            dense = self.s.new_zeros(self.out_features, self.in_features)
            dense[:, self.s_index] = self.s
            return dense
        return self.s * self.s_mask

    def dense_weight(self) -> torch.Tensor:
        return self.u @ self.v + self.sparse_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.v.t()) @ self.u.t()
        if self.compact:
            if self.s.shape[1]:
                y = y + x.index_select(-1, self.s_index) @ self.s.t()
            return y
        return y + x @ (self.s * self.s_mask).t()

    @torch.no_grad()
    def to_compact(self) -> LowRankSparseLinear:
        """A copy holding only the unmasked columns of S."""
        if self.compact:
            return self
        idx = self.s_mask.nonzero().flatten()
        mod = LowRankSparseLinear(self.in_features, self.out_features, self.rank, kept_columns=len(idx))
        mod = mod.to(device=self.u.device, dtype=self.u.dtype)
        mod.u.copy_(self.u)
        mod.v.copy_(self.v)
        mod.s.copy_(self.s[:, idx])
        mod.s_index.copy_(idx)
        return mod

    def structure(self) -> dict:
        """What a loader needs to rebuild this module before loading its weights."""
        return {
            "type": "low_rank_sparse",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "kept_columns": int(self.s.shape[1]) if self.compact else None,
        }

    def extra_repr(self) -> str:
        kept = self.s.shape[1] if self.compact else int(self.s_mask.sum())
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, s_columns_kept={kept}"


def linear_from_structure(spec: dict) -> nn.Module:
    """Rebuild an (empty) linear module from :meth:`LowRankSparseLinear.structure`-style specs."""
    if spec["type"] == "low_rank_sparse":
        return LowRankSparseLinear(
            spec["in_features"], spec["out_features"], spec["rank"], spec["kept_columns"]
        )
    raise ValueError(f"unknown module type {spec['type']!r} in model structure; valid: low_rank_sparse")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The effective ``[out, in]`` weight of a dense or low-rank+sparse linear layer."""
    if isinstance(module, LowRankSparseLinear):
        return module.dense_weight()
    return module.weight


def dispatch_by_group(
    hidden: torch.Tensor,
    group_index: torch.Tensor,
    scale: torch.Tensor,
    experts: list[nn.Module],
) -> torch.Tensor:
    """Run each expert once on all tokens of its group (tokens sorted by expert, one matmul each).

    ``group_index`` is ``[T]`` with -1 for dropped tokens; ``scale`` is ``[T, 1]``.
    """
    out = torch.zeros_like(hidden)
    kept = (group_index >= 0).nonzero().flatten()
    if kept.numel() == 0:
        return out
    order = kept[torch.argsort(group_index[kept], stable=True)]
    counts = torch.bincount(group_index[order], minlength=len(experts)).tolist()
    # One gather into expert order, contiguous slices per expert, one scatter back.
    xs = hidden.index_select(0, order)
    ys = torch.empty_like(xs)
    start = 0
    for g, n in enumerate(counts):
        if n:
            ys[start : start + n] = experts[g](xs[start : start + n]).to(ys.dtype)
            start += n
    out.index_copy_(0, order, ys * scale.index_select(0, order).to(ys.dtype))
    return out
