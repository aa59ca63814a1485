"""Recipes: concrete merges, checked before any tensor is read.

A recipe uses mergekit's own keys (``merge_method``, ``base_model``, ``models``, ``parameters``,
``dtype``) so that a mergekit YAML with the features we support loads as it is, and ours can be written
back as a mergekit YAML. ``seed`` (for DARE/DELLA masks) is our only addition. A layer-wise recipe
(``groups``: a method per range of blocks) is written back as a ``mergekit-multi`` document; a layer path
(``path``: data-flow) as a ``passthrough`` of one-block slices.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Protocol

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
from evomerge.registry import MergeMethod, Param, get_method
from evomerge.yaml_io import describe_error, load_yaml_model, read_yaml_mapping, validate_mapping

STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)  # unknown keys, NaN and infinities are errors


Scalar = bool | float


Gradient = Annotated[list[float], Field(min_length=1)]


class Filtered(BaseModel):
    """A value that applies to tensors whose name contains ``filter`` (no filter: every tensor)."""

    model_config = STRICT
    filter: str | None = None
    value: Scalar | Gradient


Setting = Scalar | Gradient | Annotated[list[Filtered], Field(min_length=1)]


DType = Literal["float32", "float16", "bfloat16", "float64"]


# numpy's seed range (optuna's samplers seed a RandomState; DARE/DELLA masks derive torch generators from it)
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, strict=True)]


# where a live worker keeps the models it merges: on its device, memory-mapped in host memory, or chosen by fit
# (evomerge.placement)
Placement = Literal["auto", "device", "host"]


def setting_numbers(setting: Setting) -> list[float | bool]:
    """Every literal value a setting holds (interpolation never leaves their range)."""
    if isinstance(setting, list):
        out: list[float | bool] = []
        for item in setting:
            out.extend(setting_numbers(item.value) if isinstance(item, Filtered) else [item])
        return out
    return [setting]


def resolve_setting(setting: Setting, tensor_name: str, t: float) -> float | bool | None:
    """The value for one tensor: scalar as is; gradient interpolated at layer position ``t`` in
    [0, 1]; filtered list: the first entry whose filter is in the name (None when none matches)."""
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if isinstance(setting[0], Filtered):
        for item in setting:
            if item.filter in (None, "*") or item.filter in tensor_name:
                return resolve_setting(item.value, tensor_name, t)
        return None
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


class ModelEntry(BaseModel):
    model_config = STRICT
    model: str
    parameters: dict[str, Setting] = {}


class _RecipeForms(BaseModel):
    """What both recipe forms share: the output dtype they settle and their YAML (the fields they hold)."""

    @property
    def output_dtype(self) -> str | None:
        """``out_dtype`` else ``dtype`` (fields of each form)."""
        return self.out_dtype or self.dtype

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


class Recipe(_RecipeForms):
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

    # ------------------------------------------------------------------ the MergeRecipe contract

    mergekit_file: ClassVar[str] = "mergekit_config.yml"
    mergekit_command: ClassVar[str] = "mergekit-yaml mergekit_config.yml OUT"

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


class LayerwiseRecipe(_RecipeForms):
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
    def parts(self) -> list[Recipe]:
        """One single-method recipe per group, in group order."""
        return self._parts

    @property
    def model_refs(self) -> list[str]:
        return list(dict.fromkeys(ref for part in self._parts for ref in part.model_refs))

    def part_for(self, layer: int | None) -> Recipe:
        """The recipe that merges block ``layer``'s tensors (None: a tensor outside the blocks)."""
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


class PathRecipe(_RecipeForms):
    """A data-flow merge: the output's blocks are ``path``, each copied from a block of one input model, in
    order (repeats allowed); embeddings, final norm and head come from ``outer``. ``scale`` multiplies the
    block's output projections (``OUTPUT_PROJECTIONS``: weights and biases), i.e. what the block adds to the
    residual stream, so it survives export as plain weights (mergekit ``passthrough``'s ``scale``)."""

    model_config = STRICT
    path: list[PathStep] = Field(min_length=1, max_length=MAX_PATH_LENGTH)
    outer: str
    dtype: DType | None = None
    out_dtype: DType | None = None

    mergekit_file: ClassVar[str] = "mergekit_config.yml"
    mergekit_command: ClassVar[str] = "mergekit-yaml mergekit_config.yml OUT"

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

    def to_mergekit_yaml(self, out_dtype: DType | None = None) -> str:
        """A ``passthrough`` of one-block slices. mergekit takes the embeddings from the first slice's model
        and the final norm and head from the last one's, so empty slices of ``outer`` open and close the
        list."""
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


class MergeRecipe(Protocol):
    """What the merge engine, the search and the exports need of a recipe, single-method or layer-wise:
    the single-method recipe for each block (``part_for``), all its parts, the models it reads, and its
    YAML forms (ours, and mergekit's in the file ``mergekit_file``)."""

    base_model: str | None
    seed: int
    mergekit_file: ClassVar[str]
    mergekit_command: ClassVar[str]

    @property
    def parts(self) -> list[Recipe]: ...

    @property
    def model_refs(self) -> list[str]: ...

    @property
    def output_dtype(self) -> str | None: ...

    def part_for(self, layer: int | None) -> Recipe: ...

    def check_layers(self, num_layers: int) -> None: ...

    def to_yaml(self) -> str: ...

    def to_mergekit_yaml(self, out_dtype: DType | None = None, layer_prefix: str = ...) -> str: ...

    def model_dump(self, **kwargs: Any) -> dict[str, Any]: ...

    def model_dump_json(self, **kwargs: Any) -> str: ...


AnyRecipe = Recipe | LayerwiseRecipe | PathRecipe


def _recipe_class(data: dict[str, Any]) -> type[AnyRecipe]:
    """A recipe mapping is layer-wise when it has ``groups``, a layer path when it has ``path``."""
    return LayerwiseRecipe if "groups" in data else PathRecipe if "path" in data else Recipe


def parse_recipe(data: dict[str, Any]) -> AnyRecipe:
    """A recipe mapping as stored (a trial's attribute, a summary) or written by a user."""
    return _recipe_class(data).model_validate(data)


def recipe_from_yaml(path: str | Path) -> AnyRecipe:
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


def recipe_hash(recipe: AnyRecipe) -> str:
    """A recipe's identity in its run (duplicates reuse a score); a field added later is left out while it
    holds its default, so that a resumed older run still knows its recipes."""
    later = {"tokenizer_source"} if isinstance(recipe, Recipe) and recipe.tokenizer_source is None else None
    return hashlib.sha256(recipe.model_dump_json(exclude=later).encode()).hexdigest()[:16]
