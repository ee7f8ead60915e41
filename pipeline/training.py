"""Fine-tuning (task + router losses), knowledge distillation, and scoring on a prepared task."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pipeline.checkpointing import (
    Checkpointing,
    TrainingDivergedError,
    first_non_finite,
    rng_state,
    set_rng_state,
)
from pipeline.data import DataError, batches
from pipeline.families import adapter_for
from pipeline.registry import Registry

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def set_seed(seed: int) -> None:
    """Seed every generator a stage uses."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, dtype: str):
    """Mixed precision on the device when asked for; full precision otherwise."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


class TokenIdError(DataError):
    """Prepared token ids that the model's embedding table does not hold."""


class NonFiniteOutputError(ValueError):
    """A model's scores came out NaN or infinite (its weights overflow, or are non-finite)."""


def embedding_rows(model: nn.Module) -> int:
    """How many token ids the model can read: the rows of its input embedding table."""
    return model.get_input_embeddings().weight.shape[0]


def check_token_ids(
    model: nn.Module, rows: list[dict], class_targets: list[list[int]] = (), what: str = "prepared data"
) -> None:
    """Refuse rows (or class targets) with token ids beyond ``model``'s embedding table.

    Data tokenized by a bigger tokenizer than the model's would index past the table: a crash
    on CPU, a device-side assert or garbage on an accelerator. A sequence classifier's labels are
    class indices, not tokens, so only its inputs are checked.
    """
    n = embedding_rows(model)
    keys = ("input_ids",) if adapter_for(model).sequence_classifier else ("input_ids", "labels")
    top = max((max(r[k], default=-1) for r in rows for k in keys if k in r), default=-1)
    if not adapter_for(model).sequence_classifier:
        top = max([top, *(max(t, default=-1) for t in class_targets)])
    if top >= n:
        raise TokenIdError(
            f"{what} holds token id {top}, but the model's embedding table has {n} rows (vocab size {n}): "
            f"the data was tokenized by a bigger tokenizer (at least {top + 1} tokens) than the model's; "
            "re-run prepare with the model's tokenizer (model.name_or_path) or make "
            "data.tokenizer_vocab_size and model.config.vocab_size agree"
        )


def _diverged(
    what: str, step: int, total: int, epoch: int, lr: float, checkpointing: Checkpointing | None = None
) -> TrainingDivergedError:
    """The error for a run that went non-finite; its checkpoint goes too (a resume could only
    replay the run into the same NaN)."""
    if checkpointing is not None:
        checkpointing.clear()
    return TrainingDivergedError(
        f"training diverged: {what} at step {step}/{total} (epoch {epoch}); likely causes: a learning "
        f"rate too high or non-finite (lr={lr:g}), non-finite or huge weights in the model, or non-finite "
        "inputs; stopped before saving anything"
    )


def model_forward(model: nn.Module, batch: dict, with_router: bool = True):
    """Forward pass on a collated batch (teacher forcing on the target); returns the model output."""
    adapter = adapter_for(model)
    inputs = adapter.task_inputs(model, batch)
    if with_router:
        return adapter.forward_with_router_losses(model, **inputs)
    return adapter.forward(model, **inputs)


