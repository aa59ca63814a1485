"""Recipes: concrete merges, checked before any tensor is read.

A recipe uses mergekit's own keys (``merge_method``, ``base_model``, ``models``, ``parameters``,
``dtype``) so that a mergekit YAML with the features we support loads as it is, and ours can be written
back as a mergekit YAML. ``seed`` (for DARE/DELLA masks) is our only addition. A layer-wise recipe
(``groups``: a method per range of blocks) is written back as a ``mergekit-multi`` document; a layer path
(``path``: data-flow) as a ``passthrough`` of one-block slices.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from evomerge.errors import SpecError
from evomerge.layout import LayerLayout, layer_index
from evomerge.params import Filtered, Setting, resolve_params, setting_numbers
from evomerge.registry import MergeMethod, Param, get_method
from evomerge.yaml_io import STRICT, describe_error, load_yaml_model, read_yaml_mapping, validate_mapping

DType = Literal["float32", "float16", "bfloat16", "float64"]


# numpy's seed range (optuna's samplers seed a RandomState; DARE/DELLA masks derive torch generators from it)
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, strict=True)]


# where a live worker keeps the models it merges: on its device, memory-mapped in host memory, or chosen by fit
# (evomerge.placement)
Placement = Literal["auto", "device", "host"]


class ModelEntry(BaseModel):
    model_config = STRICT
    model: str
    parameters: dict[str, Setting] = {}


Engine = Literal["weights", "path"]  # what builds a recipe: arithmetic on the models' weights, or a layer path


PerLayer = dict[str, dict[str, list[float | None]]]  # {parameter: {model: its value per block}}


class RecipeForm(BaseModel, ABC):
    """The contract of every recipe form (one method, a method per layer group, a layer path), so that no caller
    asks which form it holds: the models it reads, the block count it fits, a label and a Markdown description,
    its YAML forms (ours, and mergekit's in the file ``mergekit_file``), its identity in a run, and ``engine``:
    which merge engine builds it (``evomerge.dataflow.FOLDER_WRITERS`` into a folder, ``Worker`` live)."""

    engine: ClassVar[Engine]
    mergekit_file: ClassVar[str]
    mergekit_command: ClassVar[str]
    # fields added after runs were recorded: left out of the identity while unset, so older runs keep their hashes
    added_later: ClassVar[tuple[str, ...]] = ()

    @property
    def output_dtype(self) -> str | None:
        """``out_dtype`` else ``dtype`` (fields of each form)."""
        return self.out_dtype or self.dtype

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)

    def identity(self) -> str:
        """The recipe's identity in its run (a duplicate reuses the score of the first)."""
        later = {name for name in self.added_later if getattr(self, name) is None} or None
        return hashlib.sha256(self.model_dump_json(exclude=later).encode()).hexdigest()[:16]

    @property
    @abstractmethod
    def model_refs(self) -> list[str]:
        """Every model the merge reads, the one it takes the tensors outside the blocks from first."""

    @property
    @abstractmethod
    def label(self) -> str:
        """A few words for a table row: the method (per group), or the path's length."""

    @abstractmethod
    def check_layers(self, num_layers: int) -> None:
        """SpecError unless the recipe fits models of ``num_layers`` blocks."""

    @abstractmethod
    def to_mergekit_yaml(self, out_dtype: DType | None = None, layer_prefix: str = "") -> str:
        """The same merge for mergekit (``out_dtype``: the one our merge wrote when the recipe names none;
        ``layer_prefix``: the blocks' tensor-name prefix, ``Checkpoint.layer_prefix``, where a form needs it)."""

    @abstractmethod
    def per_layer(self, layout: LayerLayout) -> PerLayer:
        """Each per-model parameter's value per block of ``layout`` (the mean over the block's tensors, as the
        merge resolves them; None where the block's method does not take it); empty for a form without any."""

    @abstractmethod
    def describe(self, layout: LayerLayout | None) -> list[str]:
        """Markdown lines for a report or a model card: what the merge does block by block, beyond its YAML
        (``layout``: the base's; None where it is not known)."""


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, then a blank line."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


class WeightRecipe(RecipeForm):
    """A merge by arithmetic on the models' weights: each block's tensors are merged by one single-method recipe
    (``part_for``). What the merge engine (``evomerge.merge``) reads."""

    engine: ClassVar[Engine] = "weights"

    @property
    @abstractmethod
    def parts(self) -> list[Recipe]:
        """Every single-method recipe it merges by, in group order."""

    @abstractmethod
    def part_for(self, layer: int | None) -> Recipe:
        """The recipe that merges block ``layer``'s tensors (None: a tensor outside the blocks)."""

    def layer_methods(self, num_layers: int) -> list[str]:
        """The merge method of each block (one name repeated, unless the recipe is layer-wise)."""
        return [self.part_for(layer).merge_method for layer in range(num_layers)]

    def per_layer(self, layout: LayerLayout) -> PerLayer:
        n = layout.num_layers
        sums: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        for name in layout.block_tensors:
            layer = layer_index(name)
            part = self.part_for(layer)
            for param, values in resolve_params(part, name, n).per_model.items():
                for entry, value in zip(part.inputs, values, strict=True):
                    sums[param][entry.model][layer].append(float(value))
        return {param: {model: [sum(layers[i]) / len(layers[i]) if i in layers else None for i in range(n)]
                        for model, layers in by_model.items()}
                for param, by_model in sums.items()}

    def describe(self, layout: LayerLayout | None) -> list[str]:
        """The method per block (when it varies) and each per-model parameter per block."""
        if layout is None:
            return ["(No per-layer tables: the base's block layout is not known.)", ""]
        blocks = [f"L{i}" for i in range(layout.num_layers)]
        methods = self.layer_methods(layout.num_layers)
        lines = ["Method per layer:", "", *_table(blocks, [methods])] if len(set(methods)) > 1 else []
        for param, by_model in self.per_layer(layout).items():
            rows = [[model, *("-" if v is None else f"{v:.3f}" for v in values)] for model, values in by_model.items()]
            lines += [f"`{param}` per layer (mean over the layer's tensors):", "", *_table(["model", *blocks], rows)]
        return lines


class Recipe(WeightRecipe):
    """One merge: which models, which method, which parameters (scalar, gradient or filtered)."""

    model_config = ConfigDict(**STRICT, populate_by_name=True)
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry]
    parameters: dict[str, Setting] = {}
    dtype: DType | None = None
    out_dtype: DType | None = None
    seed: Seed = 0
    tokenizer_source: str | None = None  # mergekit's: base, union or a model reference (evomerge.vocab)

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    @property
    def inputs(self) -> list[ModelEntry]:
        """The models merged besides the base (all of them for methods without a base)."""
        if self.method.base == "none":
            return self.models
        return [m for m in self.models if m.model != self.base_model]

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        method = self.method
        if method.base == "required" and not self.base_model:
            raise ValueError(f"method {method.name} needs a base_model")
        method.check_model_count(len(self.inputs))
        for name, setting in self.parameters.items():
            _check_setting(method, name, setting, method.parameters, "parameters")
        for i, entry in enumerate(self.models):
            for name, setting in entry.parameters.items():
                _check_setting(method, name, setting, method.per_model, f"models[{i}] ({entry.model})")
        check_tokenizer_source(self.tokenizer_source, self.base_model)
        return self

    mergekit_file: ClassVar[str] = "mergekit_config.yml"
    mergekit_command: ClassVar[str] = "mergekit-yaml mergekit_config.yml OUT"
    added_later: ClassVar[tuple[str, ...]] = ("tokenizer_source",)

    @property
    def label(self) -> str:
        return self.merge_method

    @property
    def parts(self) -> list[Recipe]:
        return [self]

    @property
    def reads_base(self) -> bool:
        """Whether the merge reads ``base_model`` (a method without a base, such as linear, does not)."""
        return self.base_model is not None and self.method.base != "none"

    @property
    def model_refs(self) -> list[str]:
        """Every model the merge reads, the base first."""
        return list(dict.fromkeys(([self.base_model] if self.reads_base else []) + [m.model for m in self.models]))

    def part_for(self, layer: int | None) -> Recipe:
        return self

    def check_layers(self, num_layers: int) -> None:
        """Every block count suits a single-method recipe."""

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        return load_yaml_model(cls, path)

    def to_mergekit_yaml(self, out_dtype: DType | None = None, layer_prefix: str = "") -> str:
        """The same merge for ``mergekit-yaml``: absolute paths, base listed, float32 arithmetic, and the
        output dtype (``out_dtype``: the one our merge wrote when the recipe names none)."""
        return yaml.safe_dump(self._mergekit_doc(self.output_dtype or out_dtype), sort_keys=False)

    def _mergekit_doc(self, out_dtype: DType | None) -> dict[str, Any]:
        # a method without a base (linear) merges only `models`: mergekit would want a weight for a listed base
        base = self.base_model if self.reads_base else None
        models = [{"model": _abs_path(m.model), **({"parameters": _plain(m.parameters)} if m.parameters else {})}
                  for m in self.models]
        if base and base not in [m.model for m in self.models]:
            models.append({"model": _abs_path(base)})
        doc: dict[str, Any] = {"merge_method": self.merge_method, "models": models}
        if base:
            doc["base_model"] = _abs_path(base)
        if self.parameters:
            doc["parameters"] = _plain(self.parameters)
        doc["dtype"] = "float32"
        if out_dtype:
            doc["out_dtype"] = out_dtype
        if self.tokenizer_source:
            doc["tokenizer_source"] = self._mergekit_tokenizer_source(base)
        return doc

    def _mergekit_tokenizer_source(self, base: str | None) -> str:
        """``tokenizer_source`` as mergekit reads it: without a ``base_model`` in its config (a method that
        does not read ours) mergekit's ``base`` would be any one of the models, so ours is named by path."""
        source = self.tokenizer_source
        if source == "union" or (source == "base" and base):
            return source
        return _abs_path(self.base_model if source == "base" else source)


