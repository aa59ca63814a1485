"""Applying a recipe: per-tensor parameters, then either a streaming merge from files to a folder or an
in-place merge into a live model (the search's hot path: nothing reloaded, nothing written). A layer-wise
recipe merges each tensor by the single-method recipe of its block's group (``WeightRecipe.part_for``)."""

from __future__ import annotations

import math
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.checkpoint import Checkpoint, ShardedWriter, TensorInfo, copy_side_files, side_files
from evomerge.errors import SpecError
from evomerge.files import atomic_folder, atomic_write_text, check_output_folder
from evomerge.layout import layer_index
from evomerge.models import check_compatible, open_checkpoint
from evomerge.params import TensorParams, check_resolved, resolve_params
from evomerge.placement import place_inputs
from evomerge.recipes import Placement, Recipe, RecipeForm, WeightRecipe
from evomerge.refs import hub_id_of, model_folders, named_models
from evomerge.registry import MergeMethod
from evomerge.vocab import VocabPlan, align_inputs, is_vocab_tensor, plan_vocab, source_model, write_vocab

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def tensor_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator seeded by (recipe seed, tensor name): the same masks in any order, on any path."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return gen


def merge_tensor(method: MergeMethod, params: TensorParams, base: torch.Tensor | None,
                 inputs: list[torch.Tensor], *, deltas: list[torch.Tensor] | None = None,
                 generator: torch.Generator | None = None, stacked: torch.Tensor | None = None) -> torch.Tensor:
    """Merge one tensor in float32 (float64 stays float64). ``deltas`` may be passed precomputed, or
    ``stacked``: the deltas as the rows of one work-dtype tensor the merge may overwrite."""
    work = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    kwargs: dict = {("lambda_" if k == "lambda" else k): v for k, v in params.shared.items()}
    kwargs.update(params.per_model)
    if method.seeded:
        kwargs["generator"] = generator
    base_w = base.to(work) if base is not None else None
    if method.uses_deltas and base_w is not None:
        if method.stacks:
            if stacked is None:
                stacked = stack_deltas(base_w, inputs if deltas is None else deltas, subtract=deltas is None)
            # base + merged delta, added in place: IEEE addition commutes, so the bits are base_w + merged's
            return method.fn(base_w, list(stacked), stacked=stacked, **kwargs).add_(base_w)
        if deltas is None:
            deltas = [x.to(work) - base_w for x in inputs] if stacked is None else list(stacked)
        return base_w + method.fn(base_w, deltas, **kwargs)
    return method.fn(base_w, [x.to(work) for x in inputs], **kwargs)


def stack_deltas(base_w: torch.Tensor, tensors: Sequence[torch.Tensor], *, subtract: bool) -> torch.Tensor:
    """One ``(n, *shape)`` tensor in ``base_w``'s dtype whose rows are ``x - base_w`` (exactly
    ``x.to(work) - base_w``: the widening is exact), or copies of already computed deltas."""
    stacked = torch.empty((len(tensors), *base_w.shape), dtype=base_w.dtype, device=base_w.device)
    for row, x in zip(stacked, tensors, strict=True):
        row.copy_(x)
        if subtract:
            row.sub_(base_w)  # a third faster than a mixed-dtype sub into ``row``
    return stacked


