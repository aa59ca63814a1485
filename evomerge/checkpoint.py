"""Model folders on disk: lazy safetensors reads, compatibility checks, streaming sharded writes.

Headers are parsed without touching tensor data, so every check runs before any compute. Writers fill
``files.atomic_folder``: a temporary sibling renamed into place at the end, so a killed merge leaves nothing
half-written behind.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from evomerge.errors import SpecError
from evomerge.files import os_reason, regular_file
from evomerge.layout import LAYER_PATTERN, layer_index
from evomerge.refs import ADAPTER_CONFIG, lexists, resolve_model_path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def folder_names(path: Path, ref: str | Path) -> list[str]:
    """The sorted names in the folder ``path`` (reference ``ref``); SpecError, naming why, when it is missing, not a
    folder, a link loop, a name too long or unreadable."""
    try:
        if not stat.S_ISDIR(path.stat().st_mode):
            raise SpecError(f"model folder not found: {ref} ({path} is not a folder)")
        return sorted(os.listdir(path))
    except FileNotFoundError:
        raise SpecError(f"model folder not found: {ref}") from None
    except OSError as err:
        raise SpecError(f"model folder {ref}: cannot read it ({os_reason(err)})") from None


def layer_count_field(config: dict) -> tuple[dict, str]:
    """Where a config keeps its block count: its text config (multimodal configs nest one) and the key that holds
    the count there (``num_hidden_layers`` when none does), so readers and writers of the count agree."""
    text = config.get("text_config")
    text = text if isinstance(text, dict) else config
    key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in text), None)
    return text, key or "num_hidden_layers"


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int  # of the tensor's first byte in the file


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of one safetensors file, read from its header alone.

    The header is checked as strictly as the safetensors library checks it when the data is read (byte
    ranges that fit each shape and dtype and tile the data area), so a bad file fails before compute."""
    regular_file(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        infos: dict[str, TensorInfo] = {}
        ranges: list[tuple[int, int, str]] = []
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise SpecError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']} (evomerge merges "
                                f"{', '.join(SAFETENSORS_DTYPES)}; quantized weights need their own merge)")
            shape, dtype, (start, end) = entry["shape"], SAFETENSORS_DTYPES[entry["dtype"]], entry["data_offsets"]
            if not all(isinstance(v, int) and v >= 0 for v in [*shape, start, end]):
                raise ValueError(f"tensor {name} has a bad shape or data_offsets")
            if end - start != _nbytes(tuple(shape), dtype):
                raise ValueError(f"tensor {name}: data_offsets [{start}, {end}] do not match shape {shape} "
                                 f"of {entry['dtype']}")
            infos[name] = TensorInfo(tuple(shape), dtype, path, 8 + length + start)
            ranges.append((start, end, name))
        covered = 0
        for start, end, name in sorted(ranges):
            if start != covered:
                raise ValueError(f"tensor {name}: data_offsets [{start}, {end}] overlap or leave a gap "
                                 f"(previous data ends at {covered})")
            covered = end
        if covered != size - 8 - length:
            raise ValueError(f"tensor data ends at byte {covered} but the data area holds {size - 8 - length}")
        return infos
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise SpecError(f"{path}: not a readable safetensors file ({err})") from None