def aligned(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the labels they predict; a causal LM's position t predicts token t+1."""
    if shift:
        return logits[:, :-1], labels[:, 1:]
    return logits, labels


def task_loss(logits: torch.Tensor, labels: torch.Tensor, shift: bool = False) -> torch.Tensor:
    logits, labels = aligned(logits, labels, shift)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def router_loss(out, z_coef: float, aux_coef: float) -> torch.Tensor:
    """Switch's router z-loss and load-balancing loss, summed over encoder and decoder."""
    total = torch.zeros((), device=out.logits.device)
    for name, coef in (("z_loss", z_coef), ("aux_loss", aux_coef)):
        for side in ("encoder", "decoder"):
            value = getattr(out, f"{side}_{name}", None)
            if coef and isinstance(value, torch.Tensor):
                total = total + coef * value.float()
    return total


# form(per-token KL [n_tokens], batch size, temperature) -> the KD term.
KDLoss = Callable[[torch.Tensor, int, float], torch.Tensor]
KD_LOSSES: Registry[KDLoss] = Registry("KD loss")
# Hinton et al.: mean KL over target tokens, times T^2 so gradients keep their size as T changes.
KD_LOSSES.register("hinton")(lambda kl, batch, t: kl.mean() * t**2)
# The authors' code: KLDivLoss(reduction="batchmean") on [batch, positions, vocab], i.e. KL summed
# over positions and divided by the batch size, no T^2. (Their sum also runs over padded target
# positions; here they are left out, which changes nothing when targets have equal length.)
KD_LOSSES.register("reference")(lambda kl, batch, t: kl.sum() / batch)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    shift: bool = False,
    form: str = "hinton",
) -> torch.Tensor:
    """KL(teacher || student) at temperature T over target tokens, reduced as ``form`` says."""
    reduce = KD_LOSSES.get(form)
    student_logits, _ = aligned(student_logits, labels, shift)
    teacher_logits, labels = aligned(teacher_logits, labels, shift)
    mask = labels != -100
    s = F.log_softmax(student_logits.float()[mask] / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float()[mask] / temperature, dim=-1)
    per_token = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    return reduce(per_token, labels.shape[0], temperature)


def freeze_routers(model: nn.Module) -> int:
    """Stop every SMoE router from training (the authors' KD); returns how many tensors froze."""
    adapter = adapter_for(model)
    frozen = 0
    for layer in adapter.sparse_layers(model):
        for p in adapter.router(layer).parameters():
            p.requires_grad_(False)
            frozen += 1
    return frozen


def freeze_outside_moe(model: nn.Module) -> int:
    """Stop every weight outside the SMoE layers (embeddings, attention, norms, dense FFNs) from
    training; returns how many tensors still train. Autograd then stops at the lowest SMoE layer."""
    adapter = adapter_for(model)
    keep = {id(p) for layer in adapter.sparse_layers(model) for p in layer.module.parameters()}
    if not keep:
        raise ValueError("trainable=moe, but the model has no SMoE layer to train")
    trained = 0
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
        trained += p.requires_grad
    return trained


@torch.no_grad()
def score_classes(model: nn.Module, batch: dict, class_targets: list[list[int]]) -> torch.Tensor:
    """Log-likelihood of each class's target sequence: ``[batch, n_classes]`` (rank classification).

    A sequence classifier scores its classes itself: its log-softmax (``class_targets`` unused).
    """
    if adapter_for(model).sequence_classifier:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits.float().log_softmax(-1)
    enc = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    scores = []
    for tgt in class_targets:
        labels = torch.tensor(tgt, device=batch["input_ids"].device).expand(batch["input_ids"].shape[0], -1)
        out = model(
            encoder_outputs=enc,
            attention_mask=batch["attention_mask"],
            decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=labels),
        )
        logp = out.logits.float().log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
        scores.append(logp.sum(-1))
    return torch.stack(scores, dim=-1)