@dataclass
class MergeInputs:
    """The opened, mutually compatible checkpoints of a recipe, by model reference, and the output vocabulary
    when the recipe has a ``tokenizer_source``."""

    recipe: WeightRecipe
    base: Checkpoint | None
    inputs: dict[str, Checkpoint]
    vocab: VocabPlan | None = None

    @property
    def reference(self) -> Checkpoint:
        return self.base or next(iter(self.inputs.values()))

    @property
    def names(self) -> list[str]:
        return list(self.reference.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in the output: a vocabulary tensor has a row per token of the output vocabulary."""
        shape = self.reference.tensors[name].shape
        return (self.vocab.size, *shape[1:]) if self.vocab and is_vocab_tensor(name) else shape

    def read_by(self, part: Recipe) -> tuple[Checkpoint | None, list[Checkpoint]]:
        """The checkpoints ``part`` reads: its base (None when its method reads none) and its inputs, in order."""
        return (self.base if part.reads_base else None), [self.inputs[m.model] for m in part.inputs]


def tokenizer_source(recipe: WeightRecipe) -> str | None:
    """The recipe's ``tokenizer_source`` (a layer-wise recipe's groups have none)."""
    return recipe.parts[0].tokenizer_source


def open_inputs(recipe: WeightRecipe) -> MergeInputs:
    """Open every model of a recipe and check them against each other, and plan the output vocabulary; reads
    headers and tokenizers only."""
    base = open_checkpoint(recipe.base_model) if any(p.reads_base for p in recipe.parts) else None
    refs = dict.fromkeys(m.model for part in recipe.parts for m in part.inputs)
    inputs = {ref: open_checkpoint(ref) for ref in refs}
    source = tokenizer_source(recipe)
    check_compatible(([base] if base else []) + list(inputs.values()), aligned_vocab=source is not None)
    merged = MergeInputs(recipe, base, inputs)
    if source is not None:  # the union starts with the base's tokenizer when the merge reads the base
        opened = {**({recipe.base_model: base} if base else {}), **inputs}
        merged.vocab = plan_vocab(source, {ref: opened[ref] for ref in recipe.model_refs}, recipe.base_model)
    recipe.check_layers(merged.reference.num_layers)
    check_resolved(recipe, merged.names, merged.reference.num_layers)
    return merged


def output_dtype(recipe: WeightRecipe | RecipeForm, source: torch.dtype) -> torch.dtype:
    """The recipe's dtype for floating tensors; other tensors keep theirs."""
    if not source.is_floating_point or recipe.output_dtype is None:
        return source
    return DTYPES[recipe.output_dtype]


