"""Pydantic models of recipes (concrete merges) and search specs, checked before any tensor is read.

A recipe uses mergekit's own keys (``merge_method``, ``base_model``, ``models``, ``parameters``,
``dtype``) so that a mergekit YAML with the features we support loads as it is, and ours can be written
back as a mergekit YAML. ``seed`` (for DARE/DELLA masks) is our only addition. A layer-wise recipe
(``groups``: a method per range of blocks) is written back as a ``mergekit-multi`` document.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Protocol, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from evomerge.errors import SpecError
from evomerge.registry import MergeMethod, Param, get_method
from evomerge.scores import task_shares
from evomerge.yaml_io import read_yaml_file

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
        _check_tokenizer_source(self.tokenizer_source, self.base_model)
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
    data = _read_yaml_mapping(Path(path))
    return _validate(_recipe_class(data), data, Path(path))


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


def _check_tokenizer_source(source: str | None, base_model: str | None) -> None:
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
        _check_value(allowed[name], name, value, where)


def _check_value(param: Param, name: str, value: float | bool, where: str) -> None:
    """``Param.check`` inside a pydantic validator, which reports ValueErrors with their location."""
    try:
        param.check(name, value, where)
    except SpecError as err:
        raise ValueError(str(err)) from None


M = TypeVar("M", bound=BaseModel)


def load_yaml_model(cls: type[M], path: str | Path) -> M:
    """Parse and validate a YAML file; any problem becomes one SpecError line naming file and field."""
    return _validate(cls, _read_yaml_mapping(Path(path)), Path(path))


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A recipe's or spec's top-level mapping (``read_yaml_file``: a regular file, no key twice)."""
    data = read_yaml_file(path)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    return data


def _validate(cls: type[M], data: dict[str, Any], path: Path) -> M:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{path}: {describe_error(err)}") from None
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None


# Errors that only say "this union member does not fit": when a value may be a number, a list or a
# filter list, the telling error is the one about the member it was meant to be.
_MISMATCH = {"bool_type", "bool_parsing", "float_type", "float_parsing", "int_type", "int_parsing", "list_type",
             "string_type", "dict_type", "model_type", "model_attributes_type", "literal_error", "none_required"}
_UNION_TAG = re.compile(r"^(bool|float|int|str|constrained-.*|function-.*|.*\[.*\])$")