class LayerGroup(BaseModel):
    """A range of blocks ``layers: [start, end)`` (mergekit's ``layer_range``) merged by its own method."""

    model_config = STRICT
    layers: tuple[NonNegativeInt, NonNegativeInt]
    merge_method: str
    models: list[ModelEntry]
    parameters: dict[str, Setting] = {}


class LayerwiseRecipe(WeightRecipe):
    """A merge with a method per layer group. Each tensor of a block is merged exactly as the single-method
    recipe of its group would merge it; the tensors outside the blocks (embeddings, final norm, head)
    follow group ``outer``. Parameter gradients keep their whole-model layer positions."""

    model_config = STRICT
    base_model: str | None = None
    groups: list[LayerGroup] = Field(min_length=1)
    outer: NonNegativeInt = 0
    dtype: DType | None = None
    out_dtype: DType | None = None
    seed: Seed = 0
    _parts: list[Recipe] = PrivateAttr()

    mergekit_file: ClassVar[str] = "mergekit_multi.yml"
    mergekit_command: ClassVar[str] = ("mergekit-multi mergekit_multi.yml --intermediate-dir /ABSOLUTE/WORK/DIR "
                                       "--out-path OUT")

    @model_validator(mode="after")
    def _check(self) -> LayerwiseRecipe:
        end = 0
        for i, group in enumerate(self.groups):
            start, stop = group.layers
            if start != end:
                gap = f"block {end}" if start == end + 1 else f"blocks {end}-{start - 1}"
                what = "overlaps the group before" if start < end else f"leaves {gap} to no group"
                raise ValueError(f"groups[{i}].layers {[start, stop]} {what} (groups must cover the blocks in order)")
            if stop <= start:
                raise ValueError(f"groups[{i}].layers {[start, stop]} is empty (start must be below end)")
            end = stop
        if self.outer >= len(self.groups):
            raise ValueError(f"outer {self.outer} names no group (there are {len(self.groups)})")
        parts = []
        for i, group in enumerate(self.groups):
            try:
                parts.append(Recipe(merge_method=group.merge_method, base_model=self.base_model, models=group.models,
                                    parameters=group.parameters, dtype=self.dtype, out_dtype=self.out_dtype,
                                    seed=self.seed))
            except ValidationError as err:
                raise ValueError(f"groups[{i}]: {describe_error(err)}") from None
            except SpecError as err:
                raise ValueError(f"groups[{i}]: {err}") from None
        self._parts = parts
        return self

    @property
    def label(self) -> str:
        return "/".join(group.merge_method for group in self.groups)

    @property
    def parts(self) -> list[Recipe]:
        """One single-method recipe per group, in group order."""
        return self._parts

    @property
    def model_refs(self) -> list[str]:
        return list(dict.fromkeys(ref for part in self._parts for ref in part.model_refs))

    def part_for(self, layer: int | None) -> Recipe:
        if layer is None:
            return self._parts[self.outer]
        for group, part in zip(self.groups, self._parts, strict=True):
            if group.layers[0] <= layer < group.layers[1]:
                return part
        raise SpecError(f"block {layer} is in no layer group (the groups end at block {self.groups[-1].layers[1] - 1})")

    def check_layers(self, num_layers: int) -> None:
        """The groups must end at the model's last block."""
        end = self.groups[-1].layers[1]
        if end != num_layers:
            blocks = f"{num_layers} blocks (0-{num_layers - 1})" if num_layers else "no blocks"
            raise SpecError(f"the layer groups cover blocks 0-{end - 1}, but the model has {blocks}")

    def to_mergekit_yaml(self, out_dtype: DType | None = None, layer_prefix: str = "") -> str:
        """A ``mergekit-multi`` document: one float32 intermediate merge per group (``evomerge-group-I``),
        then a ``linear`` merge that takes every tensor from its group's intermediate with weight 1 (and 0
        from the others), which mergekit computes exactly. ``layer_prefix`` names the blocks' tensors
        (``Checkpoint.layer_prefix``, e.g. ``model.layers.``): required."""
        if not layer_prefix:
            raise SpecError("a layer-wise recipe's mergekit document needs the model's block name prefix")
        docs: list[dict[str, Any]] = []
        for i, part in enumerate(self._parts):
            docs.append({"name": f"evomerge-group-{i}", **part._mergekit_doc("float32")})
        picks = []
        for i, group in enumerate(self.groups):  # every block named in every list: the last entry is the outer's
            weight = [{"filter": f"{layer_prefix}{layer}.", "value": float(group.layers[0] <= layer < group.layers[1])}
                      for layer in range(self.groups[-1].layers[1])]
            picks.append({"model": f"evomerge-group-{i}",
                          "parameters": {"weight": [*weight, {"value": float(i == self.outer)}]}})
        final: dict[str, Any] = {"merge_method": "linear", "models": picks, "parameters": {"normalize": True},
                                 "dtype": "float32"}
        if self.output_dtype or out_dtype:
            final["out_dtype"] = self.output_dtype or out_dtype
        return yaml.safe_dump_all([*docs, final], sort_keys=False)