@dataclass
class Checkpoint:
    """One model folder: its config and the location of every tensor, data read only on demand."""

    path: Path
    config: dict
    tensors: dict[str, TensorInfo]

    @property
    def vocab_size(self) -> int | None:
        cfg = self.config.get("text_config", self.config)
        return cfg.get("vocab_size")

    @property
    def num_layers(self) -> int:
        """Layer count from the config (open_checkpoint checked it against the tensors), else from the tensor
        names."""
        cfg, key = layer_count_field(self.config)
        if isinstance(cfg.get(key), int):
            return cfg[key]
        indices = [layer_index(n) for n in self.tensors]
        return max((i for i in indices if i is not None), default=-1) + 1

    @property
    def layer_prefix(self) -> str:
        """What block tensor names start with before the block number (``model.layers.``; "" without blocks)."""
        for name in self.tensors:
            match = LAYER_PATTERN.search(name)
            if match:
                return name[: match.start(1)]
        return ""

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, read with plain file reads into memory we own (safetensors is little-endian, as is
        every platform torch supports): no memory map, so input pages never count against our RSS and a
        tensor's memory is gone as soon as it is dropped."""
        info = self.tensors[name]
        tensor = torch.empty(info.shape, dtype=info.dtype)
        with info.file.open("rb", buffering=0) as f:
            f.seek(info.offset)
            _fill(f, tensor, name)
        return tensor if str(device) == "cpu" else tensor.to(device, non_blocking=True)

    def read_slices(self, name: str, size: int) -> Iterator[torch.Tensor]:
        """A tensor's flattened data as consecutive slices of ``size`` entries (the last may be shorter), read
        in order from one open file (CPU)."""
        info = self.tensors[name]
        total = math.prod(info.shape)
        with info.file.open("rb", buffering=0) as f:
            f.seek(info.offset)
            for start in range(0, total, size):
                tensor = torch.empty(min(size, total - start), dtype=info.dtype)
                _fill(f, tensor, name)
                yield tensor

    def view(self, name: str) -> torch.Tensor:
        """The tensor as stored, on the CPU, backed by a memory map of its file: no copy is made, its pages are
        the page cache's (one copy per node, shared by every process that maps the file). A private mapping: a
        write to it would go to a copy, never to the file; callers only read it. A tensor whose bytes are not
        aligned to its element size (or is empty) is read into memory instead."""
        info = self.tensors[name]
        size = info.dtype.itemsize
        count = math.prod(info.shape)
        if not count or info.offset % size:
            return self.read(name)
        return torch.frombuffer(_mapped(info.file), dtype=info.dtype, count=count,
                                offset=info.offset).view(info.shape)

    def stored(self, name: str) -> bool:
        """Whether the tensor is read as stored, so ``read_slices`` may read it in slices."""
        return True


_MAPS: dict[tuple[Path, int, int], mmap.mmap] = {}


def _mapped(file: Path) -> mmap.mmap:
    """One private read-only map per file (and file version) in this process, open as long as the process."""
    stat = file.stat()
    key = (file.resolve(), stat.st_ino, stat.st_mtime_ns)
    if key not in _MAPS:
        with file.open("rb") as f:
            _MAPS[key] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return _MAPS[key]


def _fill(f: BinaryIO, tensor: torch.Tensor, name: str) -> None:
    """Read ``tensor``'s bytes from where ``f`` stands."""
    buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
    done = 0
    while done < len(buffer):
        got = f.readinto(buffer[done:])
        if not got:
            raise SpecError(f"{f.name}: ends inside tensor {name}")
        done += got