@torch.no_grad()
def class_log_probs(
    model: nn.Module,
    rows: list[dict],
    class_targets: list[list[int]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    dtype: str = "float32",
) -> torch.Tensor:
    """``[rows, classes]``: each class target's log-likelihood, renormalised over the classes.

    The model's prediction is the argmax; two models' rows can be compared as distributions (e.g.
    KL divergence), which moves where accuracy, a count of argmax flips, does not.
    """
    check_token_ids(model, rows, class_targets)
    was_training = model.training
    model.eval()
    out = []
    for batch in batches(rows, batch_size, pad_id):
        batch = _to(batch, device)
        with autocast(device, dtype):
            scores = score_classes(model, batch, class_targets)
        out.append(scores.float().log_softmax(-1).cpu())
    model.train(was_training)
    logp = torch.cat(out)
    # Finite logits always give finite log-probabilities; NaN would rank as an arbitrary class.
    bad = int((~torch.isfinite(logp).all(-1)).sum())
    if bad:
        raise NonFiniteOutputError(
            f"the model's class scores are NaN/inf on {bad} of {len(rows)} rows: its weights are non-finite "
            f"or large enough to overflow ({dtype}); check the checkpoint or the training that made it"
        )
    return logp


def correct_per_example(
    model: nn.Module,
    rows: list[dict],
    class_targets: list[list[int]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    dtype: str = "float32",
) -> list[bool]:
    """Whether the most likely class target is the right one, for each row in order."""
    logp = class_log_probs(model, rows, class_targets, pad_id, batch_size, device, dtype)
    labels = torch.tensor([int(r["label"]) for r in rows])
    return (logp.argmax(-1) == labels).tolist()


def evaluate_accuracy(
    model: nn.Module,
    rows: list[dict],
    class_targets: list[list[int]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    dtype: str = "float32",
) -> float:
    """Accuracy of picking the most likely class target."""
    correct = correct_per_example(model, rows, class_targets, pad_id, batch_size, device, dtype)
    return sum(correct) / len(rows)


# What train() updates: every weight, or only the SMoE layers' (experts and routers).
TRAINABLE = ("all", "moe")


@dataclass
class TrainSettings:
    epochs: float
    batch_size: int
    eval_batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    max_grad_norm: float
    router_z_loss_coef: float
    router_aux_loss_coef: float
    eval_every_epochs: float = 1.0
    bucket_batches: int = 0
    trainable: str = "all"  # all | moe (freeze_outside_moe)


@dataclass
class DevMetric:
    """What ``train`` evaluates on the dev rows to keep its best weights."""

    name: str  # e.g. "accuracy", "perplexity"
    compute: Callable[[nn.Module], float]
    higher_is_better: bool = True

    def better(self, value: float, best: float | None) -> bool:
        # Ties go to the later model: when pruning, later weights are the sparser ones.
        if best is None:
            return True
        return value >= best if self.higher_is_better else value <= best


def accuracy_metric(
    rows: list[dict], class_targets: list[list[int]], pad_id: int, batch_size: int, device, dtype: str
) -> DevMetric:
    """Rank-classification accuracy on ``rows`` (seq2seq tasks)."""
    return DevMetric(
        "accuracy",
        lambda m: evaluate_accuracy(m, rows, class_targets, pad_id, batch_size, device, dtype),
    )


def perplexity_metric(rows: list[dict], pad_id: int, batch_size: int, device, dtype: str) -> DevMetric:
    """Language-model perplexity on ``rows`` (lower is better)."""
    from pipeline.zeroshot import perplexity

    return DevMetric(
        "perplexity",
        lambda m: perplexity(m, rows, pad_id, batch_size, device, dtype)["perplexity"],
        higher_is_better=False,
    )


def dev_metric_for(task, split: str, batch_size: int, device, dtype: str) -> DevMetric:
    """The prepared task's own dev metric: accuracy (classification) or perplexity (lm)."""
    rows = task.splits[split]
    if task.objective == "lm":
        return perplexity_metric(rows, task.tokenizer.pad_token_id, batch_size, device, dtype)
    return accuracy_metric(
        rows, task.label_token_ids(), task.tokenizer.pad_token_id, batch_size, device, dtype
    )


def _shard_batch(batch: dict, rank: int, processes: int) -> tuple[dict, int]:
    """This process's rows of a collated global batch, and how many of them are real.

    Rows go in contiguous slices whose sizes differ by at most one. A last batch with fewer rows
    than processes leaves some process none: it gets a copy of row 0 whose labels are all ignored
    (-100), so that it still takes part in the forward/backward that DDP synchronises, and
    contributes nothing to the task and KD losses (and its router losses get weight 0).
    """
    n = next(iter(batch.values())).shape[0]
    index = torch.tensor_split(torch.arange(n), processes)[rank]
    if len(index):
        return {k: v[index] for k, v in batch.items()}, len(index)
    dummy = {k: v[:1].clone() for k, v in batch.items()}
    if "labels" in dummy:
        dummy["labels"].fill_(-100)
    return dummy, 0


class _Runner:
    """A model prepared by accelerate (DDP/FSDP wrapper) that adapters can still walk: calls go
    through the wrapper (which synchronises gradients), attributes come from the plain model."""

    def __init__(self, wrapped: nn.Module, plain: nn.Module) -> None:
        self._wrapped, self._plain = wrapped, plain

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._plain, name)


def _global_tokens(labels: torch.Tensor, shift: bool) -> int:
    """Target tokens of a whole (global) batch: what its mean losses divide by."""
    return int((aligned(labels, labels, shift)[1] != -100).sum())


def _linear_weight(form: Callable, n: int, rows: int, temperature: float) -> float:
    """The weight a loss form linear in its per-item values gives each item of a global batch of
    ``n`` items and ``rows`` rows (a mean: 1/n; a sum per row: 1/rows)."""
    return float(form(torch.ones(max(n, 1)), rows, temperature)) / max(n, 1)


def _shard_losses(out, t_out, batch, real, rows, tokens, world, settings, kd, shift):
    """One process's share of the global batch's losses, scaled so that DDP's mean of the
    processes' gradients is the gradient one process would take on the whole batch.

    Task and KD losses are means over the global batch's tokens (or per-row sums), so each slice
    gives ``world * (its sum) * (the global per-item weight)``: exact. The router losses are
    nonlinear in the batch (expert loads); each slice's loss is weighted by its share of rows.
    Returns (loss, task loss) with the task loss as one process would report it after a mean.
    """
    logits, labels = aligned(out.logits, batch["labels"], shift)
    ce = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    loss_task = ce * (world / max(tokens, 1))
    loss = loss_task + router_loss(out, settings.router_z_loss_coef, settings.router_aux_loss_coef) * (
        real * world / rows
    )
    if t_out is not None:
        s_logits, _ = aligned(out.logits, batch["labels"], shift)
        t_logits, labels = aligned(t_out.logits, batch["labels"], shift)
        mask = labels != -100
        s = F.log_softmax(s_logits.float()[mask] / kd.temperature, dim=-1)
        t = F.log_softmax(t_logits.float()[mask] / kd.temperature, dim=-1)
        kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
        weight = _linear_weight(KD_LOSSES.get(kd.loss), tokens, rows, kd.temperature)
        loss = loss + kd.alpha * kl.sum() * (world * weight)
    return loss, loss_task


def _full_state_dict(acc, wrapped: nn.Module, plain: nn.Module) -> dict:
    """The whole model's weights (a copy): gathered from the shards under FSDP (a collective every
    process must call; the weights land on the main process), the local replica under DDP."""
    if _sharded(acc):
        return acc.get_state_dict(wrapped)
    return copy.deepcopy(plain.state_dict())


class _ReadOnly:
    """A process other than the main one resumes from the checkpoint but never writes or removes it."""

    def __init__(self, checkpointing: Checkpointing) -> None:
        self._inner = checkpointing

    def load(self, total_steps: int) -> dict | None:
        return self._inner.load(total_steps)

    def due(self, step: int, total: int) -> bool:
        return False

    def clear(self) -> None:
        pass


def _is_fsdp(acc) -> bool:
    return acc is not None and acc.distributed_type.value == "FSDP"


def _sharded(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc is not None and acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


@dataclass
class KDSettings:
    teacher: nn.Module
    alpha: float
    temperature: float
    loss: str = "hinton"


def train(
    model: nn.Module,
    train_rows: list[dict],
    dev_rows: list[dict],
    class_targets: list[list[int]],
    pad_id: int,
    settings: TrainSettings,
    device: torch.device,
    dtype: str = "float32",
    seed: int = 0,
    kd: KDSettings | None = None,
    step_hook: Callable[[int, int], None] | None = None,
    eligible_from: Callable[[int], int] | None = None,
    log: Callable[[dict, int], None] | None = None,
    progress: bool = True,
    dev_metric: DevMetric | None = None,
    checkpointing: Checkpointing | None = None,
    accelerator=None,
    loss_hook: Callable[[int, float], None] | None = None,
) -> dict:
    """Fine-tune ``model`` in place and keep the weights with the best dev score.

    The dev score is ``dev_metric`` when given, else rank-classification accuracy over
    ``class_targets``.

    Loss: target (or next-token) cross-entropy + router z/balance losses (+ alpha * KD loss when
    ``kd`` is given).
    ``step_hook(step, total_steps)`` runs after each optimiser step (used for pruning);
    ``eligible_from(total_steps)`` is the first step whose weights may be kept (pruning must have
    reached its target by then). Returns a
    summary with the best dev accuracy and the per-evaluation history.

    With ``checkpointing``, the whole state (weights, optimiser, schedule, best weights, history,
    the step hook's state, random generators and the position in the data) is saved every
    ``every_steps`` steps; a resumed run continues exactly where the saved one stood, so it ends
    with the same weights as an uninterrupted one. ``loss_hook(step, loss)`` sees every step's
    loss (of the whole global batch).

    With an ``accelerator`` of several processes (``accelerate launch``), ``settings.batch_size``
    is the global batch: every process draws the same batches and trains on its slice
    (:func:`_shard_batch`); model, optimizer and schedule are prepared by the
    accelerator (DDP all-reduces the gradients; FSDP/DeepSpeed shard them). Every process scores
    the whole dev split with the same weights, so evaluation is one process's. Only the main
    process writes checkpoints. Under FSDP/DeepSpeed the trained weights are gathered into a
    plain copy of the model on the main process, returned as ``summary["model"]``. With one
    process (or none) the run is exactly the single-process one.
    """
    acc = accelerator if accelerator is not None and accelerator.num_processes > 1 else None
    if acc is not None:
        if settings.batch_size % acc.num_processes:
            raise ValueError(
                f"batch_size={settings.batch_size} (the global batch) is not divisible by the "
                f"{acc.num_processes} processes; use a multiple of {acc.num_processes}"
            )
        device = acc.device
        if _sharded(acc) and (step_hook is not None or (checkpointing and checkpointing.every_steps)):
            raise ValueError(
                f"{acc.distributed_type.value} shards the weights: pruning during training and resumable "
                "checkpoints (checkpoints.every_steps) need whole weights; use DDP "
                "(accelerate launch --multi_gpu) or checkpoints.every_steps: 0"
            )
        if not acc.is_main_process:
            checkpointing = _ReadOnly(checkpointing) if checkpointing is not None else None
    check_token_ids(model, train_rows, class_targets, "the prepared train split")
    check_token_ids(model, dev_rows, (), "the prepared dev split")
    set_seed(seed)
    if dev_metric is None:
        dev_metric = accuracy_metric(dev_rows, class_targets, pad_id, settings.eval_batch_size, device, dtype)
    shift = adapter_for(model).shift_labels
    if settings.trainable not in TRAINABLE:
        raise ValueError(f"unknown trainable={settings.trainable!r}; valid choices: {', '.join(TRAINABLE)}")
    if settings.trainable == "moe":
        freeze_outside_moe(model)
    model.to(device).train()
    if kd is not None:
        kd.teacher.to(device).eval()
    steps_per_epoch = math.ceil(len(train_rows) / settings.batch_size)
    total = max(1, int(round(settings.epochs * steps_per_epoch)))
    eval_every = max(1, int(round(settings.eval_every_epochs * steps_per_epoch)))
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1 and p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    warm = settings.warmup_steps

    def lr_lambda(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    plain = model
    first_eligible = eligible_from(total) if eligible_from is not None else 0
    best = {"score": None, "step": 0}
    best_state = None
    history = []
    step, epoch, skip = 0, 0, 0
    saved = checkpointing.load(total) if checkpointing is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        if step_hook is not None and hasattr(step_hook, "load_state_dict"):
            step_hook.load_state_dict(saved["step_hook"])
        best, best_state, history = saved["best"], saved["best_model"], saved["history"]
        step, epoch, skip = saved["step"], saved["epoch"], saved["batches_done"]
        set_rng_state(saved["rng"])
    runner, teacher = model, kd.teacher if kd is not None else None
    if acc is not None:
        # A plain copy to receive the gathered weights at the end (sharding rewrites the model).
        plain = copy.deepcopy(model).cpu() if _sharded(acc) and acc.is_main_process else model
        wrapped, opt, sched = acc.prepare(model, opt, sched)
        runner = _Runner(wrapped, model)
        if kd is not None and _is_fsdp(acc):
            # Sharded like the student; under DDP (and DeepSpeed) each process holds a replica.
            teacher = _Runner(acc.prepare(kd.teacher), kd.teacher)
        progress = progress and acc.is_main_process
    bar = tqdm(total=total, initial=step, desc="train", disable=not progress, dynamic_ncols=True)
    while step < total:
        epoch_batches = batches(
            train_rows,
            settings.batch_size,
            pad_id,
            shuffle=True,
            seed=seed + epoch,
            bucket_batches=settings.bucket_batches,
        )
        for batch_index, batch in enumerate(epoch_batches):
            if batch_index < skip:  # already trained on before the run was interrupted
                continue
            if acc is None:
                batch = _to(batch, device)
                with autocast(device, dtype):
                    out = model_forward(model, batch)
                    loss_task = task_loss(out.logits, batch["labels"], shift)
                    loss = loss_task + router_loss(
                        out, settings.router_z_loss_coef, settings.router_aux_loss_coef
                    )
                    if kd is not None and kd.alpha > 0:
                        with torch.no_grad():
                            t_out = model_forward(kd.teacher, batch, with_router=False)
                        loss = loss + kd.alpha * kd_loss(
                            out.logits, t_out.logits, batch["labels"], kd.temperature, shift, kd.loss
                        )
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
                # One transfer per step, as before (the bar shows the loss); checked before the
                # update so that no step is taken on NaN gradients.
                pair = torch.stack([loss.detach().float(), norm.detach().float().to(loss.device)])
                loss_value, norm_value = pair.tolist()
            else:
                rows, tokens = batch["input_ids"].shape[0], _global_tokens(batch["labels"], shift)
                local, real = _shard_batch(batch, acc.process_index, acc.num_processes)
                local = _to(local, device)
                with autocast(device, dtype):
                    out = model_forward(runner, local)
                    t_out = None
                    if kd is not None and kd.alpha > 0:
                        with torch.no_grad():
                            t_out = model_forward(teacher, local, with_router=False)
                    loss, loss_task = _shard_losses(
                        out, t_out, local, real, rows, tokens, acc.num_processes, settings, kd, shift
                    )
                acc.backward(loss)
                norm = acc.clip_grad_norm_(wrapped.parameters(), settings.max_grad_norm)
                # DeepSpeed clips inside its own step and may not report the norm.
                norm = torch.as_tensor(0.0 if norm is None else norm, device=loss.device)
                # The mean over processes of their scaled losses is the global batch's loss; the
                # norm (of the all-reduced gradients) is the same everywhere. Every process takes
                # the same decision on them, so none is left waiting in a collective.
                triple = torch.stack(
                    [loss.detach().float(), norm.detach().float().to(loss.device), loss_task.detach().float()]
                )
                loss_value, norm_value, task_value = acc.reduce(triple, "mean").tolist()
                loss_task = torch.tensor(task_value)
            if not math.isfinite(loss_value):
                raise _diverged(
                    f"the loss is {loss_value}", step + 1, total, epoch + 1, settings.lr, checkpointing
                )
            if not math.isfinite(norm_value):
                raise _diverged(
                    f"the gradient norm is {norm_value} (loss {loss_value:.4g})",
                    step + 1,
                    total,
                    epoch + 1,
                    settings.lr,
                    checkpointing,
                )
            opt.step()
            sched.step()
            if step_hook is not None:
                step_hook(step, total)
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if loss_hook is not None:
                loss_hook(step, loss_value)
            if step % 50 == 0 and log is not None:
                log(
                    {
                        "train_loss": loss_value,
                        "train_task_loss": loss_task.item(),
                        "lr": sched.get_last_lr()[0],
                    },
                    step,
                )
            # The last evaluation is at the end; skip a periodic one that would fall just before it.
            if step == total or (step % eval_every == 0 and total - step >= eval_every // 2):
                # A finite loss can still be followed by an update to inf (a huge learning rate):
                # such weights must neither be scored nor kept.
                bad = first_non_finite(model.named_parameters())
                if _sharded(acc):  # each process sees its shard: any one's NaN stops them all
                    flag = torch.tensor([float(bad is not None)], device=device)
                    if acc.reduce(flag, "sum").item() and bad is None:
                        bad = ("(on another process)", 0, 0)
                if bad is not None:
                    raise _diverged(
                        f"{bad[1]} of {bad[2]} values of weight {bad[0]} are NaN/inf after the update",
                        step,
                        total,
                        epoch + 1,
                        settings.lr,
                        checkpointing,
                    )
                try:
                    # Under FSDP the forward must go through the wrapper, which gathers each
                    # layer's shards in turn (the whole model need not fit one device).
                    score = dev_metric.compute(runner if _is_fsdp(acc) else model)
                except NonFiniteOutputError:
                    score = math.nan
                if not math.isfinite(score):
                    raise _diverged(
                        f"the model's dev {dev_metric.name} is NaN/inf after the update",
                        step,
                        total,
                        epoch + 1,
                        settings.lr,
                        checkpointing,
                    )
                key = f"dev_{dev_metric.name}"
                history.append({"step": step, key: score})
                if log is not None:
                    log({key: score}, step)
                if acc is None or acc.is_main_process:
                    bar.write(f"step {step}/{total}: dev {dev_metric.name} {score:.4f}")
                if step >= first_eligible and dev_metric.better(score, best["score"]):
                    best = {"score": score, "step": step}
                    if acc is None:
                        best_state = copy.deepcopy(model.state_dict())
                    else:
                        best_state = _full_state_dict(acc, runner._wrapped, model)
            if checkpointing is not None and checkpointing.due(step, total):
                checkpointing.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "step_hook": step_hook.state_dict() if hasattr(step_hook, "state_dict") else {},
                        "best": best,
                        "best_model": best_state,
                        "history": history,
                        "step": step,
                        "epoch": epoch,
                        "batches_done": batch_index + 1,
                        "total_steps": total,
                        "rng": rng_state(),
                    }
                )
            if step >= total:
                break
        epoch, skip = epoch + 1, 0
    bar.close()
    extra = {}
    if acc is not None and _sharded(acc):
        final = best_state if best_state is not None else _full_state_dict(acc, runner._wrapped, model)
        if acc.is_main_process:
            plain.load_state_dict(final)
            extra["model"] = plain
        acc.wait_for_everyone()
    elif best_state is not None:
        model.load_state_dict(best_state)
    if acc is not None:
        acc.free_memory()  # the accelerator forgets this model: KD trains several in turn
    return {
        **extra,
        f"best_dev_{dev_metric.name}": best["score"],
        "best_step": best["step"],
        "total_steps": total,
        "history": history,
    }


def prune_without_training(
    model: nn.Module,
    rows: list[dict],
    pad_id: int,
    settings: TrainSettings,
    pruner: Callable[[int, int], None],
    device: torch.device,
    dtype: str = "float32",
    seed: int = 0,
) -> dict:
    """Run ``train``'s pruning schedule on task-loss gradients without updating any weight.

    The zero-shot setting: column importance |s * grad s| comes from the loss on ``rows``, over as
    many steps as ``settings`` would train, so the schedule is the one KD fine-tuning would follow.
    Only the sparse parts S need gradients; everything else is frozen meanwhile to save memory.
    """
    check_token_ids(model, rows, (), "the prepared train split")
    set_seed(seed)
    shift = adapter_for(model).shift_labels
    model.to(device).eval()
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith(".s"))
    total = max(1, int(round(settings.epochs * math.ceil(len(rows) / settings.batch_size))))
    step, epoch = 0, 0
    try:
        while step < total:
            for batch in batches(
                rows,
                settings.batch_size,
                pad_id,
                shuffle=True,
                seed=seed + epoch,
                bucket_batches=settings.bucket_batches,
            ):
                batch = _to(batch, device)
                model.zero_grad(set_to_none=True)
                with autocast(device, dtype):
                    out = model_forward(model, batch, with_router=False)
                    loss = task_loss(out.logits, batch["labels"], shift)
                if not math.isfinite(loss.item()):
                    raise _diverged(f"the loss is {loss.item()}", step + 1, total, epoch + 1, settings.lr)
                loss.backward()
                pruner(step, total)
                step += 1
                if step >= total:
                    break
            epoch += 1
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(trainable[n])
    return {"total_steps": total}
