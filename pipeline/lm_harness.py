"""Zero-shot evaluation of decoder LMs by lm-evaluation-harness, offline, on the local task files.

Each task is lm-eval's own definition (its YAML, prompts and metrics, ``include``-d from the
installed package) with only the data source replaced by the official file in the data folder,
so scores are comparable with published lm-eval numbers. The model is passed in-process.
Rows of the TSV files are turned into the Hub's columns, which the official definitions read.

:func:`score_zero_shot` is what the evaluate stage calls: lm-eval, or the project's own scorer
(:mod:`pipeline.zeroshot`, whose docstring lists where its conventions differ), on the prepared
examples.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.data import DataError, PreparedTask
from pipeline.registry import Registry
from pipeline.training import DTYPES, NonFiniteOutputError
from pipeline.zeroshot import (
    ChoiceExample,
    load_choice_task,
    parse_obqa_choices,
    suite_accuracy,
    zero_shot_hits,
)


@dataclass(frozen=True)
class HarnessTask:
    """An lm-eval task read from local files: its official YAML and the files of its splits."""

    name: str
    # the official config, relative to lm_eval/tasks
    official: str
    # split -> file, relative to the data folder
    files: dict[str, str]
    # the datasets builder that reads the files: json | csv (tab-separated)
    builder: str
    # a function of this module turning the file's rows into the Hub's columns, or None
    process_docs: str | None = None


HARNESS_TASKS: Registry[HarnessTask] = Registry("lm-eval task")
for _task in (
    HarnessTask("copa", "super_glue/copa/default.yaml", {"validation": "superglue/COPA/val.jsonl"}, "json"),
    HarnessTask("winogrande", "winogrande/default.yaml", {"validation": "winogrande/dev.jsonl"}, "json"),
    HarnessTask(
        "openbookqa", "openbookqa/openbookqa.yaml", {"test": "openbookqa/Main/test.tsv"}, "csv", "obqa_docs"
    ),
    HarnessTask("mrpc", "glue/mrpc/default.yaml", {"validation": "glue/MRPC/dev.tsv"}, "csv", "mrpc_docs"),
):
    HARNESS_TASKS.register(_task.name)(_task)


def _obqa_row(row: dict) -> dict:
    letters, texts = parse_obqa_choices(str(row["Choices"]))
    return {
        "id": str(row["ID"]),
        "question_stem": str(row["Question Stem"]).strip(),
        "choices": {"text": texts, "label": letters},
        "answerKey": str(row["Answer Key"]).strip(),
    }


def obqa_docs(dataset):
    """OpenBookQA's TSV rows (ID, Question Stem, Choices "(A) .. (B) ..", Answer Key) as the Hub's columns."""
    return dataset.map(_obqa_row, remove_columns=dataset.column_names)


def _mrpc_row(row: dict) -> dict:
    return {
        "sentence1": str(row["#1 String"]),
        "sentence2": str(row["#2 String"]),
        "label": int(row["Quality"]),
    }


def mrpc_docs(dataset):
    """GLUE MRPC's TSV rows (Quality, #1 String, #2 String) as the Hub's columns."""
    return dataset.map(_mrpc_row, remove_columns=dataset.column_names)


def _tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def write_task_configs(names: list[str], data_dir: Path, folder: Path) -> list[str]:
    """Write one lm-eval task YAML per task ``names`` into ``folder``, reading ``data_dir``; returns
    the task names to ask lm-eval for. Raises DataError naming a missing file."""
    folder.mkdir(parents=True, exist_ok=True)
    # lm-eval resolves `!function module.name` beside the YAML: a module that re-exports ours.
    (folder / "smoe_docs.py").write_text(
        "from pipeline.lm_harness import mrpc_docs, obqa_docs  # noqa: F401\n"
    )
    out = []
    for name in names:
        task = HARNESS_TASKS.get(name)
        files = {}
        for split, rel in task.files.items():
            path = Path(data_dir) / rel
            if not path.is_file():
                raise DataError(f"missing data file {path} for lm-eval task {name!r}")
            files[split] = str(path.resolve())
        kwargs: dict = {"data_files": files}
        if task.builder == "csv":
            # Tab-separated, no quoting (sentences may start with '"'), a byte-order mark in GLUE
            # files, and no "NA"/"null" strings turned into missing values.
            kwargs |= {"sep": "\t", "quoting": 3, "encoding": "utf-8-sig", "keep_default_na": False}
        lines = [
            f"include: {json.dumps(str(_tasks_dir() / task.official))}",
            f"task: smoe_{name}",
            "tag: []",
            f"dataset_path: {task.builder}",
            "dataset_name: null",
            f"dataset_kwargs: {json.dumps(kwargs)}",
        ]
        # The official config's other splits (train, ...) are not in the data folder.
        for key, split in (
            ("training_split", "train"),
            ("validation_split", "validation"),
            ("test_split", "test"),
        ):
            lines.append(f"{key}: {split if split in files else 'null'}")
        if task.process_docs:
            lines.append(f"process_docs: !function smoe_docs.{task.process_docs}")
        (folder / f"smoe_{name}.yaml").write_text("\n".join(lines) + "\n")
        out.append(f"smoe_{name}")
    return out


def lm_eval_version() -> str:
    """The installed lm-evaluation-harness version (recorded beside every score it gives)."""
    from importlib.metadata import version

    return version("lm_eval")


def _special_tokens(tokenizer) -> bool | None:
    """lm-eval's ``add_bos_token`` for ``tokenizer``: None (lm-eval's default: the tokenizer's own
    special tokens) when it adds at most a leading BOS, False (none) when it appends tokens."""
    bare = tokenizer.encode("a b", add_special_tokens=False)
    full = tokenizer.encode("a b", add_special_tokens=True)
    bos = getattr(tokenizer, "bos_token_id", None)
    if full == bare or (bos is not None and full == [bos, *bare]):
        return None
    # lm-eval splits encode(context + continuation) at len(encode(context)): a token appended to
    # both (this project's BPE tokenizers end every text with </s>) would shift the scored tokens.
    return False


def check_prepared_subsets(
    prepared: dict[str, list[ChoiceExample]], indices: dict[str, list[int]], data_dir: Path
) -> None:
    """DataError unless the official files in ``data_dir`` hold the prepared examples at ``indices``:
    lm-eval reads the files, the project scorer the prepared copy, and pairing needs both the same."""
    for name, examples in prepared.items():
        every = load_choice_task(name, data_dir)
        idx = indices.get(name)
        if idx is None or len(idx) != len(examples):
            raise DataError(
                f"the prepared {name!r} examples carry no positions in the official split; run prepare again"
            )
        if any(i >= len(every) or every[i] != ex for i, ex in zip(idx, examples, strict=True)):
            raise DataError(
                f"{data_dir}: the {name!r} file is not the one the prepare stage read (its examples "
                "differ at the prepared positions); point data.data_dir at that folder or run prepare again"
            )


def harness_zero_shot(
    model: nn.Module,
    tokenizer,
    names: list[str],
    data_dir: Path,
    folder: Path | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    max_length: int | None = None,
    indices: dict[str, list[int]] | None = None,
    dtype: str = "float32",
) -> dict[str, dict]:
    """Accuracy (and acc_norm where the task defines it) per task, each example's log-likelihood of
    every choice, the (context, continuation) strings lm-eval scored, whether the example was
    answered right (``hits``; ``hits_norm`` by acc_norm), and the lm-eval version that scored them.

    ``limit`` takes the first examples of each split in file order (lm-eval's convention);
    ``indices`` instead names the examples of each task to score, in the order they are reported
    (e.g. :func:`pipeline.zeroshot.subset_indices`, the project scorer's seeded subset).
    Conventions are lm-eval's: its prompts (COPA with two spaces before the choice), context and
    continuation tokenised together, acc_norm per character of the choice, the context cut from the
    left at ``max_length`` (None: the model's context window, as lm-eval finds it). Special tokens
    are the tokenizer's own (a BOS where it adds one) unless it appends tokens, then none.
    ``folder`` receives the task configs (a temporary folder if None); ``dtype`` is the autocast
    precision of the forward passes (float32: none).
    """
    if limit is not None and indices is not None:
        raise ValueError("give limit (the first examples) or indices (chosen ones), not both")
    if indices is not None and (set(indices) != set(names) or not all(indices.values())):
        # lm-eval would score the whole split of a task given no positions.
        raise ValueError(f"indices must name examples of every task {names}, got {sorted(indices)}")
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="lm-eval-tasks-") as tmp:
            return harness_zero_shot(
                model, tokenizer, names, data_dir, Path(tmp), batch_size, limit, max_length, indices, dtype
            )
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = write_task_configs(names, data_dir, folder)
    was_training = model.training
    model.eval()
    lm = HFLM(
        pretrained=model,
        # lm-eval sets a pad token on a tokenizer that lacks one: the caller's stays as it is.
        tokenizer=copy.deepcopy(tokenizer),
        add_bos_token=_special_tokens(tokenizer),
        batch_size=batch_size,
        max_length=max_length,
        # lm-eval runs each forward in its own autocast (off unless given a dtype): the caller's
        # autocast would not reach it.
        mixed_precision_dtype=None if dtype == "float32" else DTYPES[dtype],
    )
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    try:
        with torch.no_grad():
            res = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=manager,
                limit=limit,
                # Sorted: lm-eval scores the chosen docs in file order but labels the j-th with the j-th
                # index given, so an unsorted list would mislabel them (0.4.13).
                samples={f"smoe_{n}": sorted(idx) for n, idx in indices.items()}
                if indices is not None
                else None,
                log_samples=True,
                # The project's paired bootstrap gives the intervals; lm-eval's own stderr bootstrap of
                # MRPC's F1 costs seconds per iteration.
                bootstrap_iters=0,
                # Nothing here is random (zero-shot, no sampling): leave the caller's generators alone.
                random_seed=None,
                numpy_random_seed=None,
                torch_random_seed=None,
                fewshot_random_seed=None,
                verbosity="ERROR",
            )
    finally:
        model.train(was_training)
    version = lm_eval_version()
    out = {}
    for name, task in zip(names, tasks, strict=True):
        metrics = res["results"][task]
        chosen = indices[name] if indices is not None else None
        by_doc = {s["doc_id"]: s for s in res["samples"][task]}
        samples = [by_doc[i] for i in (chosen if chosen is not None else sorted(by_doc))]
        lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
        if not all(math.isfinite(x) for ll in lls for x in ll):
            raise NonFiniteOutputError(
                f"lm-eval task {name!r}: the model's log-likelihoods are NaN or infinite (its weights "
                "overflow at this precision, or are non-finite)"
            )
        out[name] = {
            "accuracy": metrics["acc,none"],
            **({"accuracy_norm": metrics["acc_norm,none"]} if "acc_norm,none" in metrics else {}),
            "examples": len(samples),
            "loglikelihoods": lls,
            "requests": [[tuple(a) for a in s["arguments"]] for s in samples],
            "hits": [bool(s["acc"]) for s in samples],
            # acc_norm's per-example hits, where the task defines it (OpenBookQA of these four).
            **({"hits_norm": [bool(s["acc_norm"]) for s in samples]} if "acc_norm,none" in metrics else {}),
            "lm_eval_version": version,
        }
    return out


# The values of params evaluate.zero_shot_scorer.
ZERO_SHOT_SCORERS = ("lm-eval", "project")


def zero_shot_scorer_record(scorer: str) -> dict[str, str]:
    """What scored the zero-shot tasks, for the metrics file and the run's params: lm-eval's package
    name and version, or the project scorer (:mod:`pipeline.zeroshot`, versioned with the code)."""
    if scorer == "lm-eval":
        return {"name": "lm-evaluation-harness", "version": lm_eval_version()}
    if scorer == "project":
        return {"name": "project", "module": "pipeline.zeroshot"}
    raise ValueError(f"unknown zero-shot scorer {scorer!r}; valid choices: {', '.join(ZERO_SHOT_SCORERS)}")


def score_zero_shot(
    model: nn.Module,
    task: PreparedTask,
    scorer: str,
    batch_size: int,
    device: torch.device,
    dtype: str = "float32",
    data_dir: Path | None = None,
) -> tuple[dict[str, dict], dict[str, list[bool]]]:
    """Accuracy (acc_norm where the scorer gives it) and example count per zero-shot task of the
    prepared ``task``, and each example's hit, in the prepared order.

    ``scorer`` "lm-eval" scores the official files in ``data_dir`` at the prepared positions, so
    every variant and either scorer see the same examples; "project" scores the prepared copies.
    """
    if scorer == "lm-eval":
        if data_dir is None:
            raise ValueError("the lm-eval scorer reads the official task files: give their data_dir")
        res = harness_zero_shot(
            model.to(device),
            task.tokenizer,
            list(task.zero_shot),
            data_dir,
            batch_size=batch_size,
            indices=task.zero_shot_indices,
            dtype=dtype,
        )
        metrics = {
            name: {k: r[k] for k in ("accuracy", "accuracy_norm", "examples") if k in r}
            for name, r in res.items()
        }
        return metrics, {name: r["hits"] for name, r in res.items()}
    if scorer == "project":
        hits = zero_shot_hits(model.to(device), task.tokenizer, task.zero_shot, batch_size, device, dtype)
        metrics = {k: v for k, v in suite_accuracy(hits).items() if isinstance(v, dict)}
        return metrics, {name: h for name, (h, _) in hits.items()}
    raise ValueError(f"unknown zero-shot scorer {scorer!r}; valid choices: {', '.join(ZERO_SHOT_SCORERS)}")
