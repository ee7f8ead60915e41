"""Zero-shot evaluation of decoder LMs by lm-evaluation-harness, offline, on the local task files.

Each task is lm-eval's own definition (its YAML, prompts and metrics, ``include``-d from the
installed package) with only the data source replaced by the official file in the data folder,
so scores are comparable with published lm-eval numbers. The model is passed in-process.
Rows of the TSV files are turned into the Hub's columns, which the official definitions read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.data import DataError
from pipeline.registry import Registry
from pipeline.zeroshot import parse_obqa_choices


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


def harness_zero_shot(
    model: nn.Module,
    tokenizer,
    names: list[str],
    data_dir: Path,
    folder: Path,
    batch_size: int = 32,
    limit: int | None = None,
    max_length: int = 512,
    indices: dict[str, list[int]] | None = None,
) -> dict[str, dict]:
    """Accuracy (and acc_norm where the task defines it) per task, each example's log-likelihood of
    every choice and whether it was answered right, and the lm-eval version that scored them.

    ``limit`` takes the first examples of each split in file order (lm-eval's convention);
    ``indices`` instead names the examples of each task to score, in the order they are reported
    (e.g. :func:`pipeline.zeroshot.subset_indices`, the project scorer's seeded subset). No BOS
    token is added unless the tokenizer adds one itself: lm-eval's convention for these tasks.
    """
    if limit is not None and indices is not None:
        raise ValueError("give limit (the first examples) or indices (chosen ones), not both")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = write_task_configs(names, data_dir, folder)
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        add_bos_token=False,
        batch_size=batch_size,
        max_length=max_length,
    )
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    with torch.no_grad():
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            # Sorted: lm-eval scores the chosen docs in file order but labels the j-th with the j-th
            # index given, so an unsorted list would mislabel them (0.4.13).
            samples={f"smoe_{n}": sorted(idx) for n, idx in indices.items()} if indices else None,
            log_samples=True,
            # The project's paired bootstrap gives the intervals; lm-eval's own stderr bootstrap of
            # MRPC's F1 costs seconds per iteration.
            bootstrap_iters=0,
            verbosity="ERROR",
        )
    out = {}
    for name, task in zip(names, tasks, strict=True):
        metrics = res["results"][task]
        chosen = indices.get(name) if indices else None
        by_doc = {s["doc_id"]: s for s in res["samples"][task]}
        samples = [by_doc[i] for i in (chosen or sorted(by_doc))]
        out[name] = {
            "accuracy": metrics["acc,none"],
            **({"accuracy_norm": metrics["acc_norm,none"]} if "acc_norm,none" in metrics else {}),
            "examples": len(samples),
            "loglikelihoods": [[float(r[0][0]) for r in s["resps"]] for s in samples],
            "hits": [bool(s["acc"]) for s in samples],
            "lm_eval_version": lm_eval.__version__,
        }
    return out
