"""Where a live worker's inputs (the base and the models it merges or takes layers from) live between candidates.

The worker's device holds its live model. The inputs are read tensor by tensor as stored and widened only for
the tensor being merged, so a worker never holds a float32 copy of them. They live either on the device too, in
their stored dtype (``device``: fastest, when they fit beside the live model and the evaluation), or in host
memory as memory-mapped safetensors (``host``): the page cache holds one copy per node, shared by every worker
on it, and a GPU worker stages each tensor to the device through pinned buffers. On a CPU worker ``host`` is the
files themselves: no copy at all. ``auto`` takes ``device`` on a GPU when the inputs fit there, else ``host``.
A placement that cannot fit is refused before any compute, with the sizes."""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import ClassVar, get_args

import torch

from evomerge.checkpoint import Checkpoint
from evomerge.errors import SpecError
from evomerge.recipes import Placement

PLACEMENTS: tuple[Placement, ...] = get_args(Placement)
GB = 1e9
# what the evaluation needs on a GPU beside the live model and the merge scratch (activations, logits, cache)
EVAL_HEADROOM = 1 << 30


class InputStore(ABC):
    """The contract between a live worker and its inputs: ``get(ref, name, device)`` is tensor ``name`` of model
    ``ref`` in the store's dtype (as stored unless the store says otherwise) on ``device``, which the caller reads
    and never writes. ``resident_bytes`` is what the store keeps on the devices between candidates."""

    placement: ClassVar[str]

    def __init__(self, checkpoints: Mapping[str, Checkpoint]) -> None:
        self.checkpoints = dict(checkpoints)

    @abstractmethod
    def get(self, ref: str, name: str, device: torch.device) -> torch.Tensor: ...

    @property
    @abstractmethod
    def resident_bytes(self) -> int: ...

    @abstractmethod
    def describe(self) -> str:
        """One line for the user: where the inputs are and what they take."""


class DeviceInputs(InputStore):
    """Every input tensor read once onto the device of the parameter it feeds, kept as stored (or in ``dtype``: a
    layer path computes with its blocks, so it keeps them in the live model's dtype). Read on first use."""

    placement = "device"

    def __init__(self, checkpoints: Mapping[str, Checkpoint], dtype: torch.dtype | None = None) -> None:
        super().__init__(checkpoints)
        self.dtype = dtype
        self._held: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, ref: str, name: str, device: torch.device) -> torch.Tensor:
        key = (ref, name)
        if key not in self._held:
            tensor = self.checkpoints[ref].read(name, device)
            floating = tensor.is_floating_point() and self.dtype is not None
            self._held[key] = tensor.to(self.dtype) if floating else tensor
        return self._held[key]

    @property
    def resident_bytes(self) -> int:
        return sum(t.nbytes for t in self._held.values())

    def describe(self) -> str:
        devices = sorted({str(t.device) for t in self._held.values()}) or ["the device"]
        return (f"inputs on {', '.join(devices)}: {len(self.checkpoints)} model(s) as stored, "
                f"{self.resident_bytes / GB:.2f} GB")


class HostInputs(InputStore):
    """Inputs memory-mapped in host memory: on a CPU the mapped tensor itself, on a GPU a copy staged through
    two pinned buffers in turn (filling one overlaps the transfer from the other). Holds nothing per candidate."""

    placement = "host"

    def __init__(self, checkpoints: Mapping[str, Checkpoint]) -> None:
        super().__init__(checkpoints)
        self._stager: Stager | None = None

    def get(self, ref: str, name: str, device: torch.device) -> torch.Tensor:
        mapped = self.checkpoints[ref].view(name)
        if device.type == "cpu":
            return mapped
        if self._stager is None:
            self._stager = Stager(largest_bytes(self.checkpoints.values()), pin=True)
        return self._stager.to_device(mapped, device)

    @property
    def resident_bytes(self) -> int:
        return 0

    def describe(self) -> str:
        files = sum(stored_bytes(c) for c in unique_files(self.checkpoints.values()).values())
        return (f"inputs memory-mapped in host memory: {len(self.checkpoints)} model(s), {files / GB:.2f} GB of "
                "files in the page cache, shared by the workers of this node")


