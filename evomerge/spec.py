"""Pydantic models of a Recipe (one concrete merge), checked before any tensor is read.

A recipe uses mergekit's own keys (``merge_method``, ``base_model``, ``models``, ``parameters``,
``dtype``) so that a mergekit YAML with the features we support loads as it is, and ours can be written
back as a mergekit YAML. ``seed`` (for DARE/DELLA masks) is our only addition.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import SpecError
from evomerge.methods import MergeMethod, Param, get_method
from evomerge.scores import task_shares

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


class Recipe(BaseModel):
    """One merge: which models, which method, which parameters (scalar, gradient or filtered)."""

    model_config = ConfigDict(**STRICT, populate_by_name=True)
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry]
    parameters: dict[str, Setting] = {}
    dtype: DType | None = None
    out_dtype: DType | None = None
    seed: int = 0

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    @property
    def inputs(self) -> list[ModelEntry]:
        """The models merged besides the base (all of them for methods without a base)."""
        if self.method.base == "none":
            return self.models
        return [m for m in self.models if m.model != self.base_model]

    @property
    def output_dtype(self) -> str | None:
        return self.out_dtype or self.dtype

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
        return self

    # ------------------------------------------------------------------ YAML

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        return load_yaml_model(cls, path)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)

    def to_mergekit_yaml(self, out_dtype: DType | None = None) -> str:
        """The same merge for ``mergekit-yaml``: absolute paths, base listed, float32 arithmetic, and the
        output dtype (``out_dtype``: the one our merge wrote when the recipe names none)."""
        from evomerge.checkpoint import resolve_model_path

        def path(ref: str) -> str:
            return str(resolve_model_path(ref).resolve())

        models = [{"model": path(m.model), **({"parameters": _plain(m.parameters)} if m.parameters else {})}
                  for m in self.models]
        if self.base_model and self.base_model not in [m.model for m in self.models]:
            models.append({"model": path(self.base_model)})
        doc: dict[str, Any] = {"merge_method": self.merge_method, "models": models}
        if self.base_model:
            doc["base_model"] = path(self.base_model)
        if self.parameters:
            doc["parameters"] = _plain(self.parameters)
        doc["dtype"] = "float32"
        if self.output_dtype or out_dtype:
            doc["out_dtype"] = self.output_dtype or out_dtype
        return yaml.safe_dump(doc, sort_keys=False)


def _plain(params: dict[str, Setting]) -> dict[str, Any]:
    return {k: [v.model_dump(exclude_none=True) if isinstance(v, Filtered) else v for v in s]
            if isinstance(s, list) else s for k, s in params.items()}


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
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise SpecError(f"{path} is a folder, not a YAML file") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file (not UTF-8)") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot be read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
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
    shared: list[str] = []  # searched once for the whole model instead of per layer slot

    @functools.cached_property
    def grain(self) -> Granularity:
        """The granularity, parsed once (the string is what the YAML and the spec hash hold)."""
        return Granularity.parse(self.granularity)

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, value: str) -> str:
        Granularity.parse(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> SpaceSpec:
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
    screen_examples: int | None = Field(100, ge=1)  # first-fidelity subset; None disables multi-fidelity
    objective: Literal["weighted", "pareto"] = "weighted"
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = 64
    top_k: int = Field(5, ge=1)  # re-scored on validation at the end

    @property
    def weights(self) -> dict[str, float]:
        """Each task's weight by name (the weighted task mean's weights)."""
        return {t.name: t.weight for t in self.tasks}

    @model_validator(mode="after")
    def _check(self) -> EvaluationSpec:
        try:
            task_shares(self.weights)
        except SpecError as err:
            raise ValueError(f"evaluation.tasks: {err}") from None
        if self.screen_examples is not None and self.search_examples is not None \
                and self.screen_examples >= self.search_examples:
            raise ValueError("evaluation.screen_examples must be below search_examples")
        return self


class SearchSpec(BaseModel):
    """A whole search: the models, the space, the evaluation and the sampler."""

    model_config = STRICT
    base_model: str
    models: list[str] = Field(min_length=1)
    space: SpaceSpec = SpaceSpec()
    evaluation: EvaluationSpec
    sampler: Literal["cmaes", "tpe", "nsga2", "random"] | None = None  # None: chosen from the space
    seed: int = 0
    dtype: DType = "float32"
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> SearchSpec:
        for name in self.space.methods:
            get_method(name).check_model_count(len(self.models))
        if self.sampler == "cmaes" and len(self.space.methods) > 1:
            raise ValueError("sampler cmaes cannot choose among methods (categorical); use tpe or random")
        if self.evaluation.objective == "pareto" and self.sampler in ("cmaes",):
            raise ValueError("a pareto objective needs sampler nsga2, tpe or random")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpec:
        return load_yaml_model(cls, path)