def describe_error(err: ValidationError) -> str:
    """One line for a validation error: the most telling entry, where it is and what is wrong (for a
    value that fits no member of a union: what each member wants)."""
    errors = [(".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p))), e)
              for e in err.errors()]
    telling = [(loc, e) for loc, e in errors if e["type"] not in _MISMATCH]
    loc, first = (telling or errors)[0]
    msgs = [first["msg"]] if telling else list(dict.fromkeys(e["msg"] for at, e in errors if at == loc))
    msg = " or ".join(msgs).removeprefix("Value error, ")
    return f"{loc + ': ' if loc else ''}{msg}"


# ----------------------------------------------------------------------------- search specs


class Range(BaseModel):
    """Closed interval a searched parameter is drawn from (``log`` for scale-free ones)."""

    model_config = STRICT
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"range low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


@dataclass(frozen=True)
class Granularity:
    """How finely coefficients vary over layers: ``kind`` and, for groups:N and gradient:K, ``count``."""

    kind: Literal["global", "layer", "layer_module", "groups", "gradient"]
    count: int = 0

    @classmethod
    def parse(cls, text: str) -> Granularity:
        match = re.fullmatch(r"(global|layer|layer_module)|(groups|gradient):([1-9]\d*)", text)
        if not match or (match.group(2) == "gradient" and int(match.group(3)) < 2):
            raise ValueError(f"space.granularity {text!r} is not global, layer, layer_module, groups:N or "
                             "gradient:K (K >= 2)")
        return cls(match.group(1)) if match.group(1) else cls(match.group(2), int(match.group(3)))


class SpaceSpec(BaseModel):
    """What the sampler chooses: method(s), how finely coefficients vary over layers, and their ranges."""

    model_config = STRICT
    methods: list[str] = Field(["linear"], min_length=1)
    granularity: str = "layer"
    modules: list[str] = ["self_attn", "mlp"]
    parameters: dict[str, Range] = {"weight": Range(low=0.0, high=1.0)}
    fixed: dict[str, Scalar] = {}
    shared: list[str] = []  # searched once for the whole model (once per method group) instead of per slot
    method_granularity: str = "global"  # or groups:N: each range of blocks picks its own method
    # kind dataflow: the layer path instead (PathRecipe over `models`, outer `base_model`): r x M x L candidate
    # steps (r repeats of every model's blocks, interleaved by depth), each used or skipped, each scaled
    kind: Literal["weights", "dataflow"] = "weights"
    repeats: int = Field(2, ge=1, le=16)
    max_length: int | None = Field(None, ge=1, le=MAX_PATH_LENGTH)
    scale: Range | None = None  # None: every step at scale 1
    outer: str | None = None  # the model whose embeddings, final norm and head the path uses (None: base_model)

    WEIGHT_FIELDS: ClassVar[tuple[str, ...]] = ("methods", "granularity", "modules", "parameters", "fixed", "shared",
                                                "method_granularity")
    DATAFLOW_FIELDS: ClassVar[tuple[str, ...]] = ("repeats", "max_length", "scale", "outer")

    @functools.cached_property
    def grain(self) -> Granularity:
        """The granularity, parsed once (the string is what the YAML and the spec hash hold)."""
        return Granularity.parse(self.granularity)

    @functools.cached_property
    def method_groups(self) -> int | None:
        """How many layer groups choose their own method (None: one method for the whole model)."""
        grain = Granularity.parse(self.method_granularity)
        return grain.count if grain.kind == "groups" else None

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, value: str) -> str:
        Granularity.parse(value)
        return value

    @field_validator("method_granularity")
    @classmethod
    def _method_granularity(cls, value: str) -> str:
        if not re.fullmatch(r"global|groups:[1-9]\d*", value):
            raise ValueError(f"space.method_granularity {value!r} is not global or groups:N")
        return value

    @model_validator(mode="after")
    def _check(self) -> SpaceSpec:
        other = self.WEIGHT_FIELDS if self.kind == "dataflow" else self.DATAFLOW_FIELDS
        meaningless = [f for f in other if getattr(self, f) != SpaceSpec.model_fields[f].default]
        if meaningless:
            raise ValueError(f"space.{meaningless[0]} does not apply to space.kind {self.kind}")
        if self.scale is not None and not (self.scale.low > 0 and self.scale.high <= 4):
            raise ValueError(f"space.scale [{self.scale.low}, {self.scale.high}] must lie in (0, 4]")
        for name in self.methods:
            takes = get_method(name).parameters
            for param, rng in self.parameters.items():
                if param in takes:
                    for value in (rng.low, rng.high):
                        _check_value(takes[param], param, value, f"space.parameters.{param}")
            for param, value in self.fixed.items():
                if param in takes:
                    _check_value(takes[param], param, value, f"space.fixed.{param}")
        every = set().union(*[get_method(m).parameters for m in self.methods])
        unknown = [p for p in [*self.parameters, *self.fixed] if p not in every]
        if unknown:
            raise ValueError(f"space: no chosen method takes parameter {unknown[0]!r}")
        if self.method_groups is not None and len(self.methods) < 2:
            raise ValueError(f"space.method_granularity {self.method_granularity} needs at least two space.methods "
                             "to choose from")
        if self.method_groups is not None and self.grain.kind == "gradient":
            raise ValueError(f"space.granularity {self.granularity} spans the whole model, so with method_granularity "
                             f"{self.method_granularity} each group would search control points outside its blocks; "
                             "use layer, layer_module or groups:N")
        missing = [s for s in self.shared if s not in self.parameters]
        if missing:
            raise ValueError(f"space.shared names {missing[0]!r}, which is not in space.parameters")
        return self


SPLIT_PATTERN = re.compile(r"^(?P<split>[\w\-]+)(?:\[(?P<start>\d*):(?P<stop>\d*)\])?$")


def parse_split(value: str) -> tuple[str, slice]:
    """A split reference ``NAME`` or ``NAME[start:stop]``: the split's name and the doc-id slice."""
    match = SPLIT_PATTERN.match(value)
    if not match:
        raise SpecError(f"split {value!r} is not NAME or NAME[start:stop]")
    start, stop = match.group("start"), match.group("stop")
    return match.group("split"), slice(int(start) if start else None, int(stop) if stop else None)