class Stager:
    """Copies host tensors to a device through two reusable (pinned) buffers of ``nbytes``, taken in turn: a
    buffer is refilled only once the transfer out of it has finished."""

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.buffers = [torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self._done: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def to_device(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        turn, self._turn = self._turn, 1 - self._turn
        if self._done[turn] is not None:
            self._done[turn].synchronize()
        staged = self.buffers[turn][:tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        staged.copy_(tensor)
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        out.copy_(staged, non_blocking=True)
        if device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._done[turn] = event
        return out


def unique_files(checkpoints: Iterable[Checkpoint]) -> dict[tuple[str, ...], Checkpoint]:
    """The checkpoints whose tensors are distinct files (a LoRA input maps its base's: counted once)."""
    seen: dict[tuple[str, ...], Checkpoint] = {}
    for ckpt in checkpoints:
        seen.setdefault(tuple(sorted({str(i.file) for i in ckpt.tensors.values()})), ckpt)
    return seen


def stored_bytes(ckpt: Checkpoint) -> int:
    """A checkpoint's tensor bytes as stored."""
    return sum(math.prod(i.shape) * i.dtype.itemsize for i in ckpt.tensors.values())


def largest_bytes(checkpoints: Iterable[Checkpoint]) -> int:
    """The largest tensor's bytes as stored: what a staging buffer must hold."""
    return max((math.prod(i.shape) * i.dtype.itemsize for c in checkpoints for i in c.tensors.values()), default=0)


def scratch_bytes(checkpoints: Mapping[str, Checkpoint]) -> int:
    """The merge's working memory for its largest tensor: the base, every task vector and the output in float32,
    and the method's temporaries (masks, signs: about two more)."""
    largest = max((math.prod(i.shape) for c in checkpoints.values() for i in c.tensors.values()), default=0)
    return 4 * largest * (len(checkpoints) + 3)


def free_bytes(device: torch.device) -> int:
    """Memory a new allocation can take on ``device``: free GPU memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def place_inputs(requested: Placement, checkpoints: Mapping[str, Checkpoint], devices: Mapping[str, torch.device],
                 dtype: torch.dtype | None = None) -> InputStore:
    """The store for a worker whose live parameters sit on ``devices`` (tensor name -> device), checked against
    the free memory of each device now (the live model already loaded): ``device`` when asked for or, on
    ``auto``, when it fits on a GPU; else ``host``. SpecError naming the sizes when the placement cannot fit."""
    if requested not in PLACEMENTS:
        raise SpecError(f"inputs_on must be one of {', '.join(PLACEMENTS)}, got {requested!r}")
    on_gpu = any(d.type == "cuda" for d in devices.values())
    need = _device_need(checkpoints, devices, dtype)
    scratch = scratch_bytes(checkpoints)
    headroom = EVAL_HEADROOM if on_gpu else 0
    fits = {d: n + scratch + headroom <= free_bytes(d) for d, n in need.items()}
    if requested == "device" or (requested == "auto" and on_gpu and all(fits.values())):
        tight = next((d for d, ok in fits.items() if not ok), None)
        if tight is not None:
            raise SpecError(f"inputs_on device: {len(checkpoints)} model(s) need {need[tight] / GB:.2f} GB on {tight} "
                            f"+ {scratch / GB:.2f} GB merge scratch + {headroom / GB:.2f} GB for the evaluation, "
                            f"beside the live model; {tight} has {free_bytes(tight) / GB:.2f} GB free "
                            "(inputs_on: host keeps them memory-mapped in host memory)")
        return DeviceInputs(checkpoints, dtype)
    staged = largest_bytes(checkpoints.values()) * (len(checkpoints) + 1) if on_gpu else 0
    for device in need:
        if scratch + staged + headroom > free_bytes(device):
            raise SpecError(f"inputs_on host: merging the largest tensor needs {(scratch + staged) / GB:.2f} GB on "
                            f"{device} + {headroom / GB:.2f} GB for the evaluation, beside the live model; {device} "
                            f"has {free_bytes(device) / GB:.2f} GB free")
    return HostInputs(checkpoints)


def _device_need(checkpoints: Mapping[str, Checkpoint], devices: Mapping[str, torch.device],
                 dtype: torch.dtype | None) -> dict[torch.device, int]:
    """Bytes the inputs would take on each device if placed there (each tensor beside its parameter)."""
    need = dict.fromkeys(set(devices.values()), 0)
    for ckpt in checkpoints.values():
        for name, info in ckpt.tensors.items():
            if name in devices:
                kind = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
                need[devices[name]] += math.prod(info.shape) * kind.itemsize
    return need