MAX_PATH_LENGTH = 1024  # blocks in a layer path


OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "c_proj")  # a block's residual-branch outputs (Llama family, GPT-2)


class PathStep(BaseModel):
    """One block of a layer path: block ``layer`` of ``model``, its residual branches scaled by ``scale``."""

    model_config = STRICT
    model: str
    layer: NonNegativeInt
    scale: float = Field(1.0, gt=0.0, le=4.0)


class PathRecipe(RecipeForm):
    """A data-flow merge: the output's blocks are ``path``, each copied from a block of one input model, in
    order (repeats allowed); embeddings, final norm and head come from ``outer``. ``scale`` multiplies the
    block's output projections (``OUTPUT_PROJECTIONS``: weights and biases), i.e. what the block adds to the
    residual stream, so it survives export as plain weights (mergekit ``passthrough``'s ``scale``)."""

    model_config = STRICT
    path: list[PathStep] = Field(min_length=1, max_length=MAX_PATH_LENGTH)
    outer: str
    dtype: DType | None = None
    out_dtype: DType | None = None

    engine: ClassVar[Engine] = "path"
    mergekit_file: ClassVar[str] = "mergekit_config.yml"
    mergekit_command: ClassVar[str] = "mergekit-yaml mergekit_config.yml OUT"

    @property
    def label(self) -> str:
        return f"path of {len(self.path)} blocks"

    @property
    def model_refs(self) -> list[str]:
        """Every model the path reads, ``outer`` first."""
        return list(dict.fromkeys([self.outer, *(step.model for step in self.path)]))

    def check_layers(self, num_layers: int) -> None:
        """Every step must name a block the models have."""
        for i, step in enumerate(self.path):
            if step.layer >= num_layers:
                blocks = f"{num_layers} blocks (0-{num_layers - 1})" if num_layers else "no blocks"
                raise SpecError(f"path[{i}].layer {step.layer} does not exist: {step.model} has {blocks}")

    def per_layer(self, layout: LayerLayout) -> PerLayer:
        """A path copies blocks: it has no per-model parameters."""
        return {}

    def describe(self, layout: LayerLayout | None) -> list[str]:
        """The path's blocks in order (its own: no layout needed)."""
        rows = [[str(i), step.model, str(step.layer), f"{step.scale:g}"] for i, step in enumerate(self.path)]
        return [f"Layer path ({len(self.path)} blocks; embeddings, final norm and head from {self.outer}):", "",
                *_table(["block", "model", "source block", "scale"], rows)]

    def to_mergekit_yaml(self, out_dtype: DType | None = None, layer_prefix: str = "") -> str:
        """A ``passthrough`` of one-block slices (named by block range: no ``layer_prefix`` needed). mergekit
        takes the embeddings from the first slice's model and the final norm and head from the last one's, so
        empty slices of ``outer`` open and close the list."""
        outer = _abs_path(self.outer)
        slices: list[dict[str, Any]] = [{"sources": [{"model": outer, "layer_range": [0, 0]}]}]
        for step in self.path:
            source: dict[str, Any] = {"model": _abs_path(step.model), "layer_range": [step.layer, step.layer + 1]}
            if step.scale != 1.0:
                source["parameters"] = {"scale": [*({"filter": name, "value": step.scale}
                                                    for name in OUTPUT_PROJECTIONS), {"value": 1.0}]}
            slices.append({"sources": [source]})
        slices.append({"sources": [{"model": outer, "layer_range": [0, 0]}]})
        doc: dict[str, Any] = {"slices": slices, "merge_method": "passthrough"}
        if self.output_dtype or out_dtype:
            doc["dtype"] = self.output_dtype or out_dtype
        return yaml.safe_dump(doc, sort_keys=False)


