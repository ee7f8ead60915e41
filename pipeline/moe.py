"""Family-independent building blocks of merged and compressed SMoE layers."""

from __future__ import annotations

import torch
from torch import nn

# Which dim of S (``[out, in]``) one mask / index entry selects: a column is an input feature, a
# row an output feature.
S_AXIS_DIMS = {"column": 1, "row": 0}


def _check_axis(axis: str) -> int:
    if axis not in S_AXIS_DIMS:
        raise ValueError(f"unknown S axis {axis!r}; valid choices: {', '.join(sorted(S_AXIS_DIMS))}")
    return S_AXIS_DIMS[axis]


class LowRankSparseLinear(nn.Module):
    """A linear layer stored as ``W = U V + S`` (LoSparse), with an optional bias ``b`` (added after).

    ``S`` is structured along ``s_axis``: its units are columns (input features) or rows (output
    features). It is either dense with a mask over those units (while it is being pruned) or
    compact: only the kept units and their indices, so pruned units cost neither memory nor bytes
    on disk. ``s_regrow`` (set by the pruner) makes masked entries still receive gradients in
    training mode, so their importance can rise and bring them back.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        kept_units: int | None = None,
        s_axis: str = "column",
        bias: bool = False,
    ) -> None:
        super().__init__()
        dim = _check_axis(s_axis)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.s_axis = s_axis
        self.s_regrow = False
        self.u = nn.Parameter(torch.empty(out_features, rank))
        self.v = nn.Parameter(torch.empty(rank, in_features))
        if kept_units is None:
            self.s = nn.Parameter(torch.zeros(out_features, in_features))
            self.register_buffer("s_mask", torch.ones(self.s.shape[dim], dtype=torch.bool))
        else:
            shape = [out_features, in_features]
            shape[dim] = kept_units
            self.s = nn.Parameter(torch.zeros(*shape))
            self.register_buffer("s_index", torch.zeros(kept_units, dtype=torch.long))
        # Only REPAIRed merged experts have one (a bias that re-centres each neuron's pre-activation).
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def compact(self) -> bool:
        return hasattr(self, "s_index")

    @property
    def _dim(self) -> int:
        return S_AXIS_DIMS[self.s_axis]

    @property
    def s_unit_size(self) -> int:
        """Entries of S in one unit: ``out_features`` for a column, ``in_features`` for a row."""
        return self.out_features if self.s_axis == "column" else self.in_features

    def s_kept_entries(self) -> int:
        """Entries of S not pruned away (all of a compact S)."""
        if self.compact:
            return self.s.numel()
        return int(self.s_mask.sum()) * self.s_unit_size

    def s_mask_2d(self) -> torch.Tensor:
        """``s_mask`` shaped to broadcast against the dense ``[out, in]`` S."""
        return self.s_mask[None, :] if self.s_axis == "column" else self.s_mask[:, None]

    @torch.no_grad()
    def set_s_axis(self, axis: str) -> None:
        """Switch a dense, unpruned S to a (full) mask over ``axis``; pruned ones cannot switch."""
        dim = _check_axis(axis)
        if axis == self.s_axis:
            return
        if self.compact or not self.s_mask.all():
            raise ValueError(f"S is already pruned along {self.s_axis}s; it cannot switch to {axis}s")
        self.s_axis = axis
        self.s_mask = torch.ones(self.s.shape[dim], dtype=torch.bool, device=self.s_mask.device)

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, rank: int, bias: torch.Tensor | None = None
    ) -> LowRankSparseLinear:
        """Initialise from a dense ``[out, in]`` weight (and bias): truncated SVD plus the exact residual."""
        out_f, in_f = weight.shape
        if not 0 < rank <= min(out_f, in_f):
            raise ValueError(f"rank {rank} must be in [1, {min(out_f, in_f)}] for a {out_f}x{in_f} matrix")
        w = weight.detach().float()
        u, sig, vh = torch.linalg.svd(w, full_matrices=False)
        root = sig[:rank].sqrt()
        mod = cls(in_f, out_f, rank, bias=bias is not None).to(w.device)
        with torch.no_grad():
            mod.u.copy_(u[:, :rank] * root)
            mod.v.copy_(root[:, None] * vh[:rank])
            mod.s.copy_(w - mod.u @ mod.v)
            if bias is not None:
                mod.bias.copy_(bias.detach())
        return mod.to(weight.dtype)

    def sparse_weight(self) -> torch.Tensor:
        """S as a dense ``[out, in]`` matrix (pruned units are zero)."""
        if self.compact:
            dense = self.s.new_zeros(self.out_features, self.in_features)
            return dense.index_copy(self._dim, self.s_index, self.s)
        return self.s * self.s_mask_2d()

    def dense_weight(self) -> torch.Tensor:
        return self.u @ self.v + self.sparse_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.v.t()) @ self.u.t()
        if self.bias is not None:
            y = y + self.bias
        if self.compact:
            if not self.s.numel():
                return y
            if self.s_axis == "column":
                return y + x.index_select(-1, self.s_index) @ self.s.t()
            return y.index_add(-1, self.s_index, x @ self.s.t())
        mask = self.s_mask_2d()
        if self.training and self.s_regrow:
            # Straight-through: the value is s * mask (s - s.detach() is exactly 0), yet masked
            # entries get the gradient they would have if kept, so their importance stays live.
            s = self.s * mask + (self.s - self.s.detach()) * ~mask
        else:
            s = self.s * mask
        return y + x @ s.t()

    @torch.no_grad()
    def to_compact(self) -> LowRankSparseLinear:
        """A copy holding only the unmasked units (columns or rows) of S."""
        if self.compact:
            return self
        idx = self.s_mask.nonzero().flatten()
        mod = LowRankSparseLinear(
            self.in_features,
            self.out_features,
            self.rank,
            kept_units=len(idx),
            s_axis=self.s_axis,
            bias=self.bias is not None,
        )
        mod = mod.to(device=self.u.device, dtype=self.u.dtype)
        mod.u.copy_(self.u)
        mod.v.copy_(self.v)
        if self.bias is not None:
            mod.bias.copy_(self.bias)
        mod.s.copy_(self.s.index_select(self._dim, idx))
        mod.s_index.copy_(idx)
        return mod

    def structure(self) -> dict:
        """What a loader needs to rebuild this module before loading its weights."""
        spec = {
            "type": "low_rank_sparse",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "axis": self.s_axis,
            "kept_units": int(self.s.shape[self._dim]) if self.compact else None,
        }
        # Recorded only when present, so structure files of bias-free modules stay as they were.
        if self.bias is not None:
            spec["bias"] = True
        return spec

    def extra_repr(self) -> str:
        kept = self.s.shape[self._dim] if self.compact else int(self.s_mask.sum())
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"s_axis={self.s_axis}, s_{self.s_axis}s_kept={kept}"
        )


def linear_from_structure(spec: dict) -> nn.Module:
    """Rebuild an (empty) linear module from :meth:`LowRankSparseLinear.structure`-style specs
    (or ``{"type": "linear", ...}``: a dense layer recorded because it carries a bias)."""
    if spec["type"] == "linear":
        # Decoder structure files written before the families package named the sizes in/out.
        return nn.Linear(
            spec.get("in_features", spec.get("in")),
            spec.get("out_features", spec.get("out")),
            bias=bool(spec.get("bias", False)),
        )
    if spec["type"] == "low_rank_sparse":
        # Models saved before S could be pruned by rows have neither "axis" nor "kept_units".
        kept = spec["kept_units"] if "kept_units" in spec else spec.get("kept_columns")
        return LowRankSparseLinear(
            spec["in_features"],
            spec["out_features"],
            spec["rank"],
            kept,
            spec.get("axis", "column"),
            bias=bool(spec.get("bias", False)),
        )
    raise ValueError(
        f"unknown module type {spec['type']!r} in model structure; valid: linear, low_rank_sparse"
    )


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The effective ``[out, in]`` weight of a dense or low-rank+sparse linear layer."""
    if isinstance(module, LowRankSparseLinear):
        return module.dense_weight()
    return module.weight


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    """The ``[out]`` bias of a dense or low-rank+sparse linear layer (None when it has none)."""
    return getattr(module, "bias", None)


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
