"""MoE layer kinds for upcycled dense models: vanilla top-k MoE and MEO (Merging Experts into One).

MEO (He et al., EMNLP 2023) gates once per sequence and runs one expert whose weights are the
gate-weighted sum of the selected experts' weights, ``W = sum_i g_i W_i`` (biases likewise), so a
sequence costs about one expert pass instead of k. Every kind here sits behind one module,
:class:`MoEFeedForward`, that replaces a transformer block's feed-forward network:

* ``granularity="linear"`` (the authors'): each of the FFN's two linear maps is its own MoE with
  its own gate (the second gate reads the first map's activations);
* ``granularity="ffn"``: one gate per FFN; an expert is a whole FFN (both matrices merged with the
  same weights), the form MC-SMoE can align and merge.

Gates are Shazeer's noisy top-k: clean logits ``x W_g``, plus in training Gaussian noise of std
``softplus(x W_noise) + 0.01``; softmax over the top k, scattered into an E-vector; both matrices
start at zero. The sequence-level gate reads the mean over the sequence's real tokens only (the
authors' mean also pools padding, so a sequence's gate would depend on what it is batched with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.moe import linear_from_structure, linear_weight
from pipeline.registry import Registry

GRANULARITIES = ("linear", "ffn")
NOISE_EPSILON = 1e-2


@dataclass(frozen=True)
class LayerKind:
    """How an MoE layer routes and combines its experts."""

    name: str
    #: One gate decision per sequence (from the masked mean of its tokens) instead of per token.
    sequence_gate: bool
    #: Merge the selected experts' weights and run once (MEO) instead of running each expert.
    merge: bool
    #: A residual bottleneck on every token before the gate and the merged expert (MEO's token level).
    token_block: bool


MOE_LAYERS: Registry[LayerKind] = Registry("MoE layer kind")
for _kind in (
    LayerKind("moe", sequence_gate=False, merge=False, token_block=False),
    LayerKind("moe-sequence", sequence_gate=True, merge=False, token_block=False),
    LayerKind("meo-sequence", sequence_gate=True, merge=True, token_block=False),
    LayerKind("meo-token", sequence_gate=True, merge=True, token_block=True),
):
    MOE_LAYERS.register(_kind.name)(_kind)


def check_layer(kind: str, num_experts: int, top_k: int, granularity: str) -> LayerKind:
    """The registered kind, after checking k and the granularity; errors name the valid choices."""
    spec = MOE_LAYERS.get(kind)
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; valid choices: {', '.join(GRANULARITIES)}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    return spec


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation; zero for a single value."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


class NoisyTopKGate(nn.Module):
    """Shazeer et al.'s noisy top-k gate over ``rows`` experts, optionally grouped.

    ``forward(x [R, D])`` returns ``(gates [R, n_out], clean logits [R, n_out], aux loss)`` where the
    auxiliary loss is ``cv^2(importance) + cv^2(load)``, load being the smooth probability of
    being in the top k while noise is on. ``row_group`` (a merged layer's pruned router) makes each
    output the log-sum-exp of its group's rows.
    """

    def __init__(self, d_in: int, rows: int, top_k: int, noisy: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, d_in))
        self.noise_weight = nn.Parameter(torch.zeros(rows, d_in))
        self.top_k = top_k
        self.noisy = noisy
        self.register_buffer("row_group", torch.arange(rows), persistent=False)
        self.grouped = False

    @property
    def num_outputs(self) -> int:
        return int(self.row_group.max()) + 1 if self.grouped else self.weight.shape[0]

    def set_row_group(self, row_group: torch.Tensor | None) -> None:
        """Group rows into outputs by log-sum-exp (None: one output per row)."""
        if row_group is None:
            self.row_group = torch.arange(self.weight.shape[0], device=self.weight.device)
            self.grouped = False
        else:
            self.row_group = row_group.long().to(self.weight.device)
            self.grouped = True

    def _group(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.grouped:
            return logits
        member = F.one_hot(self.row_group, self.num_outputs).bool()
        return logits[:, :, None].masked_fill(~member, float("-inf")).logsumexp(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.to(self.weight.dtype)
        clean = self._group(F.linear(x, self.weight))
        n_out = clean.shape[-1]
        k = min(self.top_k, n_out)
        noisy = self.noisy and self.training and not self.grouped
        if noisy:
            std = F.softplus(F.linear(x, self.noise_weight)) + NOISE_EPSILON
            logits = clean + torch.randn_like(clean) * std
        else:
            logits = clean
        top, idx = logits.topk(min(k + 1, n_out), dim=-1)
        gates = torch.zeros_like(logits).scatter(-1, idx[:, :k], top[:, :k].softmax(-1))
        if noisy and k < n_out:
            load = _prob_in_top_k(clean, logits, std, top, k).sum(0)
        else:
            load = (gates > 0).to(gates.dtype).sum(0)
        aux = cv_squared(gates.sum(0)) + cv_squared(load)
        return gates, clean, aux


def _prob_in_top_k(
    clean: torch.Tensor, noisy: torch.Tensor, std: torch.Tensor, top: torch.Tensor, k: int
) -> torch.Tensor:
    """P(expert in the top k) under fresh noise, holding the other experts' noisy logits fixed."""
    normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
    threshold_in = top[:, k : k + 1]  # the (k+1)-th value: what an expert already in must beat
    threshold_out = top[:, k - 1 : k]  # the k-th value: what an expert outside must beat
    is_in = noisy > threshold_in
    return torch.where(
        is_in, normal.cdf((clean - threshold_in) / std), normal.cdf((clean - threshold_out) / std)
    )


class TokenBlock(nn.Module):
    """``x + Up(ReLU(Down(x)))`` with a ``dim / ratio`` bottleneck; Up starts at zero (identity)."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        width = max(1, dim // ratio)
        self.down = nn.Linear(dim, width)
        self.up = nn.Linear(width, dim)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.relu(self.down(x)))


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of ``x [B, S, D]`` counting only positions where ``mask [B, S]`` is set."""
    if mask is None:
        return x.mean(1)
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class ExpertPair(nn.Module):
    """One expert's two projections as modules (dense or low-rank + sparse, bias-free)."""

    def __init__(self, w1: nn.Module, w2: nn.Module) -> None:
        super().__init__()
        self.w1, self.w2 = w1, w2


class MoEFeedForward(nn.Module):
    """A feed-forward network of ``E`` upcycled or merged experts, routed as ``kind`` says.

    Expert weights are stacked: ``w1 [E, F, D]``, ``w2 [E, D, F]``, biases ``b1 [E, F]``,
    ``b2 [E, D]`` (optional); once compressed, the projections are per-expert modules
    (``experts[e].w1``, low rank + sparse) and the biases stay stacked. Each gate has
    ``gate_rows`` rows; ``expert_map[output]`` names the expert a gate output runs (identity until
    MC-SMoE merges experts), so gate weights of outputs that share an expert add up on it.
    The padding mask of the current batch is set by :func:`install_mask_hook`.
    """

    def __init__(
        self,
        kind: str,
        granularity: str,
        w1: torch.Tensor,
        w2: torch.Tensor,
        b1: torch.Tensor | None,
        b2: torch.Tensor | None,
        act: nn.Module,
        top_k: int,
        noisy: bool = True,
        token_block_ratio: int = 64,
        merge_chunk: int = 0,
        expert_map: torch.Tensor | None = None,
        gate_rows: int | None = None,
    ) -> None:
        super().__init__()
        n, f, d = w1.shape
        emap = torch.arange(n) if expert_map is None else expert_map.long()
        rows = len(emap) if gate_rows is None else gate_rows
        self.spec = check_layer(kind, rows, top_k, granularity)
        self.kind, self.granularity = kind, granularity
        self.top_k, self.token_block_ratio = top_k, token_block_ratio
        # Sequences whose merged weights are built at once (0: the whole batch): bounds the memory
        # of [chunk, F, D] merged matrices.
        self.merge_chunk = merge_chunk
        self.act = act
        self.d_model, self.d_ff, self._n = d, f, n
        self.w1 = nn.Parameter(w1.detach().clone())
        self.w2 = nn.Parameter(w2.detach().clone())
        self.b1 = None if b1 is None else nn.Parameter(b1.detach().clone())
        self.b2 = None if b2 is None else nn.Parameter(b2.detach().clone())
        self.experts: nn.ModuleList | None = None
        dims = [d] if granularity == "ffn" else [d, f]
        self.gates = nn.ModuleList([NoisyTopKGate(dim, rows, top_k, noisy) for dim in dims])
        self.token_blocks = (
            nn.ModuleList([TokenBlock(dim, token_block_ratio) for dim in dims])
            if self.spec.token_block
            else None
        )
        self.register_buffer("expert_map", emap, persistent=False)
        # Set by MC-SMoE's merge: the original expert leading each group, and the router's form.
        self.dominant: list[int] | None = None
        self.router_mode: str | None = None
        self._mask: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self._n

    def set_padding_mask(self, mask: torch.Tensor | None) -> None:
        self._mask = None if mask is None else mask.bool()

    def weight(self, name: str) -> torch.Tensor:
        """The stacked effective ``[E, out, in]`` weight of projection ``name`` (w1 or w2)."""
        if self.experts is None:
            return getattr(self, name)
        return torch.stack([linear_weight(getattr(e, name)) for e in self.experts])

    @torch.no_grad()
    def set_expert_modules(self, experts: list[ExpertPair]) -> None:
        """Hold the projections as per-expert modules (e.g. low rank + sparse) instead of stacks."""
        self.experts = nn.ModuleList(experts)
        self.w1 = None
        self.w2 = None

    def _expert_gates(self, gates: torch.Tensor) -> torch.Tensor:
        """Gate outputs ``[R, outputs]`` summed onto the experts they run ``[R, E]``."""
        emap = self.expert_map.to(gates.device)
        if gates.shape[-1] == self.num_experts and torch.equal(
            emap, torch.arange(self.num_experts, device=emap.device)
        ):
            return gates
        return gates.new_zeros(gates.shape[0], self.num_experts).index_add(1, emap, gates)

    def _route(self, gate_index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the token block (if any) and the gate; returns ``(x, expert gates)``.

        Sequence-level gates: ``[B, E]``; token-level: ``[B*S, E]``.
        """
        if self.token_blocks is not None:
            x = self.token_blocks[gate_index](x)
        inp = masked_mean(x, self._mask) if self.spec.sequence_gate else x.reshape(-1, x.shape[-1])
        gates, _, _ = self.gates[gate_index](inp)
        return x, self._expert_gates(gates).to(x.dtype)

    def _bias(self, name: str) -> torch.Tensor | None:
        return self.b1 if name == "w1" else self.b2

    def _merged_linear(self, x: torch.Tensor, g: torch.Tensor, name: str) -> torch.Tensor:
        """``x [B, S, I]`` through each sequence's merged weight ``sum_e g[b, e] W[e]``."""
        w, b = self.weight(name), self._bias(name)
        e, o, i = w.shape
        flat = w.reshape(e, o * i)
        chunk = self.merge_chunk or x.shape[0]
        outs = []
        for s in range(0, x.shape[0], chunk):
            gc = g[s : s + chunk]
            merged = (gc @ flat).reshape(-1, o, i)  # one matmul builds every sequence's weight
            y = torch.bmm(x[s : s + chunk], merged.transpose(1, 2))
            if b is not None:
                y = y + (gc @ b)[:, None, :]
            outs.append(y)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _expert_linear(self, e: int, name: str, x: torch.Tensor) -> torch.Tensor:
        b = self._bias(name)
        if self.experts is None:
            return F.linear(x, getattr(self, name)[e], None if b is None else b[e])
        y = getattr(self.experts[e], name)(x)
        return y if b is None else y + b[e]

    def _expert_ffn(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self._expert_linear(e, "w2", self.act(self._expert_linear(e, "w1", x)))

    def _dispatch(self, x: torch.Tensor, g: torch.Tensor, fn) -> torch.Tensor:
        """``sum_e g[r, e] fn(e, x[r])`` over rows ``r`` (tokens or sequences), each expert run once
        on all rows that selected it."""
        rows, experts = g.nonzero(as_tuple=True)
        order = torch.argsort(experts, stable=True)
        rows, experts = rows[order], experts[order]
        counts = torch.bincount(experts, minlength=self.num_experts).tolist()
        out, start = None, 0
        for e, c in enumerate(counts):
            if not c:
                continue
            r = rows[start : start + c]
            y = fn(e, x.index_select(0, r)) * g[r, e].reshape(-1, *([1] * (x.dim() - 1)))
            if out is None:
                out = y.new_zeros(x.shape[0], *y.shape[1:])
            out.index_add_(0, r, y)
            start += c
        return out

    def _unmerged(self, x: torch.Tensor, g: torch.Tensor, fn) -> torch.Tensor:
        if self.spec.sequence_gate:
            return self._dispatch(x, g, fn)
        bsz, s, _ = x.shape
        return self._dispatch(x.reshape(bsz * s, -1), g, fn).reshape(bsz, s, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.gates[0].weight.dtype)
        if self.granularity == "ffn":
            x, g = self._route(0, x)
            if self.spec.merge:
                return self._merged_linear(self.act(self._merged_linear(x, g, "w1")), g, "w2")
            return self._unmerged(x, g, self._expert_ffn)
        outs = x
        for i, name in enumerate(("w1", "w2")):
            outs, g = self._route(i, outs)
            if self.spec.merge:
                outs = self._merged_linear(outs, g, name)
            else:
                outs = self._unmerged(outs, g, lambda e, v, n=name: self._expert_linear(e, n, v))
            if name == "w1":
                outs = self.act(outs)
        return outs

    def structure(self) -> dict:
        """What a loader needs to rebuild this layer before loading its weights."""
        gate = self.gates[0]
        out = {
            "kind": self.kind,
            "granularity": self.granularity,
            "num_experts": self.num_experts,
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "top_k": self.top_k,
            "noisy": gate.noisy,
            "bias": self.b1 is not None,
            "token_block_ratio": self.token_block_ratio,
            "merge_chunk": self.merge_chunk,
            "expert_map": self.expert_map.tolist(),
            "gate_rows": gate.weight.shape[0],
            "row_group": gate.row_group.tolist() if gate.grouped else None,
            "dominant": self.dominant,
            "router_mode": self.router_mode,
        }
        if self.experts is not None:
            out["experts"] = [
                {k: getattr(e, k).structure() for k in ("w1", "w2") if hasattr(getattr(e, k), "structure")}
                for e in self.experts
            ]
        return out

    @classmethod
    def from_structure(cls, spec: dict, act: nn.Module) -> MoEFeedForward:
        """An empty layer shaped as :meth:`structure` says (weights are loaded afterwards)."""
        n, f, d = spec["num_experts"], spec["d_ff"], spec["d_model"]
        m = cls(
            spec["kind"],
            spec["granularity"],
            torch.zeros(n, f, d),
            torch.zeros(n, d, f),
            torch.zeros(n, f) if spec["bias"] else None,
            torch.zeros(n, d) if spec["bias"] else None,
            act,
            spec["top_k"],
            spec["noisy"],
            spec["token_block_ratio"],
            spec.get("merge_chunk", 0),
            torch.tensor(spec["expert_map"]),
            spec.get("gate_rows"),
        )
        if spec.get("row_group") is not None:
            for g in m.gates:
                g.set_row_group(torch.tensor(spec["row_group"]))
        m.dominant = spec.get("dominant")
        m.router_mode = spec.get("router_mode")
        if spec.get("experts") is not None:
            pairs = []
            for parts in spec["experts"]:
                w1 = linear_from_structure(parts["w1"]) if "w1" in parts else nn.Linear(d, f, bias=False)
                w2 = linear_from_structure(parts["w2"]) if "w2" in parts else nn.Linear(f, d, bias=False)
                pairs.append(ExpertPair(w1, w2))
            m.set_expert_modules(pairs)
        return m

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, granularity={self.granularity}, experts={self.num_experts}, "
            f"top_k={self.top_k}, d={self.d_model}, d_ff={self.d_ff}"
        )


def _stash_padding_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
    # A module-level function (not a closure), so a deep-copied model's hook feeds its own layers.
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        mask = args[1]
    if mask is not None and mask.dim() != 2:
        mask = None  # an already-expanded attention mask: no per-token padding flags to read
    for m in module.modules():
        if isinstance(m, MoEFeedForward):
            m.set_padding_mask(mask)


def install_mask_hook(encoder: nn.Module) -> None:
    """Make every :class:`MoEFeedForward` under ``encoder`` see the padding mask of each call."""
    for hook in encoder._forward_pre_hooks.values():
        if hook is _stash_padding_mask:
            return
    encoder.register_forward_pre_hook(_stash_padding_mask, with_kwargs=True)