def _read_tensor(opened: MergeInputs, part: Recipe, name: str) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The base's (None when ``part`` reads none) and every input's copy of one tensor, read from the files."""
    base, models = opened.read_by(part)
    return (base.read(name) if base else None), [m.read(name) for m in models]


def _merged_inputs(method: MergeMethod, params: TensorParams, base: torch.Tensor | None, inputs: list[torch.Tensor],
                   generator: torch.Generator | None) -> torch.Tensor:
    """``merge_tensor`` on tensors read for this merge alone: the inputs are dropped as soon as they are turned
    into task vectors, so at most one float32 stack of them is alive."""
    if method.uses_deltas and method.stacks and base is not None:
        work = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
        base_w = base.to(work)
        stacked = stack_deltas(base_w, inputs, subtract=True)
        first = inputs[0][:0]  # keeps the dtype, not the data
        inputs.clear()
        return merge_tensor(method, params, base_w, [first], generator=generator, stacked=stacked)
    return merge_tensor(method, params, base, inputs, generator=generator)


def merged_tensor(part: Recipe, name: str, num_layers: int, base: torch.Tensor | None, inputs: list[torch.Tensor],
                  vocab: VocabPlan | None) -> torch.Tensor:
    """One tensor of ``part``'s merge from the base's and the inputs' copies as stored (the list is consumed): a
    vocabulary tensor laid out in the output vocabulary first; a tensor that is not floating point is the base's
    (else the first input's). The one per-tensor merge of the streamed merge and of the live merger."""
    if vocab is not None and is_vocab_tensor(name):
        base, inputs = align_inputs(vocab, part, base, inputs)
    if not inputs[0].is_floating_point():
        return base if base is not None else inputs[0]
    method = part.method
    gen = tensor_generator(part.seed, name, inputs[0].device) if method.seeded else None
    return _merged_inputs(method, resolve_params(part, name, num_layers), base, inputs, gen)


# an elementwise merge of a larger tensor runs slice by slice: its scratch stays in cache and is reused
SLICE = 1 << 18


def merges_in_slices(part: Recipe, info: TensorInfo, aligned: bool) -> bool:
    """Whether ``part`` may merge the tensor slice by slice (bit for bit the whole-tensor merge): an elementwise
    method, more than one slice of floating-point data, no vocabulary to align."""
    return part.method.elementwise and info.dtype.is_floating_point and math.prod(info.shape) > SLICE and not aligned


def merge_slices(part: Recipe, name: str, num_layers: int, bases: Iterator[torch.Tensor] | None,
                 inputs: list[Iterator[torch.Tensor]], out: torch.Tensor) -> None:
    """Write an elementwise merge into the flat ``out`` (cast to its dtype) from consecutive ``SLICE``-entry
    slices of the base (None when ``part`` reads none) and of each input."""
    params = resolve_params(part, name, num_layers)
    for start, *slices in zip(range(0, out.numel(), SLICE), *inputs, strict=True):
        merged = _merged_inputs(part.method, params, next(bases) if bases else None, slices, None)
        out[start:start + merged.numel()] = merged


def _aligned(opened: MergeInputs | LiveMerger, name: str) -> bool:
    """Whether a tensor is laid out in the output vocabulary per recipe (a ``tokenizer_source`` merge)."""
    return opened.vocab is not None and is_vocab_tensor(name)


def _streamed_tensor(opened: MergeInputs, name: str, num_layers: int, dtype: torch.dtype) -> torch.Tensor:
    """One merged tensor read from the files, in the output ``dtype``; sliced where the inputs are read as stored
    (no LoRA to apply), each slice read in turn from one open file per input."""
    part = opened.recipe.part_for(layer_index(name))
    base, models = opened.read_by(part)
    if merges_in_slices(part, opened.reference.tensors[name], _aligned(opened, name)) and all(
            m.stored(name) for m in [*models, *([base] if base else [])]):
        out = torch.empty(opened.shape(name), dtype=dtype)
        merge_slices(part, name, num_layers, base.read_slices(name, SLICE) if base else None,
                     [m.read_slices(name, SLICE) for m in models], out.view(-1))
        return out
    base_t, inputs = _read_tensor(opened, part, name)
    return merged_tensor(part, name, num_layers, base_t, inputs, opened.vocab).to(dtype)


def merge_to_folder(recipe: WeightRecipe, out: Path, *, force: bool = False, max_shard_bytes: int = 2 * 1024**3,
                    on_progress: Callable[[int, int], None] | None = None,
                    extra_files: dict[str, str] | None = None, protected: Sequence[Path] = ()) -> Path:
    """Stream a merge from checkpoint files to a Hugging Face folder, a few tensors in memory at a time.

    Everything is validated before the first tensor is read; the folder appears only when complete. The
    input model folders and ``protected`` (e.g. the run folder an export reads) are never touched: ``out``
    may not be, contain or lie inside any of them, ``force`` or not.
    """
    if max_shard_bytes < 1:
        raise SpecError(f"the shard size must be at least one byte, got {max_shard_bytes}")
    # a base the method does not read is still the user's folder (but not worth a Hub lookup); a LoRA input
    # protects both its base and its adapter folder
    unread = [r for r in named_models(recipe.base_model or "") if r and hub_id_of(r) is None]
    source = tokenizer_source(recipe)
    named = source_model(source, recipe.base_model) if source else None  # its tokenizer is read
    inputs = [folder for ref in [*recipe.model_refs, *unread, *([named] if named else [])]
              for folder in model_folders(ref)]
    check_output_folder(out, force, protected=[*inputs, *protected])
    opened = open_inputs(recipe)
    ref = opened.reference
    side_files(ref.path)  # copied once every tensor is written: a file that cannot be read fails now
    num_layers = ref.num_layers
    entries = [(n, opened.shape(n), output_dtype(recipe, ref.tensors[n].dtype)) for n in opened.names]
    with atomic_folder(out) as tmp:
        writer = ShardedWriter(tmp, entries, max_shard_bytes)
        # two tensors merge at once (each reads its own inputs, so reading overlaps compute), unless
        # together they hold more elements than the largest tensor does alone: memory stays near the
        # sequential peak; outputs are written in order
        largest = max((math.prod(shape) for _, shape, _ in entries), default=0)
        flight: deque[tuple[str, torch.dtype, int, Future]] = deque()
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="evomerge-merge") as pool:
            todo = iter(entries)
            following = next(todo, None)
            done = 0
            while following is not None or flight:
                while following is not None and (not flight or (
                        len(flight) < 2 and sum(f[2] for f in flight) + math.prod(following[1]) <= largest)):
                    name, shape, dtype = following
                    flight.append((name, dtype, math.prod(shape),
                                   pool.submit(_streamed_tensor, opened, name, num_layers, dtype)))
                    following = next(todo, None)
                name, dtype, _, future = flight.popleft()
                try:
                    merged = future.result()
                except BaseException:
                    for *_, other in flight:
                        other.cancel()
                    raise
                writer.write(name, merged)  # freed once written
                del merged, future
                done += 1
                if on_progress:
                    on_progress(done, len(entries))
        writer.finish()
        float_dtype = next((d for _, _, d in entries if d.is_floating_point), torch.float32)
        copy_side_files(ref.path, tmp, float_dtype)
        if opened.vocab is not None:
            write_vocab(opened.vocab, tmp)
        atomic_write_text(tmp / "evomerge_recipe.yaml", recipe.to_yaml())
        atomic_write_text(tmp / recipe.mergekit_file,
                          recipe.to_mergekit_yaml(DTYPE_NAMES.get(float_dtype), ref.layer_prefix))
        for name, text in (extra_files or {}).items():
            atomic_write_text(tmp / name, text)
    return out


