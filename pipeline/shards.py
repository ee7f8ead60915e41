"""Safetensors checkpoints read and written one tensor at a time.

Shared by the streamed merge (:mod:`pipeline.streaming`) and the offloaded profile
(:mod:`pipeline.offload`), which both work on checkpoints larger than memory: the reader opens a
shard only for one read, so none stays mapped; the writer streams tensors into shards without
holding a shard in memory and names and indexes them as ``save_pretrained`` does.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from pipeline.modeling import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

#: torch dtypes and the names safetensors headers give them.
DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def natural_key(name: str) -> list:
    """Sort key for tensor names with numbers compared as numbers (``layers.2`` before ``layers.10``)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def parse_size(size: int | str) -> int:
    """Bytes of ``5GB``, ``500MB``, ``20KB`` (powers of 1000, like transformers) or an int."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit, factor in (
        ("GIB", 2**30),
        ("MIB", 2**20),
        ("KIB", 2**10),
        ("GB", 10**9),
        ("MB", 10**6),
        ("KB", 10**3),
    ):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    try:
        return int(text.removesuffix("B"))
    except ValueError:
        raise ValueError(f"max_shard_size={size!r} is not a size (e.g. 2GB, 500MB or bytes)") from None


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc keeps it per thread arena otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ------------------------------------------------------------------------------------ reading


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint folder: one ``model.safetensors`` or shards listed
    by ``model.safetensors.index.json``. Tensors are read one call at a time, in their stored dtype;
    every shard is opened only for the duration of a read, so no shard stays mapped."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"model folder {self.folder} does not exist")
        if not (self.folder / "config.json").is_file():
            raise CheckpointError(f"{self.folder} is not a model folder: no config.json")
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{index} is not a safetensors index (no weight_map)") from None
        elif (self.folder / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise CheckpointError(
                f"{self.folder} holds no weights: expected {SINGLE_FILE} or {INDEX_FILE} (safetensors only)"
            )
        shards = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        missing = [s for s in shards if not (self.folder / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{self.folder}: shard {missing[0]} named by {INDEX_FILE} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        self.shape: dict[str, tuple[int, ...]] = {}
        self.shard_of: dict[str, str] = {}
        for shard in shards:
            for name, shape in self._header(shard).items():
                if weight_map is None or weight_map.get(name) == shard:
                    self.shard_of[name] = shard
                    self.shape[name] = shape
        if weight_map is not None:
            lacking = sorted(n for n in weight_map if n not in self.shard_of)
            if lacking:
                raise CheckpointError(
                    f"{self.folder}: {INDEX_FILE} places {lacking[0]} in {weight_map[lacking[0]]}, "
                    "which does not hold it"
                )

    def _header(self, shard: str) -> dict[str, tuple[int, ...]]:
        from safetensors import safe_open

        try:
            with safe_open(str(self.folder / shard), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(
                f"{self.folder / shard}: cannot read the safetensors header ({err})"
            ) from None

    @property
    def names(self) -> list[str]:
        return list(self.shard_of)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each shard opened once for the call."""
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = {}
        for n in names:
            by_shard.setdefault(self.shard_of[n], []).append(n)
        out = {}
        for shard, keys in by_shard.items():
            try:
                with safe_open(str(self.folder / shard), framework="pt") as f:
                    for k in keys:
                        out[k] = f.get_tensor(k)
            except Exception as err:
                raise CheckpointError(f"{self.folder / shard}: cannot read {keys[0]} ({err})") from None
        return out


# ------------------------------------------------------------------------------------ writing


class ShardWriter:
    """Writes tensors one at a time into safetensors shards of at most ``max_bytes`` of tensor data,
    never holding a shard in memory: each shard file starts with room for its header, which is
    filled in (padded with spaces, as the format allows) when the shard closes. A shard also closes
    when its header would outgrow that room."""

    def __init__(self, folder: Path, max_bytes: int, header_room: int | None = None) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        room = header_room if header_room is not None else max(8192, min(2**20, max_bytes // 16))
        self.room = (room + 7) // 8 * 8
        self.files: list[Path] = []
        self.shard_names: list[list[str]] = []
        self.total_size = 0
        self.total_params = 0
        self._f = None
        self._header: dict = {}
        self._header_len = 0
        self._offset = 0

    def _open(self) -> None:
        path = self.folder / f".shard-{len(self.files) + 1:05d}.safetensors"
        self._f = open(path, "wb")  # noqa: SIM115  (closed in _close)
        self._f.write(b"\0" * (8 + self.room))
        self.files.append(path)
        self.shard_names.append([])
        self._header = {"__metadata__": {"format": "pt"}}
        self._header_len = len(json.dumps(self._header))
        self._offset = 0

    def _close(self) -> None:
        if self._f is None:
            return
        text = json.dumps(self._header, separators=(",", ":")).encode()
        if len(text) > self.room:  # guarded in add(); a bug if reached
            raise RuntimeError("safetensors header outgrew its room")
        self._f.seek(0)
        self._f.write(self.room.to_bytes(8, "little"))
        self._f.write(text + b" " * (self.room - len(text)))
        self._f.close()
        self._f = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors here")
        t = tensor.detach().contiguous()
        nbytes = t.numel() * t.element_size()
        entry = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [0, 0]}
        # Generous estimate of the entry's JSON length (offsets up to 20 digits each).
        entry_len = len(json.dumps({name: entry}, separators=(",", ":"))) + 40
        if entry_len > self.room:
            raise ValueError(f"{name}: tensor name too long for a shard header")
        if (
            self._f is not None
            and self.shard_names[-1]
            and (self._offset + nbytes > self.max_bytes or self._header_len + entry_len > self.room)
        ):
            self._close()
        if self._f is None:
            self._open()
        entry["data_offsets"] = [self._offset, self._offset + nbytes]
        if nbytes:
            self._f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._header[name] = entry
        self._header_len += entry_len
        self._offset += nbytes
        self.shard_names[-1].append(name)
        self.total_size += nbytes
        self.total_params += t.numel()

    def finish(self) -> dict[str, str]:
        """Close the last shard, give the shards transformers' names and write the index (none for
        a single shard, which is ``model.safetensors`` as ``save_pretrained`` names it)."""
        self._close()
        n = len(self.files)
        if n == 0:
            raise ValueError("no tensor was written")
        finals = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for path, final, names in zip(self.files, finals, self.shard_names, strict=True):
            os.replace(path, self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            index = {
                "metadata": {"total_parameters": self.total_params, "total_size": self.total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return weight_map
