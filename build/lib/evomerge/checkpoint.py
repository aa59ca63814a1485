"""Model folders on disk: lazy safetensors reads, compatibility checks, streaming sharded writes.

Headers are parsed without touching tensor data, so every check runs before any compute. Writes go to
a temporary sibling folder that is renamed into place at the end, so a killed merge leaves nothing
half-written behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from evomerge.errors import SpecError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def resolve_model_path(ref: str) -> Path:
    """A model reference as a folder: a path, or ``demo:NAME`` for the built-in zoo."""
    if ref.startswith("demo:"):
        from evomerge.demo import model_path

        try:
            return model_path(ref.removeprefix("demo:"))
        except KeyError as err:
            raise SpecError(str(err.args[0])) from None
    return Path(ref).expanduser()


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of one safetensors file, read from its header alone."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
        infos: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            if end > size - 8 - length or start > end:
                raise ValueError(f"tensor {name} lies past the end of the file")
            infos[name] = TensorInfo(tuple(entry["shape"]), DTYPES[entry["dtype"]], path)
        return infos
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise SpecError(f"{path}: not a readable safetensors file ({err})") from None


@dataclass
class Checkpoint:
    """One model folder: its config and the location of every tensor, data read only on demand."""

    path: Path
    config: dict
    tensors: dict[str, TensorInfo]
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)

    @property
    def vocab_size(self) -> int | None:
        cfg = self.config.get("text_config", self.config)
        return cfg.get("vocab_size")

    @property
    def num_layers(self) -> int:
        """Layer count from the config, else from the tensor names."""
        cfg = self.config.get("text_config", self.config)
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
        indices = [layer_index(n) for n in self.tensors]
        return max((i for i in indices if i is not None), default=-1) + 1

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
        tensor = handle.get_tensor(name)
        return tensor if str(device) == "cpu" else tensor.to(device, non_blocking=True)


def open_checkpoint(ref: str) -> Checkpoint:
    """Open a Hugging Face model folder; SpecError if it is missing, has no weights or is corrupt."""
    path = resolve_model_path(ref)
    if not path.is_dir():
        raise SpecError(f"model folder not found: {ref}")
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
    except json.JSONDecodeError as err:
        raise SpecError(f"{config_file}: invalid JSON ({err})") from None
    index = path / INDEX_FILE
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            raise SpecError(f"{index}: not a safetensors index ({err})") from None
        paths = [path / f for f in files]
    elif (path / SINGLE_FILE).exists():
        paths = [path / SINGLE_FILE]
    else:
        paths = sorted(path.glob("*.safetensors"))
    if not paths:
        raise SpecError(f"no safetensors weights in {path}")
    tensors: dict[str, TensorInfo] = {}
    for file in paths:
        if not file.exists():
            raise SpecError(f"{index}: shard {file.name} is missing")
        tensors.update(read_header(file))
    return Checkpoint(path=path, config=config, tensors=tensors)


def check_compatible(checkpoints: list[Checkpoint]) -> None:
    """Same tensor names and shapes, same vocabulary size, in every model; names the first offender."""
    first = checkpoints[0]
    for other in checkpoints[1:]:
        if first.vocab_size != other.vocab_size:
            raise SpecError(f"vocabulary sizes differ: {first.path} has {first.vocab_size}, "
                            f"{other.path} has {other.vocab_size}")
        missing = sorted(set(first.tensors) ^ set(other.tensors))
        if missing:
            owner = first.path if missing[0] in first.tensors else other.path
            raise SpecError(f"tensor {missing[0]} is in {owner} but not in the other of "
                            f"{first.path} and {other.path}")
        for name, info in first.tensors.items():
            if info.shape != other.tensors[name].shape:
                raise SpecError(f"tensor {name} has shape {list(info.shape)} in {first.path} "
                                f"but {list(other.tensors[name].shape)} in {other.path}")


def layer_index(name: str) -> int | None:
    """Transformer block number of a tensor name (``model.layers.3.mlp...`` -> 3), None outside blocks."""
    match = LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------- writing


def _shard_plan(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    used = 0
    for i, (_, shape, dtype) in enumerate(entries):
        size = _nbytes(shape, dtype)
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


class ShardedWriter:
    """Writes tensors straight into pre-planned safetensors shards, one tensor in memory at a time.

    Shapes and dtypes are known before any tensor is computed, so each shard's header is written first
    and every tensor's bytes are appended as soon as it exists. Tensors must arrive in planned order.
    """

    def __init__(self, folder: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 2 * 1024**3) -> None:
        self.folder = folder
        self.entries = entries
        self.plan = _shard_plan(entries, max_shard_bytes)
        n = len(self.plan)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._next = 0
        self._shard = -1
        self._handle = None
        self._remaining: list[int] = []

    def _open_next_shard(self) -> None:
        self._shard += 1
        indices = self.plan[self._shard]
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in indices:
            name, shape, dtype = self.entries[i]
            size = _nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._handle = (self.folder / self.files[self._shard]).open("wb")
        self._handle.write(struct.pack("<Q", len(raw)) + raw)
        self._remaining = list(indices)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, shape, dtype = self.entries[self._next]
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"writer expected {expected} {shape} {dtype}, got {name} {tuple(tensor.shape)} "
                               f"{tensor.dtype}")
        if not self._remaining:
            self._open_next_shard()
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))
        self._remaining.pop(0)
        self._next += 1
        if not self._remaining:
            self._handle.close()

    def finish(self) -> None:
        """Write the index (for several shards); all tensors must have been written."""
        if self._next != len(self.entries):
            raise RuntimeError(f"only {self._next} of {len(self.entries)} tensors were written")
        if len(self.files) > 1:
            weight_map = {self.entries[i][0]: self.files[s] for s, idx in enumerate(self.plan) for i in idx}
            total = sum(_nbytes(shape, dtype) for _, shape, dtype in self.entries)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


def copy_side_files(source: Path, target: Path, dtype: torch.dtype) -> None:
    """Copy config, generation config and tokenizer files; record the output dtype in config.json."""
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name != INDEX_FILE:
            shutil.copy2(item, target / item.name)
    config_file = target / "config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = str(dtype).removeprefix("torch.")
        config_file.write_text(json.dumps(config, indent=2) + "\n")


def check_output_folder(out: Path, force: bool) -> None:
    """Refuse an existing output folder unless forced (checked before any compute)."""
    if out.exists() and not force:
        raise SpecError(f"output folder {out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise SpecError(f"output path {out} exists and is not a folder")


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out`` in one rename."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
