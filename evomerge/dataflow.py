"""Layer-path (data-flow) recipes: a model whose blocks are a sequence of blocks taken from the input models.

A path changes the architecture (the block count), so it lives beside ``merge.py`` rather than inside it: the
export streams the chosen blocks into a folder under their new positions; the live form swaps the worker's
block list for one that shares the pool's block parameters, so a candidate costs milliseconds and no copy of
the weights (only the output projections of scaled steps are new tensors).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from evomerge.checkpoint import Checkpoint, ShardedWriter, copy_side_files, layer_count_field, side_files
from evomerge.errors import SpecError
from evomerge.files import atomic_folder, atomic_write_text, check_output_folder
from evomerge.layout import layer_index
from evomerge.merge import DTYPE_NAMES, merge_to_folder, output_dtype
from evomerge.models import check_compatible, open_checkpoint
from evomerge.placement import place_inputs
from evomerge.recipes import OUTPUT_PROJECTIONS, Engine, PathRecipe, Placement, RecipeForm
from evomerge.refs import model_folders

# model types whose blocks add their OUTPUT_PROJECTIONS' results straight to the residual stream (checked against
# transformers' modeling code): scaling those weights scales what a block adds. Elsewhere a norm after them (Gemma2/3,
# OLMo2) cancels the scale, or the projections have other names (Phi, GPT-NeoX, OPT, Mixtral) and nothing is scaled.
SCALABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "smollm3", "gpt2")
# config lists that may happen to have one entry per block without being per-block settings
NOT_PER_LAYER = frozenset({"architectures", "bos_token_id", "eos_token_id", "pad_token_id", "bad_words_ids",
                           "suppress_tokens", "begin_suppress_tokens", "forced_decoder_ids"})


def write_recipe_folder(recipe: RecipeForm, out: Path, **kwargs: Any) -> Path:
    """Write any recipe as a model folder (``merge_to_folder``'s keyword arguments), by its engine's writer (a
    layer path changes the block count, so it has its own)."""
    return FOLDER_WRITERS[recipe.engine](recipe, out, **kwargs)


def check_scalable(ckpt: Checkpoint, where: str) -> None:
    """SpecError (prefixed by ``where``) unless a path step's ``scale`` acts on this model: its type is in
    ``SCALABLE_MODEL_TYPES`` and its blocks have output projections to scale. Otherwise the scale would
    silently do nothing, and a search would spend its trials on a dead knob."""
    text, _ = layer_count_field(ckpt.config)
    model_type = text.get("model_type", ckpt.config.get("model_type"))
    if model_type not in SCALABLE_MODEL_TYPES:
        raise SpecError(f"{where}: scale works only where blocks add their output projections straight to the "
                        f"residual stream (model types {', '.join(SCALABLE_MODEL_TYPES)}); {ckpt.path} is "
                        f"{model_type!r}")
    if not any(layer_index(n) is not None and any(p in n for p in OUTPUT_PROJECTIONS) for n in ckpt.tensors):
        raise SpecError(f"{where}: {ckpt.path} has no block tensors named {', '.join(OUTPUT_PROJECTIONS)} to scale")


def scaled_block_tensor(name: str, tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """A block tensor as a path step with ``scale`` uses it: output projections (weights and biases) scaled
    in float32 and rounded back, bit for bit what mergekit ``passthrough`` writes; any other tensor as is."""
    if scale == 1.0 or not any(p in name for p in OUTPUT_PROJECTIONS):
        return tensor
    work = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return (tensor.to(work) * scale).to(tensor.dtype)


def _block_pattern(layer_prefix: str) -> re.Pattern[str]:
    """Names of the block list's tensors: ``PREFIX<block>.<rest>`` (other numbered stacks are not blocks)."""
    return re.compile(rf"^{re.escape(layer_prefix)}(\d+)\.(.+)$")


def per_layer_keys(config: Mapping[str, Any], num_layers: int) -> list[str]:
    """Keys of a (text) config whose lists hold one entry per block (``layer_types``, SmolLM3's
    ``no_rope_layers``): a path must give each step its source block's entry, not its position's."""
    return [k for k, v in config.items() if isinstance(v, list) and len(v) == num_layers and k not in NOT_PER_LAYER]


def _step_entries(recipe: PathRecipe, key: str, default: list, configs: Mapping[str, Mapping[str, Any]],
                  num_layers: int) -> list:
    """A per-block config list for the path: each step's entry from its source model's (text) config, from
    ``default`` where that config lacks the list."""
    entries = []
    for step in recipe.path:
        values = configs[step.model].get(key)
        entries.append((values if isinstance(values, list) and len(values) == num_layers else default)[step.layer])
    return entries


def _uses(recipe: PathRecipe) -> dict[str, str]:
    """Where the recipe first names each model, for errors about that model."""
    where = {recipe.outer: "outer"}
    for i, step in enumerate(recipe.path):
        where.setdefault(step.model, f"path[{i}].model")
    return where


@contextlib.contextmanager
def _named(where: str) -> Iterator[None]:
    try:
        yield
    except SpecError as err:
        raise SpecError(f"{where}: {err}") from None


def _set_path_layers(config: dict[str, Any], ckpts: dict[str, Checkpoint], recipe: PathRecipe) -> None:
    """Give a config the path's block count and each step's entry of every per-block list."""
    text, key = layer_count_field(config)
    num_layers = ckpts[recipe.outer].num_layers
    configs = {ref: layer_count_field(ckpt.config)[0] for ref, ckpt in ckpts.items()}
    for name in per_layer_keys(text, num_layers):
        text[name] = _step_entries(recipe, name, text[name], configs, num_layers)
    text[key] = len(recipe.path)


def path_to_folder(recipe: PathRecipe, out: Path, *, force: bool = False, max_shard_bytes: int = 2 * 1024**3,
                   on_progress: Callable[[int, int], None] | None = None,
                   extra_files: dict[str, str] | None = None, protected: Sequence[Path] = ()) -> Path:
    """Stream a layer path to a Hugging Face folder, one tensor in memory at a time.

    Everything is checked before the first tensor is read (models open and agree, every step's block
    exists, the output folder as ``merge_to_folder`` checks it); the folder appears only when complete.
    """
    if max_shard_bytes < 1:
        raise SpecError(f"the shard size must be at least one byte, got {max_shard_bytes}")
    where = _uses(recipe)
    inputs: list[Path] = []
    for ref in recipe.model_refs:
        with _named(where[ref]):
            inputs += model_folders(ref)
    check_output_folder(out, force, protected=[*inputs, *protected])
    ckpts = {}
    for ref in recipe.model_refs:
        with _named(where[ref]):
            ckpts[ref] = open_checkpoint(ref)
    check_compatible(list(ckpts.values()))
    outer = ckpts[recipe.outer]
    side_files(outer.path)  # copied once every tensor is written: a file that cannot be read fails now
    recipe.check_layers(outer.num_layers)
    for i, step in enumerate(recipe.path):
        if step.scale != 1.0:
            check_scalable(ckpts[step.model], f"path[{i}].scale {step.scale:g}")
    prefix = outer.layer_prefix
    if not prefix:
        raise SpecError(f"outer: {recipe.outer} has no numbered blocks to take a layer path from")
    blocks = _block_pattern(prefix)
    names = list(outer.tensors)
    first_block = next((i for i, n in enumerate(names) if blocks.match(n)), len(names))
    # (output name, source checkpoint, source name, scale): outer's tensors before the blocks, the path, the rest
    plan: list[tuple[str, Checkpoint, str, float]] = [(n, outer, n, 1.0) for n in names[:first_block]]
    for i, step in enumerate(recipe.path):
        source = ckpts[step.model]
        for name in source.tensors:
            match = blocks.match(name)
            if match and int(match.group(1)) == step.layer:
                plan.append((f"{prefix}{i}.{match.group(2)}", source, name, step.scale))
    plan += [(n, outer, n, 1.0) for n in names[first_block:] if not blocks.match(n)]
    entries = [(n, src.tensors[s].shape, output_dtype(recipe, src.tensors[s].dtype)) for n, src, s, _ in plan]
    with atomic_folder(out) as tmp:
        writer = ShardedWriter(tmp, entries, max_shard_bytes)
        for done, ((name, source, source_name, scale), (_, _, dtype)) in enumerate(zip(plan, entries, strict=True)):
            # cast first, then scale: mergekit loads in the output dtype and scales there
            writer.write(name, scaled_block_tensor(name, source.read(source_name).to(dtype), scale))
            if on_progress:
                on_progress(done + 1, len(entries))
        writer.finish()
        float_dtype = next((d for _, _, d in entries if d.is_floating_point), torch.float32)
        copy_side_files(outer.path, tmp, float_dtype)
        config = json.loads((tmp / "config.json").read_text())
        _set_path_layers(config, ckpts, recipe)
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        atomic_write_text(tmp / "evomerge_recipe.yaml", recipe.to_yaml())
        atomic_write_text(tmp / recipe.mergekit_file, recipe.to_mergekit_yaml(DTYPE_NAMES.get(float_dtype)))
        for name, text in (extra_files or {}).items():
            atomic_write_text(tmp / name, text)
    return out


def _set_parameter(root: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, attr, param)


def _share(module: torch.nn.Module, keep: dict[int, object]) -> torch.nn.Module:
    """A copy of ``module``'s tree whose parameters, buffers and other attributes (config, hooks) are the
    source's own objects: attributes set on the copy (``layer_idx``, a replaced parameter) stay its own. A
    module with an instance-bound ``forward`` (accelerate's device hooks on a model spread over GPUs) is deep
    copied instead, sharing its tensors and ``keep`` (the config), so that the bound forward follows the copy."""
    if "forward" in vars(module):
        memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
        return copy.deepcopy(module, {**memo, **keep})
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {name: _share(child, keep) if child is not None else None
                      for name, child in module._modules.items()}
    return clone


class LivePath:
    """Makes a worker's live model compute layer paths over a pool of models, without copying weights.

    Built once per worker from the pool's headers (checked up front). The pool's tensors come from an
    :class:`~evomerge.placement.InputStore` in the live model's dtype: on the device (``inputs_on: device``), read
    lazily, once, when a path first takes a block or a model is first the outer; or memory-mapped in host memory
    (``host``), where a candidate holds only its own path's blocks (the mapped tensors themselves on a CPU when the
    dtypes agree, else copies that go with the next path). ``apply`` swaps the model's block list for one module per
    step that shares its pool block's parameters and points the tensors outside the blocks at ``outer``'s;
    ``restore`` puts back the model's own blocks, config values and Parameter objects (which the worker's
    LiveMerger writes weight merges into).
    """

    def __init__(self, model: torch.nn.Module, pool: list[str], inputs_on: Placement = "auto") -> None:
        self.model = model
        self.pool = list(dict.fromkeys(pool))
        self._ckpts = {ref: open_checkpoint(ref) for ref in self.pool}
        check_compatible(list(self._ckpts.values()))
        first = self._ckpts[self.pool[0]]
        self.num_layers = first.num_layers
        prefix = first.layer_prefix
        if not prefix:
            raise SpecError(f"{self.pool[0]} has no numbered blocks to take a layer path from")
        self._prefix = prefix
        self._blocks_owner, _, self._blocks_attr = prefix.rstrip(".").rpartition(".")
        self._own_blocks = model.get_submodule(prefix.rstrip("."))
        self.config = model.config.get_text_config()
        self._own_layers: int = self.config.num_hidden_layers
        self._own_lists = {k: getattr(self.config, k) for k in per_layer_keys(vars(self.config), self._own_layers)}
        self._configs = {ref: layer_count_field(ckpt.config)[0] for ref, ckpt in self._ckpts.items()}
        self._keep = {id(c): c for c in (model.config, self.config)}
        self._is_block = _block_pattern(prefix).match
        self._params = dict(model.named_parameters())
        missing = [n for n in self._params if n not in first.tensors]
        if missing:
            raise SpecError(f"parameter {missing[0]} of the live model is not in {self.pool[0]}")
        # every place a tensor outside the blocks sits (a tied head too), by the name the checkpoints use
        canonical = {id(p): n for n, p in self._params.items()}
        self._outer_slots = [(name, canonical[id(p)], p) for name, p in model.named_parameters(remove_duplicate=False)
                             if not self._is_block(name)]
        live_dtype = next((p.dtype for p in self._params.values() if p.is_floating_point()), None)
        self.inputs = place_inputs(inputs_on, self._ckpts, {n: p.device for n, p in self._params.items()}, live_dtype)
        self._outer: dict[str, dict[str, torch.nn.Parameter]] = {}  # filled lazily, per model
        self._blocks: dict[tuple[str, int], torch.nn.Module] = {}  # per (model, block number)
        self._applied = False

    def _load(self, ref: str, name: str) -> torch.nn.Parameter:
        like = self._params[name]
        return torch.nn.Parameter(self.inputs.get(ref, name, like.device).to(like.dtype), requires_grad=False)

    def _outer_of(self, ref: str) -> dict[str, torch.nn.Parameter]:
        if ref not in self._outer:
            self._outer[ref] = {n: self._load(ref, n) for n in self._params if not self._is_block(n)}
        return self._outer[ref]

    def _block(self, ref: str, j: int) -> torch.nn.Module:
        """Block ``j`` of model ``ref``: the live model's block structure over that model's tensors."""
        if (ref, j) not in self._blocks:
            own = self._own_blocks[j]
            block = _share(own, self._keep)
            for name, _ in own.named_parameters():
                _set_parameter(block, name, self._load(ref, f"{self._prefix}{j}.{name}"))
            self._blocks[ref, j] = block
        return self._blocks[ref, j]

    def _keep_only(self, recipe: PathRecipe) -> None:
        """Host placement: forget the blocks and outer tensors ``recipe`` does not use (copies, on a GPU)."""
        if self.inputs.placement != "host":
            return
        used = {(step.model, step.layer) for step in recipe.path}
        self._blocks = {key: block for key, block in self._blocks.items() if key in used}
        self._outer = {ref: tensors for ref, tensors in self._outer.items() if ref == recipe.outer}

    def _set_blocks(self, blocks: torch.nn.Module) -> None:
        owner = self.model.get_submodule(self._blocks_owner) if self._blocks_owner else self.model
        setattr(owner, self._blocks_attr, blocks)

    def _check(self, recipe: PathRecipe) -> None:
        if recipe.outer not in self._ckpts:
            raise SpecError(f"outer {recipe.outer} is not in this worker's pool ({', '.join(self.pool)})")
        for i, step in enumerate(recipe.path):
            if step.model not in self._ckpts:
                raise SpecError(f"path[{i}].model {step.model} is not in this worker's pool ({', '.join(self.pool)})")
        recipe.check_layers(self.num_layers)

    @torch.no_grad()
    def apply(self, recipe: PathRecipe) -> None:
        """Make the live model compute ``recipe``'s path (its models must be in the pool)."""
        self._check(recipe)
        self.restore()  # the previous path's scaled tensors go before the new path's are made
        self._keep_only(recipe)
        steps = []
        for i, step in enumerate(recipe.path):
            source = self._block(step.model, step.layer)
            block = _share(source, self._keep)
            if step.scale != 1.0:
                for name, param in source.named_parameters():
                    scaled = scaled_block_tensor(name, param, step.scale)
                    if scaled is not param:
                        _set_parameter(block, name, torch.nn.Parameter(scaled, requires_grad=False))
            for module in block.modules():  # the KV cache is indexed by position in the path
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = i
            steps.append(block)
        outer = self._outer_of(recipe.outer)
        self._set_blocks(torch.nn.ModuleList(steps))
        self.config.num_hidden_layers = len(recipe.path)
        for key, own in self._own_lists.items():
            setattr(self.config, key, _step_entries(recipe, key, own, self._configs, self.num_layers))
        for name, canonical, _ in self._outer_slots:
            _set_parameter(self.model, name, outer[canonical])
        self._applied = True

    def restore(self) -> None:
        """Put the model's own blocks, config values and parameters back (a no-op when no path is applied)."""
        if not self._applied:
            return
        self._set_blocks(self._own_blocks)
        self.config.num_hidden_layers = self._own_layers
        for key, own in self._own_lists.items():
            setattr(self.config, key, own)
        for name, _, original in self._outer_slots:
            _set_parameter(self.model, name, original)
        self._applied = False


FOLDER_WRITERS: dict[Engine, Callable[..., Path]] = {"weights": merge_to_folder, "path": path_to_folder}
