"""Tiny training runs for tests/test_distributed.py, alone or under ``accelerate launch``.

``python -m tests.distributed_worker OUT.json`` (or under the launcher): trains a tiny random
Switch on fake rows, a second one with KD from the first, and a third with task-specific expert
pruning, and writes each run's per-step losses, dev history, pruning events and a weight checksum
(the main process only).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch

from pipeline.checkpointing import Checkpointing
from pipeline.distributed import make_accelerator
from pipeline.expert_pruning import TaskSpecificPruner
from pipeline.families import adapter_for
from pipeline.modeling import build_model
from pipeline.training import KDSettings, TrainSettings, train
from tests.conftest import CLASS_TARGETS, EOS_ID, PAD_ID, TINY, VOCAB

# 41 rows at a global batch of 8: the last batch holds one row, so one of two processes gets none.
N_ROWS, BATCH = 41, 8
CONFIG = {**TINY, "router_jitter_noise": 0.0}


def _rows(n: int, seed: int, ragged_labels: bool) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        source = torch.randint(3, VOCAB, (3 + i % 7,), generator=g).tolist() + [EOS_ID]
        # Targets of unequal length: the task loss is a mean over the global batch's tokens.
        extra = torch.randint(3, VOCAB, (i % 3,), generator=g).tolist() if ragged_labels else []
        out.append({"input_ids": source, "labels": [5 + i % 2, *extra, EOS_ID], "label": i % 2})
    return out


def settings() -> TrainSettings:
    return TrainSettings(
        epochs=1,
        batch_size=BATCH,
        eval_batch_size=16,
        lr=3e-3,
        weight_decay=0.01,
        warmup_steps=1,
        max_grad_norm=1.0,
        router_z_loss_coef=1e-3,
        router_aux_loss_coef=1e-3,
        eval_every_epochs=0.5,
        bucket_batches=2,
    )


class _Interrupt(Exception):
    pass


def _interrupt_at(step: int):
    def hook(s: int, total: int) -> None:
        if s == step:
            raise _Interrupt

    return hook


def run(ckpt_dir: Path) -> dict:
    """The runs; an Accelerator only when launched in several processes. ``resumed`` is the
    ``finetune`` run stopped after its third step and resumed from its checkpoint (in ``ckpt_dir``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    acc = make_accelerator(torch.device("cpu")) if world > 1 else None
    train_rows, dev_rows = _rows(N_ROWS, 0, True), _rows(16, 1, False)
    results = {}
    teacher = None
    for name in ("finetune", "kd", "pruned", "resumed"):
        # No router jitter: its noise would be drawn per process, so runs could not compare.
        model = build_model("switch_transformers", CONFIG, VOCAB, PAD_ID, EOS_ID, 0.02, seed=0)
        losses: list[float] = []
        kd = KDSettings(teacher, alpha=1.0, temperature=2.0) if name == "kd" else None
        pruner = None
        if name == "pruned":  # task-specific pruning: usage counted on every process's slice
            adapter = adapter_for(model)
            budget = {ly.name: 3 for ly in adapter.sparse_layers(model)}
            pruner = TaskSpecificPruner(model, adapter, budget, ema_every=1, times=2)
        ckpt = (
            Checkpointing(ckpt_dir, every_steps=2, resume=True, fingerprint="t")
            if name == "resumed"
            else None
        )

        def fit(hook, ckpt=ckpt, kd=kd, model=model, losses=losses):
            return train(
                model,
                train_rows,
                dev_rows,
                CLASS_TARGETS,
                PAD_ID,
                settings(),
                torch.device("cpu"),
                seed=3,
                kd=kd,
                step_hook=hook,
                progress=False,
                accelerator=acc,
                loss_hook=lambda step, loss: losses.append(loss),
                checkpointing=ckpt,
            )

        if ckpt is not None:
            with contextlib.suppress(_Interrupt):
                fit(_interrupt_at(2))  # stops in step 3; the checkpoint of step 2 stays
            model.zero_grad(set_to_none=True)  # as a new process would start (the weights reload)
            del losses[:]
        summary = fit(pruner)
        results[name] = {
            "losses": losses,
            "history": summary["history"],
            "weights": float(sum(p.detach().double().abs().sum() for p in model.parameters())),
            "processes": world,
            "pruning_events": pruner.events if pruner is not None else [],
        }
        teacher = model.eval()
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = run(Path(sys.argv[1]).parent / "ckpt")
    if int(os.environ.get("RANK", "0")) == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