def _recipe_class(data: dict[str, Any]) -> type[RecipeForm]:
    """A recipe mapping is layer-wise when it has ``groups``, a layer path when it has ``path``."""
    return LayerwiseRecipe if "groups" in data else PathRecipe if "path" in data else Recipe


def parse_recipe(data: dict[str, Any]) -> RecipeForm:
    """A recipe mapping as stored (a trial's attribute, a summary) or written by a user."""
    return _recipe_class(data).model_validate(data)


def recipe_from_yaml(path: str | Path) -> RecipeForm:
    """A recipe file of either form, with the same one-line errors as any YAML we read."""
    data = read_yaml_mapping(Path(path))
    return validate_mapping(_recipe_class(data), data, Path(path))


def _abs_path(ref: str) -> str:
    """A reference mergekit resolves anywhere: an absolute folder, or a Hub id pinned to the cached commit;
    ``BASE+ADAPTER`` keeps its form (mergekit applies the LoRA itself, given ``--lora-merge-cache``)."""
    from evomerge.refs import hub_id_of, resolve_model_path, split_adapter_ref

    adapted = split_adapter_ref(ref)
    if adapted is not None:
        return f"{_abs_path(adapted[0])}+{_abs_path(adapted[1])}"
    folder = resolve_model_path(ref)
    hub_id = hub_id_of(ref)
    return str(folder.resolve()) if hub_id is None else f"{hub_id[0]}@{folder.name}"  # snapshots: named by commit