class LiveMerger:
    """Writes each recipe's merge into the live model's parameters in place, reading its inputs tensor by tensor
    from an :class:`~evomerge.placement.InputStore` (on the device as stored, or memory-mapped in host memory) and
    widening only the tensor being merged: its memory is the live model plus the scratch of one tensor's merge,
    whatever the number of models. Built once per worker; ``apply`` is the per-candidate cost, and gives the very
    bits ``merge_to_folder`` writes for the recipe.

    With ``tokenizer_source`` the live model is resized to the output vocabulary (``vocab``) of a recipe that
    merges the base and all the models, and each recipe's vocabulary tensors are laid out as the streamed merge
    lays them out (the rows a model lacks depend on which models the recipe merges)."""

    def __init__(self, model: torch.nn.Module, base: str, models: list[str], tokenizer_source: str | None = None,
                 inputs_on: Placement = "auto") -> None:
        self.model = model
        self.base_ref = base
        self.model_refs = models
        self.tokenizer_source = tokenizer_source
        ckpts = [open_checkpoint(base)] + [open_checkpoint(m) for m in models]
        check_compatible(ckpts, aligned_vocab=tokenizer_source is not None)
        self.num_layers = ckpts[0].num_layers
        self.checkpoints = dict(zip([base, *models], ckpts, strict=True))
        self.vocab = plan_vocab(tokenizer_source, self.checkpoints, base) if tokenizer_source else None
        if self.vocab is not None:  # apply overwrites every row
            model.resize_token_embeddings(self.vocab.size, mean_resizing=False)
        self._same_vocab = {tuple(self.checkpoints): True}  # model lists whose recipes give the live vocabulary
        self.params = dict(model.named_parameters())
        missing = [n for n in ckpts[0].tensors if n not in self.params]
        if missing:
            raise SpecError(f"tensor {missing[0]} of {base} is not a parameter of the live model")
        self.names = list(ckpts[0].tensors)
        self.layers = {n: layer_index(n) for n in self.names}
        # each tensor beside its parameter: a model spread over several GPUs merges where it lives
        self.inputs = place_inputs(inputs_on, self.checkpoints, {n: self.params[n].device for n in self.names})

    def _check_vocab(self, part: Recipe) -> None:
        """A recipe must give the live model's vocabulary: the same ``tokenizer_source`` and the same tokens at the
        same ids (a union depends on the models merged; checked once per model list)."""
        if part.tokenizer_source != self.tokenizer_source:
            raise SpecError(f"recipe has tokenizer_source {part.tokenizer_source!r}, this merger was built with "
                            f"{self.tokenizer_source!r}")
        if self.vocab is None:
            return
        refs = tuple(part.model_refs)
        if refs not in self._same_vocab:
            plan = plan_vocab(self.tokenizer_source, {r: self.checkpoints[r] for r in refs}, part.base_model)
            self._same_vocab[refs] = plan.tokenizer.get_vocab() == self.vocab.tokenizer.get_vocab()
        if not self._same_vocab[refs]:
            raise SpecError(f"a recipe over {', '.join(refs)} gives another output vocabulary than the live model's "
                            f"(over {', '.join(self.checkpoints)}); merge it to a folder instead")

    @torch.no_grad()
    def apply(self, recipe: WeightRecipe) -> None:
        """Overwrite the live parameters with ``recipe``'s merge (its models must be among ours)."""
        recipe.check_layers(self.num_layers)
        for part in recipe.parts:
            unknown = [m.model for m in part.inputs if m.model not in self.model_refs]
            if unknown or (part.reads_base and part.base_model != self.base_ref):
                raise SpecError(f"recipe uses models this merger was not built with: {unknown or part.base_model}")
            self._check_vocab(part)
        info = self.checkpoints[self.base_ref].tensors
        for name in self.names:
            part = recipe.part_for(self.layers[name])
            param = self.params[name]
            base = self.inputs.get(self.base_ref, name, param.device) if part.reads_base else None
            inputs = [self.inputs.get(m.model, name, param.device) for m in part.inputs]
            if merges_in_slices(part, info[name], _aligned(self, name)) and param.is_contiguous():
                merge_slices(part, name, self.num_layers, _slices(base) if base is not None else None,
                             [_slices(x) for x in inputs], param.view(-1))
            else:
                param.copy_(merged_tensor(part, name, self.num_layers, base, inputs, self.vocab))


def _slices(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """A tensor's flattened data as consecutive ``SLICE``-entry views (the last may be shorter)."""
    return iter(tensor.reshape(-1).split(SLICE))
