"""Pydantic models of a Recipe (one concrete merge), checked before any tensor is read.

A recipe uses mergekit's own keys (``merge_method``, ``base_model``, ``models``, ``parameters``,
``dtype``) so that a mergekit YAML with the features we support loads as it is, and ours can be written
back as a mergekit YAML. ``seed`` (for DARE/DELLA masks) is our only addition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from evomerge.errors import SpecError
from evomerge.methods import MergeMethod, get_method

Scalar = bool | float
Gradient = list[float]


class Filtered(BaseModel):
    """A value that applies to tensors whose name contains ``filter`` (no filter: every tensor)."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | Gradient


Setting = Scalar | Gradient | list[Filtered]
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
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Setting] = {}


class Recipe(BaseModel):
    """One merge: which models, which method, which parameters (scalar, gradient or filtered)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
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
        shared_ok = set(method.shared) | set(method.per_model)  # per-model values may be set globally
        for name, setting in self.parameters.items():
            _check_setting(method, name, setting, shared_ok, "parameters")
        for i, entry in enumerate(self.models):
            for name, setting in entry.parameters.items():
                _check_setting(method, name, setting, set(method.per_model), f"models[{i}] ({entry.model})")
        return self

    # ------------------------------------------------------------------ YAML

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        return load_yaml_model(cls, path)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)

    def to_mergekit_yaml(self) -> str:
        """The same merge for ``mergekit-yaml``: absolute paths, base listed, float32 arithmetic."""
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
        if self.output_dtype:
            doc["out_dtype"] = self.output_dtype
        return yaml.safe_dump(doc, sort_keys=False)


def _plain(params: dict[str, Setting]) -> dict[str, Any]:
    return {k: [v.model_dump(exclude_none=True) if isinstance(v, Filtered) else v for v in s]
            if isinstance(s, list) else s for k, s in params.items()}


def _check_setting(method: MergeMethod, name: str, setting: Setting, allowed: set[str], where: str) -> None:
    if name not in allowed:
        raise ValueError(f"{where}: {method.name} has no parameter {name!r}; it takes "
                         f"{', '.join(sorted(allowed)) or 'none'}")
    spec = method.shared.get(name) or method.per_model[name]
    for value in setting_numbers(setting):
        try:
            spec.check(name, value, where)
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
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise SpecError(f"{path}: {loc + ': ' if loc else ''}{msg}") from None
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None


# ----------------------------------------------------------------------------- search specs


class Range(BaseModel):
    """Closed interval a searched parameter is drawn from (``log`` for scale-free ones)."""

    model_config = ConfigDict(extra="forbid")
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"range low {self.low} must be below high {self.high}")
        return self


GRANULARITY_PATTERN = r"^(global|layer|layer_module|groups:[1-9]\d*|gradient:([2-9]|[1-9]\d+))$"


class SpaceSpec(BaseModel):
    """What the sampler chooses: method(s), how finely coefficients vary over layers, and their ranges."""

    model_config = ConfigDict(extra="forbid")
    methods: list[str] = ["linear"]
    granularity: str = "layer"
    modules: list[str] = ["self_attn", "mlp"]
    parameters: dict[str, Range] = {"weight": Range(low=0.0, high=1.0)}
    fixed: dict[str, Scalar] = {}
    shared: list[str] = []  # searched once for the whole model instead of per layer slot

    @model_validator(mode="after")
    def _check(self) -> SpaceSpec:
        import re

        if not self.methods:
            raise ValueError("space.methods must name at least one merge method")
        if not re.match(GRANULARITY_PATTERN, self.granularity):
            raise ValueError(f"space.granularity {self.granularity!r} is not global, layer, layer_module, "
                             "groups:N or gradient:K (K >= 2)")
        for name in self.methods:
            method = get_method(name)
            known = set(method.shared) | set(method.per_model)
            for param, rng in self.parameters.items():
                if param not in known:
                    continue
                spec = method.shared.get(param) or method.per_model[param]
                for value in (rng.low, rng.high):
                    try:
                        spec.check(param, value, f"space.parameters.{param}")
                    except SpecError as err:
                        raise ValueError(str(err)) from None
        every = set().union(*[set(get_method(m).shared) | set(get_method(m).per_model) for m in self.methods])
        unknown = [p for p in [*self.parameters, *self.fixed] if p not in every]
        if unknown:
            raise ValueError(f"space: no chosen method takes parameter {unknown[0]!r}")
        missing = [s for s in self.shared if s not in self.parameters]
        if missing:
            raise ValueError(f"space.shared names {missing[0]!r}, which is not in space.parameters")
        return self


class TaskSpec(BaseModel):
    """A benchmark task: lm-eval name, metric, weight, and the split (or doc range) of each role."""

    model_config = ConfigDict(extra="forbid")
    name: str
    metric: str = "acc"
    weight: float = 1.0
    splits: dict[Literal["search", "validation", "test"], str] = {
        "search": "search", "validation": "validation", "test": "test"}


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[TaskSpec]
    include_paths: list[str] = []  # task folders; "demo" is the built-in demo tasks
    search_examples: int | None = 500  # per task and candidate (None: the whole search split)
    screen_examples: int | None = 100  # first-fidelity subset; None disables multi-fidelity
    objective: Literal["weighted", "pareto"] = "weighted"
    batch_size: int | Literal["auto"] = 64
    top_k: int = 5  # re-scored on validation at the end

    @model_validator(mode="after")
    def _check(self) -> EvaluationSpec:
        if not self.tasks:
            raise ValueError("evaluation.tasks must list at least one task")
        if self.screen_examples is not None and self.search_examples is not None \
                and self.screen_examples >= self.search_examples:
            raise ValueError("evaluation.screen_examples must be below search_examples")
        return self


class SearchSpec(BaseModel):
    """A whole search: the models, the space, the evaluation and the sampler."""

    model_config = ConfigDict(extra="forbid")
    base_model: str
    models: list[str]
    space: SpaceSpec = SpaceSpec()
    evaluation: EvaluationSpec
    sampler: Literal["cmaes", "tpe", "nsga2", "random"] | None = None  # None: chosen from the space
    seed: int = 0
    dtype: DType = "float32"
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> SearchSpec:
        if len(self.models) < 1:
            raise ValueError("models must list at least one model besides the base")
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