def _plain(params: dict[str, Setting]) -> dict[str, Any]:
    return {k: [v.model_dump(exclude_none=True) if isinstance(v, Filtered) else v for v in s]
            if isinstance(s, list) else s for k, s in params.items()}


def check_tokenizer_source(source: str | None, base_model: str | None) -> None:
    """mergekit's values: ``base`` (which needs a base_model), ``union`` or a model reference, named as the
    recipe names models (mergekit has no ``model:`` prefix: it would look for a folder of that name)."""
    if source is None:
        return
    if not source.strip():
        raise ValueError("tokenizer_source must be base, union or a model (a folder or Hub id)")
    if source.startswith("model:"):
        raise ValueError(f"tokenizer_source {source!r}: name the model itself, as mergekit does "
                         f"({source.removeprefix('model:')!r}, without 'model:')")
    if source == "base" and not base_model:
        raise ValueError("tokenizer_source base needs a base_model")


def _check_setting(method: MergeMethod, name: str, setting: Setting, allowed: dict[str, Param], where: str) -> None:
    if name not in allowed:
        raise ValueError(f"{where}: {method.name} has no parameter {name!r}; it takes "
                         f"{', '.join(sorted(allowed)) or 'none'}")
    for value in setting_numbers(setting):
        check_value(allowed[name], name, value, where)


def check_value(param: Param, name: str, value: float | bool, where: str) -> None:
    """``Param.check`` inside a pydantic validator, which reports ValueErrors with their location."""
    try:
        param.check(name, value, where)
    except SpecError as err:
        raise ValueError(str(err)) from None
