"""Where a tensor sits in the model, from its name alone: its transformer block, its relative depth, and a
model's block layout (the name prefix, the block count and the block tensors' names). A run folder records
the base's layout, so readers of a run (``evomerge report``) need neither torch nor the model folders."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from evomerge.checkpoint import Checkpoint


LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Transformer block number of a tensor name (``model.layers.3.mlp...`` -> 3), None outside blocks."""
    match = LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


def layer_position(name: str, num_layers: int) -> float:
    """Where a tensor sits for gradients: block i of n at i/(n-1); embeddings, norm and head at 0."""
    index = layer_index(name)
    if index is None or num_layers < 2:
        return 0.0
    return index / (num_layers - 1)


class LayerLayout(BaseModel):
    """How block tensors are named: ``prefix`` + index + ``.`` (e.g. ``model.layers.3.``), how many blocks there
    are, and the names of the tensors inside them (what per-layer reports resolve parameters for; empty in a
    layout built by hand for a space). Written into the run folder as ``layout.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prefix: str
    num_layers: int = Field(ge=0)
    block_tensors: tuple[str, ...] = ()

    @classmethod
    def of(cls, ckpt: Checkpoint) -> LayerLayout:
        prefix = ckpt.layer_prefix
        return cls(prefix=prefix, num_layers=ckpt.num_layers if prefix else 0,
                   block_tensors=tuple(name for name in ckpt.tensors if layer_index(name) is not None))