class TaskSpec(BaseModel):
    """A benchmark task: lm-eval name, metric, weight, and the split (or doc range) of each role."""

    model_config = STRICT
    name: str
    metric: str = "acc"
    weight: float = Field(1.0, ge=0)
    splits: dict[Literal["search", "validation", "test"], str] = {
        "search": "search", "validation": "validation", "test": "test"}
    # lm-eval's task options, applied as lm-eval's ``simple_evaluate`` applies them; None: lm-eval's default
    OPTIONS: ClassVar[tuple[str, ...]] = ("num_fewshot", "apply_chat_template", "fewshot_as_multiturn",
                                          "system_instruction", "gen_kwargs")
    num_fewshot: int | None = Field(None, ge=0, strict=True)  # refused where the YAML fixes num_fewshot: 0
    apply_chat_template: bool | None = Field(None, strict=True)  # the tokenizer's chat template (it must have one)
    fewshot_as_multiturn: bool | None = Field(None, strict=True)  # None: lm-eval's default, apply_chat_template
    system_instruction: str | None = Field(None, min_length=1)
    gen_kwargs: dict[str, str | int | float | bool] | None = Field(None, min_length=1)  # generate_until tasks only

    @property
    def multiturn(self) -> bool:
        """Whether few-shot examples are separate chat turns (lm-eval's default: with a chat template)."""
        return bool(self.apply_chat_template) if self.fewshot_as_multiturn is None else self.fewshot_as_multiturn

    @model_validator(mode="after")
    def _options(self) -> TaskSpec:
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("fewshot_as_multiturn needs apply_chat_template: true (without a chat template it "
                             "would do nothing)")
        return self

    @field_validator("splits")
    @classmethod
    def _splits(cls, splits: dict[str, str]) -> dict[str, str]:
        for role, value in splits.items():
            try:
                _, rows = parse_split(value)
            except SpecError as err:
                raise ValueError(f"{role}: {err}") from None
            if rows.start is not None and rows.stop is not None and rows.start >= rows.stop:
                raise ValueError(f"{role}: split {value!r} is empty (start must be below stop)")
        return splits


class EvaluationSpec(BaseModel):
    model_config = STRICT
    tasks: list[TaskSpec] = Field(min_length=1)
    include_paths: list[str] = []  # task folders; "demo" is the built-in demo tasks
    search_examples: int | None = Field(500, ge=1)  # per task and candidate (None: the whole search split)
    # first-fidelity subset per task; a list races over several nested subsets (rungs, e.g. [25, 100]), the
    # paired test at each; None disables multi-fidelity
    screen_examples: Annotated[int, Field(ge=1)] | list[int] | None = 100
    # which search documents: the first ones, or an informative subset drawn from strata of the reference
    # models' answers on a pool of the first ``subset_pool`` search documents (None: all; evomerge.subsets)
    subset: Literal["first", "answers"] = "first"
    subset_pool: int | None = Field(None, ge=1)
    objective: Literal["weighted", "pareto"] = "weighted"
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = 64
    top_k: int = Field(5, ge=1)  # re-scored on validation at the end

    @property
    def weights(self) -> dict[str, float]:
        """Each task's weight by name (the weighted task mean's weights)."""
        return {t.name: t.weight for t in self.tasks}

    @property
    def rungs(self) -> list[int]:
        """The screening subsets' sizes per task, smallest first (empty: no screening)."""
        if self.screen_examples is None:
            return []
        return [self.screen_examples] if isinstance(self.screen_examples, int) else list(self.screen_examples)

    @model_validator(mode="after")
    def _check(self) -> EvaluationSpec:
        try:
            task_shares(self.weights)
        except SpecError as err:
            raise ValueError(f"evaluation.tasks: {err}") from None
        rungs = self.rungs
        if isinstance(self.screen_examples, list) and (not rungs or min(rungs) < 1):
            raise ValueError(f"evaluation.screen_examples {rungs}: a race needs one or more rungs of 1 example or more")
        if any(a >= b for a, b in itertools.pairwise(rungs)):
            raise ValueError(f"evaluation.screen_examples {rungs} must grow from one rung to the next")
        if rungs and self.search_examples is not None and rungs[-1] >= self.search_examples:
            raise ValueError("evaluation.screen_examples must be below search_examples")
        if self.subset == "first" and self.subset_pool is not None:
            raise ValueError("evaluation.subset_pool is read only with subset: answers")
        if self.subset == "answers" and self.search_examples is None:
            raise ValueError("evaluation.subset: answers needs search_examples (the subset's size per task)")
        if self.subset_pool is not None and self.search_examples is not None \
                and self.subset_pool <= self.search_examples:
            raise ValueError(f"evaluation.subset_pool ({self.subset_pool}) must exceed search_examples "
                             f"({self.search_examples}): the subset is drawn from the pool")
        return self


class ThenSpec(BaseModel):
    """A second stage after a parameter-space search (Sakana's PS then DFS): a data-flow search over the same
    models plus the first stage's winner, in the run folder's ``dataflow/``, with the same budget."""

    model_config = STRICT
    space: SpaceSpec
    sampler: Literal["cmaes", "tpe", "random"] | None = None

    @model_validator(mode="after")
    def _check(self) -> ThenSpec:
        if self.space.kind != "dataflow":
            raise ValueError("then.space.kind must be dataflow (the stage after a parameter-space search)")
        return self