def read_json_object(file: Path) -> dict:
    regular_file(file)
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpecError(f"{file}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _index_files(index: Path) -> dict[str, str]:
    """The weight map of a sharded checkpoint: tensor name -> shard file name in the same folder."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v == Path(v).name for k, v in weight_map.items()):
        raise SpecError(f"{index}: weight_map must map tensor names to shard file names")
    return weight_map


def open_folder(ref: str) -> Checkpoint:
    """Open a Hugging Face model folder (a reference without an adapter); SpecError if it is missing, has no config
    or weights, or is corrupt. :func:`evomerge.models.open_checkpoint` opens any reference."""
    path = resolve_model_path(ref)
    names = folder_names(path, ref)
    config_file = path / "config.json"
    if "config.json" not in names:
        hint = (f" (it holds a LoRA adapter: name it with its base model, as BASE+{ref})"
                if ADAPTER_CONFIG in names else "")
        raise SpecError(f"no config.json in {path}{hint}")
    config = read_json_object(config_file)
    index = path / INDEX_FILE
    if INDEX_FILE in names:
        weight_map = _index_files(index)
        if not weight_map:
            raise SpecError(f"no safetensors weights in {path}")
        headers = {}
        for file in sorted(set(weight_map.values())):
            if not lexists(path / file):
                raise SpecError(f"{index}: shard {file} is missing")
            headers[file] = read_header(path / file)
        missing = next((n for n, f in weight_map.items() if n not in headers[f]), None)
        if missing is not None:
            raise SpecError(f"{index}: tensor {missing} is not in its shard {weight_map[missing]}")
        tensors = {n: headers[f][n] for n, f in weight_map.items()}
    else:
        tensors = _unindexed_tensors(path, names)
    check_block_count(config_file, config, tensors)
    return Checkpoint(path=path, config=config, tensors=tensors)


def _unindexed_tensors(path: Path, names: list[str]) -> dict[str, TensorInfo]:
    """The tensors of a folder without an index: ``model.safetensors``, else every ``*.safetensors``, which may not
    define a tensor twice (nothing would say which copy the model is)."""
    files = [SINGLE_FILE] if SINGLE_FILE in names else [n for n in names if n.endswith(".safetensors")]
    if not files:
        raise SpecError(f"no safetensors weights in {path}")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_header(path / file).items():
            if name in tensors:
                raise SpecError(f"{path}: tensor {name} is in both {tensors[name].file.name} and {file}, and no "
                                f"{INDEX_FILE} says which one the model uses")
            tensors[name] = info
    return tensors


def check_block_count(config_file: Path, config: dict, tensors: dict[str, TensorInfo]) -> None:
    """A config's block count must be a count and the tensors' (blocks 0 to count - 1): gradients spread over it,
    and the output config claims it. Checked when some tensor names a block (of any of the model's stacks)."""
    text, key = layer_count_field(config)
    if key not in text:
        return
    count = text[key]
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise SpecError(f"{config_file}: {key} must be a whole number of blocks, got {count!r}")
    stacks: dict[str, set[int]] = {}  # block prefix -> the block numbers its tensors name
    for name in tensors:
        match = LAYER_PATTERN.search(name)
        if match:
            stacks.setdefault(name[: match.start(1)], set()).add(int(match.group(1)))
    if stacks and set(range(count)) not in stacks.values():
        prefix, held = next(iter(stacks.items()))
        blocks = f"{len(held)} blocks" + (f" (0-{max(held)})" if held == set(range(len(held))) else
                                         f" ({', '.join(map(str, sorted(held)))})")
        raise SpecError(f"{config_file}: {key} is {count} but its tensors hold {blocks} under {prefix}")


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
            header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
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


def side_files(source: Path) -> list[Path]:
    """The files of a model folder an output copies (config, generation config, tokenizer: all but weights and
    subfolders), each checked readable: merge_to_folder checks them before compute, as they are copied last."""
    files = []
    for name in folder_names(source, source):
        item = source / name
        if not name.endswith(WEIGHT_SUFFIXES) and name != INDEX_FILE and not item.is_dir():
            files.append(regular_file(item))
    return files


def copy_side_files(source: Path, target: Path, dtype: torch.dtype) -> None:
    """Copy config, generation config and tokenizer files; record the output dtype in config.json."""
    for item in side_files(source):
        shutil.copy2(item, target / item.name)
    config_file = target / "config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = str(dtype).removeprefix("torch.")
        config_file.write_text(json.dumps(config, indent=2) + "\n")


def shard_bytes(gib: float) -> int:
    """``--shard-size`` in GiB as bytes; SpecError unless it is a finite number above zero."""
    if not math.isfinite(gib) or gib <= 0:
        raise SpecError(f"--shard-size must be a positive number of GiB, got {gib}")
    return max(1, int(gib * 1024**3))


