"""Training over several processes (``accelerate launch``): the launcher setting, its accelerate
config files, and how one global batch is split over the processes.

The launcher is the first words of a DVC stage command (``launch.launcher``): ``python`` runs one
process, ``accelerate launch ...`` several. ``finetune.batch_size`` (and ``kd.train.batch_size``)
stay the GLOBAL batch: N processes each take a slice of the same batch one process would take, so
results of runs with different process counts compare.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

# The accepted forms of launch.launcher (options in any order after `accelerate launch`).
LAUNCHER_FORMS = (
    "python",
    "accelerate launch --multi_gpu --num_processes N [--main_process_port P]",
    "accelerate launch --config_file PATH [--num_processes N] [--main_process_port P]",
)
_OPTIONS = {"--num_processes": r"[1-9][0-9]*", "--main_process_port": r"[1-9][0-9]*", "--config_file": r"\S+"}
# What each distributed_type of an accelerate config needs beyond torch and accelerate.
_NEEDS = {"DEEPSPEED": "deepspeed"}


class LauncherError(ValueError):
    """A launch.launcher value that is not one of LAUNCHER_FORMS, or names an unusable config."""


@dataclass(frozen=True)
class Launcher:
    """A parsed ``launch.launcher``."""

    text: str
    num_processes: int | None = None  # None: one process (python) or what the config file says
    config_file: str | None = None

    @property
    def distributed(self) -> bool:
        return self.text != "python"


def parse_launcher(text: str) -> Launcher:
    """Parse and check a launcher value against :data:`LAUNCHER_FORMS` (one-line error otherwise)."""
    words = text.split()
    bad = LauncherError(f"launch.launcher {text!r} is not one of: {' | '.join(LAUNCHER_FORMS)}")
    if words == ["python"]:
        return Launcher("python")
    if words[:2] != ["accelerate", "launch"]:
        raise bad
    opts: dict[str, str] = {}
    multi_gpu = False
    rest = words[2:]
    while rest:
        key = rest.pop(0)
        if key == "--multi_gpu" and not multi_gpu:
            multi_gpu = True
            continue
        if key not in _OPTIONS or key in opts or not rest or not re.fullmatch(_OPTIONS[key], rest[0]):
            raise bad
        opts[key] = rest.pop(0)
    config = opts.get("--config_file")
    n = int(opts["--num_processes"]) if "--num_processes" in opts else None
    # Without --multi_gpu or a config, accelerate starts ONE process whatever --num_processes says.
    if (config is None) == (not multi_gpu) or (multi_gpu and n is None):
        raise bad
    return Launcher(text, n, config)


def check_config_file(path: str | Path) -> str:
    """The ``distributed_type`` of an accelerate config file; refuses a missing or unreadable file,
    and a type whose package is not installed (DeepSpeed), in one line."""
    path = Path(path)
    if not path.is_file():
        raise LauncherError(f"launch.launcher: accelerate config file {path} not found")
    try:
        config = yaml.safe_load(path.read_text()) or {}
        kind = str(config["distributed_type"])
    except (yaml.YAMLError, KeyError, TypeError) as err:
        raise LauncherError(
            f"launch.launcher: {path} is not an accelerate config with a distributed_type ({err})"
        ) from None
    package = _NEEDS.get(kind)
    if package and importlib.util.find_spec(package) is None:
        raise LauncherError(
            f"launch.launcher: {path} uses distributed_type {kind}, which needs the {package} package "
            f"(pip install {package}); it is not installed"
        )
    return kind


def check_batch_size(batch_size: int, processes: int, what: str = "batch_size") -> None:
    """Refuse a global batch that the processes cannot share evenly."""
    if batch_size % processes:
        raise LauncherError(
            f"{what}={batch_size} (the global batch) is not divisible by the {processes} processes; "
            f"use a multiple of {processes}"
        )


def make_accelerator(device: torch.device):
    """The Accelerator of a launched run: the global batch split over processes (one scheduler
    step per global batch), DDP that tolerates experts no token of a process's slice reached."""
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs

    return Accelerator(
        cpu=device.type == "cpu",
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def launched_accelerator(launcher: str, device: torch.device, *batch_sizes: tuple[str, int]):
    """The Accelerator of a run started by ``accelerate launch`` in several processes, else None.

    The process count comes from the launcher's environment (WORLD_SIZE). Refuses (LauncherError)
    a count that contradicts ``launcher`` and a global batch (``(name, size)`` pairs) that the
    processes cannot share evenly.
    """
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    parsed = parse_launcher(launcher)
    if not parsed.distributed and world > 1:
        raise LauncherError(f"launch.launcher is python, but this stage runs in {world} processes")
    if parsed.num_processes is not None and parsed.num_processes != world:
        raise LauncherError(
            f"launch.launcher asks for {parsed.num_processes} processes, but this stage runs in {world}; "
            "start it through its DVC stage command or the launcher itself"
        )
    for name, size in batch_sizes:
        check_batch_size(size, world, name)
    return make_accelerator(device) if world > 1 else None