class SearchSpec(BaseModel):
    """A whole search: the models, the space, the evaluation and the sampler."""

    model_config = STRICT
    base_model: str
    models: list[str] = Field(min_length=1)
    space: SpaceSpec = SpaceSpec()
    evaluation: EvaluationSpec
    sampler: Literal["cmaes", "tpe", "nsga2", "random"] | None = None  # None: chosen from the space
    seed: Seed = 0
    dtype: DType = "float32"
    device: str = "auto"
    inputs_on: Placement = "auto"  # where, not what: left out of the spec's identity (search.spec_hash)
    then: ThenSpec | None = None
    tokenizer_source: str | None = None  # as in a recipe: models whose vocabularies differ (evomerge.vocab)

    @model_validator(mode="after")
    def _check(self) -> SearchSpec:
        _check_tokenizer_source(self.tokenizer_source, self.base_model)
        if self.tokenizer_source is not None and (self.space.kind == "dataflow" or self.then is not None
                                                  or self.space.method_granularity != "global"):
            raise ValueError("tokenizer_source works with one method for the whole network (layer-wise recipes and "
                             "layer paths have none)")
        if self.then is not None:
            if self.space.kind != "weights":
                raise ValueError("then follows a parameter-space search: space.kind must be weights")
            try:  # the second stage's spec, checked now (its pool's first model is the winner to come)
                self.dataflow_stage("first-stage-winner")
            except ValidationError as err:
                raise ValueError(f"then: {describe_error(err)}") from None
        for name in self.space.methods:
            try:
                get_method(name).check_model_count(len(self.models))
            except SpecError as err:
                raise ValueError(f"space.methods: {err}") from None
        if self.sampler == "cmaes" and len(self.space.methods) > 1:
            raise ValueError("sampler cmaes cannot choose among methods (categorical); use tpe or random")
        if self.space.outer is not None and self.space.outer not in [self.base_model, *self.models]:
            raise ValueError(f"space.outer {self.space.outer!r} is neither base_model nor one of models")
        if self.evaluation.objective == "pareto" and self.sampler in ("cmaes",):
            raise ValueError("a pareto objective needs sampler nsga2, tpe or random")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpec:
        return load_yaml_model(cls, path)

    def dataflow_stage(self, winner: str) -> SearchSpec:
        """The ``then`` stage's own spec: ``winner`` (the first stage's exported winner) joins the models and,
        unless ``then.space.outer`` names another, gives the path its embeddings, final norm and head."""
        if self.then is None:
            raise SpecError("this spec has no then stage")
        stage = self.model_dump(mode="json", exclude_unset=True, exclude={"then", "space", "sampler"})
        space = self.then.space.model_dump(mode="json", exclude_unset=True)
        if space.get("outer") is None:  # so the winner's own blocks, a baseline, are the winner itself
            space["outer"] = winner
        return SearchSpec.model_validate({**stage, "models": [winner, *self.models], "space": space,
                                          "sampler": self.then.sampler})


def spec_hash(spec: SearchSpec) -> str:
    """The spec's identity in its run folder. Fields added later are left out while they hold the value that
    means "as before" (one method everywhere, no task options), so older run folders keep their hash; where the
    inputs live (``inputs_on``) changes no result and is never part of it."""
    unchanged: dict[str, Any] = {"inputs_on": True, "evaluation": {"tasks": {
        i: {o for o in TaskSpec.OPTIONS if getattr(task, o) is None} for i, task in enumerate(spec.evaluation.tasks)}}}
    if spec.evaluation.subset == "first":
        unchanged["evaluation"].update({"subset": True, "subset_pool": True})
    if spec.space.method_granularity == "global":
        unchanged["space"] = {"method_granularity"}
    if spec.space.kind == "weights":
        unchanged.setdefault("space", set()).update({"kind", *SpaceSpec.DATAFLOW_FIELDS})
    if spec.then is None:
        unchanged["then"] = True
    if spec.tokenizer_source is None:
        unchanged["tokenizer_source"] = True
    return hashlib.sha256(spec.model_dump_json(exclude=unchanged).encode()).hexdigest()[:16]


def recipe_hash(recipe: AnyRecipe) -> str:
    """A recipe's identity in its run (duplicates reuse a score); a field added later is left out while it
    holds its default, so that a resumed older run still knows its recipes."""
    later = {"tokenizer_source"} if isinstance(recipe, Recipe) and recipe.tokenizer_source is None else None
    return hashlib.sha256(recipe.model_dump_json(exclude=later).encode()).hexdigest()[:16]
