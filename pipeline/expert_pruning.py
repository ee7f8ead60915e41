"""Expert pruning while the model trains: task-specific expert pruning (Chen et al. 2022).

arXiv 2206.00277 prunes experts progressively during fine-tuning: an exponential moving average of
each expert's usage is kept, and at fixed intervals the experts whose usage falls below a share of
the alive experts' mean are dropped, until each layer holds its budget by half of training. Dropped
experts are masked *additively* (their router logit becomes -inf), so they can never be chosen
again. The authors' implementation (MC-SMoE repo, ``mcsmoe/pruning/task_specific.py``) multiplies
the logits by a mask holding -1e6 for dead experts, which turns a dead expert with a negative logit
into the most likely one; the mask here cannot do that.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pipeline.families import MoEAdapter, SparseLayer
from pipeline.registry import Registry


class TaskSpecificPruner:
    """A ``train()`` step hook that prunes the experts of ``budget``'s layers down to the budget.

    ``budget`` maps SMoE layer name -> experts to keep. Usage is measured on the training batches
    (the student's own routing, padding excluded where the layer's tokens have a mask) every
    ``ema_every`` steps; there are ``times`` pruning events evenly spaced over the first half of
    training, and the last one keeps exactly the budget's most used experts.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: MoEAdapter,
        budget: dict[str, int],
        ema_beta: float = 0.6,
        ema_every: int = 4,
        threshold: float = 0.1,
        times: int = 4,
    ) -> None:
        layers = {ly.name: ly for ly in adapter.sparse_layers(model)}
        unknown = sorted(set(budget) - set(layers))
        if unknown:
            raise ValueError(f"task-specific pruning: budget names layers the model lacks: {unknown}")
        self.model, self.adapter = model, adapter
        self.layers: dict[str, SparseLayer] = {n: layers[n] for n in budget}
        self.budget = dict(budget)
        for name, k in self.budget.items():
            n = adapter.num_experts(self.layers[name])
            if not 1 <= k <= n:
                raise ValueError(f"task-specific pruning: budget {k} for {name} is outside 1..{n}")
        self.ema_beta, self.ema_every, self.threshold, self.times = ema_beta, ema_every, threshold, times
        self.alive = {
            n: torch.ones(adapter.num_experts(ly), dtype=torch.bool) for n, ly in self.layers.items()
        }
        self.ema: dict[str, torch.Tensor] = {}
        self.events: list[dict] = []
        self._last: dict[str, torch.Tensor] = {}
        self._token_mask: torch.Tensor | None = None
        self._handles: list = []
        self._install()

    # -- hooks ------------------------------------------------------------------------------
    def _install(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        for name, layer in self.layers.items():
            self._handles.append(self.adapter.mask_router(layer, ~self.alive[name]))
            n = self.adapter.num_experts(layer)
            router = self.adapter.router(layer)
            self._handles.append(router.register_forward_hook(self._counter(name, layer, n)))

    def _capture_mask(self, _module, _args, kwargs):
        mask = kwargs.get("attention_mask")
        self._token_mask = None if mask is None else mask.reshape(-1).bool()

    def _counter(self, name: str, layer: SparseLayer, n: int) -> Callable:
        # An encoder-decoder's decoder tokens have no attention mask here; its few label positions
        # are all counted. Every other layer counts the non-padding tokens.
        masked = not (layer.stack == "decoder" and not self.adapter.shift_labels)

        def hook(module, _inputs, output):
            if not module.training:  # dev evaluations do not move the usage statistics
                return
            dispatch, _ = self.adapter.routing_from_output(output, n, layer)
            d = dispatch.reshape(-1, dispatch.shape[-1]).float()
            if masked and self._token_mask is not None and len(self._token_mask) == len(d):
                d = d[self._token_mask.to(d.device)]
            self._last[name] = d.sum(0).detach().cpu()

        return hook

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- schedule ---------------------------------------------------------------------------
    def interval(self, total: int) -> int:
        return max(1, (total // 2) // self.times)

    def final_step(self, total: int) -> int:
        """The step (1-based) of the pruning event that reaches the budget: the first at half of training."""
        every = self.interval(total)
        return min(total, max(every, math.ceil(max(1, total // 2) / every) * every))

    def __call__(self, step: int, total: int) -> None:
        done = step + 1
        self._sum_over_processes()
        if self._last and (not self.ema or done % self.ema_every == 0):
            for name, counts in self._last.items():
                usage = counts / counts.sum().clamp_min(1)
                prev = self.ema.get(name)
                self.ema[name] = usage if prev is None else self.ema_beta * prev + (1 - self.ema_beta) * usage
        if done % self.interval(total) == 0 and done <= self.final_step(total):
            self.prune(final=done >= self.final_step(total), step=done)

    def _sum_over_processes(self) -> None:
        """Under several processes (``accelerate launch``) each saw its slice of the global batch:
        the usage counts are summed so that every process prunes the same experts, as one process
        would on the whole batch. Every process calls the hook at every step, in the same order."""
        import torch.distributed as dist

        if not (self._last and dist.is_available() and dist.is_initialized()):
            return
        nccl = dist.get_backend() == "nccl"
        for name in sorted(self._last):
            counts = self._last[name].to(torch.cuda.current_device()) if nccl else self._last[name].clone()
            dist.all_reduce(counts)
            self._last[name] = counts.cpu()

    def prune(self, final: bool, step: int = 0) -> None:
        """One pruning event: below-threshold experts die (never below the budget); ``final`` keeps
        exactly the budget's most used alive experts."""
        changed = {}
        for name, alive in self.alive.items():
            k = self.budget[name]
            n_alive = int(alive.sum())
            if n_alive == k:
                continue
            usage = self.ema.get(name, torch.zeros(len(alive)))
            share = torch.where(alive, usage, torch.zeros_like(usage))
            share = share / share.sum() if share.sum() > 0 else alive.double() / n_alive
            keep = alive & (share >= self.threshold / n_alive)
            if final or int(keep.sum()) < k:
                # The k most used alive experts; ties go to the lower index.
                order = sorted(range(len(alive)), key=lambda e: (not bool(alive[e]), -float(share[e]), e))
                keep = torch.zeros_like(alive)
                keep[order[:k]] = True
            if not torch.equal(keep, alive):
                self.alive[name] = keep
                changed[name] = int(keep.sum())
        if changed:
            self.events.append({"step": step, "alive": changed})
            self._remask()

    def _remask(self) -> None:
        self.remove_hooks()
        self._install()

    # -- checkpointing (train() saves and restores the step hook's state) -------------------
    def state_dict(self) -> dict:
        return {
            "alive": {n: a.clone() for n, a in self.alive.items()},
            "ema": {n: e.clone() for n, e in self.ema.items()},
            "events": list(self.events),
        }

    def load_state_dict(self, state: dict) -> None:
        self.alive = {n: a.clone().bool() for n, a in state["alive"].items()}
        self.ema = {n: e.clone() for n, e in state["ema"].items()}
        self.events = list(state["events"])
        self._remask()

    # -- the end ----------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self) -> dict:
        """Drop the dead experts and their router rows for good; the layers end in ``prune`` form.

        Returns per layer the kept experts and when experts were pruned.
        """
        from pipeline.routing import set_router_mode

        self.remove_hooks()
        report = {}
        for name, layer in self.layers.items():
            kept = [e for e in range(len(self.alive[name])) if self.alive[name][e]]
            if len(kept) != self.budget[name]:
                raise ValueError(
                    f"task-specific pruning left {len(kept)} experts in {name}, not its budget "
                    f"{self.budget[name]}: training ended before the final pruning event"
                )
            # Dead experts map to the first kept one; with the pruned router no token reaches them.
            expert_map = [kept.index(e) if e in kept else 0 for e in range(len(self.alive[name]))]
            merged = [self.adapter.expert_weights(layer, e) for e in kept]
            self.adapter.replace_with_merged(self.model, layer, expert_map, merged, kept)
            report[name] = {"kept": kept, "experts_before": len(self.alive[name])}
        set_router_mode(self.model, self.adapter, "prune")
        return {"layers": report, "events": self.events}


def _none(*_args, **_kwargs) -> None:
    return None


# name -> factory(model, adapter, budget, **kd.prune settings) -> step hook or None
KD_PRUNERS: Registry[Callable[..., TaskSpecificPruner | None]] = Registry("kd prune method")
KD_PRUNERS.register("none")(_none)
KD_PRUNERS.register("task-specific")(TaskSpecificPruner)


BUDGET_FILE = "budget.json"


def read_budget(model_folder: str | Path) -> dict[str, int]:
    """The per-layer expert budget the merge stage recorded beside a merged model."""
    from pipeline.data import DataError, read_json

    path = Path(model_folder) / BUDGET_FILE
    if not path.is_file():
        raise DataError(
            f"{model_folder} has no {BUDGET_FILE}: it was not merged from a task-specific grouping; "
            "run group (group.method: task-specific) and merge again"
        )
    budget = read_json(path, "expert budget")
    if not isinstance(budget, dict) or not all(isinstance(v, int) and v >= 1 for v in budget.values()):
        raise DataError(f"{path} is not a mapping of layer name -> experts to keep")
    return budget
