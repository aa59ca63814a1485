"""Turning an Optuna trial into a recipe. Weight space (``WeightSpace``): method choice (global or per
layer group), layer granularity, ranges, shared parameters. Data-flow space (``PathSpace``): which blocks of
which models a token passes through, each scaled.

Coefficients vary over *slots*: one (global), K gradient control points, N layer groups, every layer,
or every layer x module filter. Slot values become recipe settings mergekit understands: a scalar, a
gradient list, or a filter list whose last entry (embeddings, final norm, head) takes the first slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import optuna

from evomerge.layout import LayerLayout
from evomerge.params import Filtered, Setting
from evomerge.recipes import MAX_PATH_LENGTH, LayerGroup, LayerwiseRecipe, PathRecipe, PathStep, Recipe, RecipeForm
from evomerge.registry import MergeMethod, get_method
from evomerge.spec import Granularity, SearchSpec


@dataclass(frozen=True)
class Slot:
    """One independently searched coefficient position: its label and the tensor filters it covers."""

    label: str
    filters: tuple[str, ...]


def make_slots(granularity: Granularity, layout: LayerLayout, modules: list[str],
               within: range | None = None) -> list[Slot]:
    """The coefficient slots of the whole model, or of the blocks ``within`` (a method group's range):
    layer groups are cut on the whole model, then clipped to the range."""
    n = layout.num_layers
    if granularity.kind == "global" or n == 0:
        return [Slot("all", ())]
    if granularity.kind == "gradient":
        return [Slot(f"g{i}", ()) for i in range(granularity.count)]
    within = range(n) if within is None else within
    if granularity.kind == "layer_module":
        return [Slot(f"L{i}.{m}", (f"{layout.prefix}{i}.{m}",)) for i in within for m in [*modules, ""]]
    groups = n if granularity.kind == "layer" else granularity.count
    slots = []
    for block_range in even_ranges(groups, n):
        layers = [i for i in block_range if i in within]
        if layers:
            slots.append(Slot(f"L{layers[0]}-{layers[-1]}", tuple(f"{layout.prefix}{i}." for i in layers)))
    return slots


def even_ranges(count: int, num_layers: int) -> list[range]:
    """The blocks cut into ``count`` even ranges (at most one range a block)."""
    groups = min(count, num_layers)
    bounds = [round(g * num_layers / groups) for g in range(groups + 1)]
    return [range(bounds[g], bounds[g + 1]) for g in range(groups)]


def method_ranges(count: int | None, num_layers: int) -> list[range] | None:
    """The blocks of each method group, or None for one method everywhere."""
    if count is None or num_layers == 0:
        return None
    return even_ranges(count, num_layers)


Values = dict[str, list[list[float]]]  # parameter -> [model][slot] (per-model) or [[slot]] (shared)


class WeightSpace:
    """Samples recipes from a SearchSpec; also builds the parameter dicts of known baselines.

    With ``space.method_granularity: groups:N`` each group of blocks picks its own method (parameter
    ``method[G<g>]``) and then only that method's coefficients, named ``G<g>.<method>.<param>[..][..]``
    (a conditional space); the recipe is then a LayerwiseRecipe whose outer tensors follow group 0.
    """

    def __init__(self, spec: SearchSpec, layout: LayerLayout) -> None:
        self.spec = spec
        grain = spec.space.grain
        self.slots = make_slots(grain, layout, spec.space.modules)
        self.gradient = grain.kind == "gradient"
        self.model_labels = [f"m{i}" for i in range(len(spec.models))]
        self.method_ranges = method_ranges(spec.space.method_groups, layout.num_layers)
        self.group_slots = [self.slots] if self.method_ranges is None else [
            make_slots(grain, layout, spec.space.modules, within=r) for r in self.method_ranges]

    def _method_param(self, group: int | None) -> str:
        return "method" if group is None else f"method[G{group}]"

    def _names(self, method: MergeMethod, param: str, group: int | None = None) -> list[list[str]]:
        """Optuna parameter names: [model][slot] for per-model params, [[slot...]] for shared ones."""
        slots = ["all"] if param in self.spec.space.shared else [s.label for s in self.group_slots[group or 0]]
        owners = self.model_labels if param in method.per_model else ["shared"]
        prefix = (f"G{group}." if group is not None else "") + \
            (f"{method.name}." if len(self.spec.space.methods) > 1 else "")
        return [[f"{prefix}{param}[{o}][{s}]" for s in slots] for o in owners]

    def searched(self, method: MergeMethod) -> list[str]:
        return [p for p in self.spec.space.parameters if p in method.parameters]

    def _sample_group(self, trial: optuna.trial.BaseTrial, group: int | None) -> tuple[MergeMethod, Values]:
        methods = self.spec.space.methods
        method = get_method(trial.suggest_categorical(self._method_param(group), methods)
                            if len(methods) > 1 else methods[0])
        values: Values = {}
        for param in self.searched(method):
            rng = self.spec.space.parameters[param]
            values[param] = [[trial.suggest_float(n, rng.low, rng.high, log=rng.log) for n in row]
                             for row in self._names(method, param, group)]
        return method, values

    def sample(self, trial: optuna.trial.BaseTrial) -> Recipe | LayerwiseRecipe:
        if self.method_ranges is None:
            return self.recipe(*self._sample_group(trial, None))
        return self.layerwise([self._sample_group(trial, g) for g in range(len(self.method_ranges))])

    def _setting(self, row: list[float], slots: list[Slot]) -> Setting:
        if len(row) == 1:
            return row[0]
        if self.gradient:
            return row
        entries = [Filtered(filter=f, value=v) for slot, v in zip(slots, row, strict=True) for f in slot.filters]
        return [*entries, Filtered(value=row[0])]

    def _fields(self, method: MergeMethod, values: Values, slots: list[Slot]) -> dict[str, Any]:
        """merge_method, models and parameters of one method's part for given slot values."""
        fixed = {k: v for k, v in self.spec.space.fixed.items() if k in method.parameters}
        shared = {p: self._setting(v[0], slots) for p, v in values.items() if p not in method.per_model}
        models = [{"model": m, "parameters": {p: self._setting(v[i], slots) for p, v in values.items()
                                              if p in method.per_model}}
                  for i, m in enumerate(self.spec.models)]
        return {"merge_method": method.name, "models": models, "parameters": {**fixed, **shared}}

    def recipe(self, method: MergeMethod, values: Values) -> Recipe:
        """The single-method recipe for given slot values."""
        spec = self.spec
        return Recipe(**self._fields(method, values, self.slots), base_model=spec.base_model, dtype=spec.dtype,
                      seed=spec.seed, tokenizer_source=spec.tokenizer_source)

    def layerwise(self, parts: list[tuple[MergeMethod, Values]]) -> LayerwiseRecipe:
        """The layer-wise recipe for each method group's method and slot values."""
        assert self.method_ranges is not None
        groups = [LayerGroup(layers=(r.start, r.stop), **self._fields(method, values, slots))
                  for r, slots, (method, values) in zip(self.method_ranges, self.group_slots, parts, strict=True)]
        return LayerwiseRecipe(base_model=self.spec.base_model, groups=groups, dtype=self.spec.dtype,
                               seed=self.spec.seed)

    def point(self, method_name: str, per_model: dict[str, list[float]] | None = None,
              shared: dict[str, float] | None = None) -> dict[str, Any] | None:
        """Optuna params of a recipe with one method everywhere and one value per model (or shared) in
        every slot; None if a value lies outside the space or the method is not in it. Unnamed parameters
        take range midpoints."""
        if method_name not in self.spec.space.methods:
            return None
        method = get_method(method_name)
        params: dict[str, Any] = {}
        for group in [None] if self.method_ranges is None else range(len(self.method_ranges)):
            if len(self.spec.space.methods) > 1:
                params[self._method_param(group)] = method_name
            for param in self.searched(method):
                rng = self.spec.space.parameters[param]
                mid = (rng.low * rng.high) ** 0.5 if rng.log else (rng.low + rng.high) / 2
                for i, row in enumerate(self._names(method, param, group)):
                    value = (per_model or {}).get(param, [None] * len(self.spec.models))[i] \
                        if param in method.per_model else (shared or {}).get(param)
                    value = mid if value is None else value
                    if not rng.low <= value <= rng.high:
                        return None
                    params.update(dict.fromkeys(row, value))
        return params

    def baselines(self) -> list[tuple[str, dict[str, Any]]]:
        """The obvious recipes, evaluated first: uniform average, each parent alone, default TIES."""
        n = len(self.spec.models)
        rng = self.spec.space.parameters.get("weight")
        out = []
        if rng is not None:
            equal = min(max(1.0, rng.low), rng.high)
            out.append(("uniform average", self.point("linear", {"weight": [equal] * n})))
            for i, m in enumerate(self.spec.models):
                alone = [equal if j == i else rng.low for j in range(n)]
                out.append((f"{m} alone", self.point("linear", {"weight": alone}) if rng.low == 0 else None))
            out.append(("default ties", self.point("ties", {"weight": [equal] * n, "density": [0.5] * n},
                                                   {"lambda": 1.0})))
        return [(label, p) for label, p in out if p is not None]


class PathSpace:
    """The data-flow space (Sakana's DFS): T = r x M x L candidate steps, ordered by repeat, then block, then
    model (``use[t]`` in {0, 1}; ``scale[t]`` when ``space.scale`` is a range). The path is the used steps in
    order, cut at ``max_length`` (and MAX_PATH_LENGTH); a trial that uses no step gets step 0 alone at scale 1
    (a path needs a block)."""

    def __init__(self, spec: SearchSpec, layout: LayerLayout) -> None:
        self.spec = spec
        models, layers = spec.models, layout.num_layers
        self.steps = [(models[m], layer) for _ in range(spec.space.repeats) for layer in range(layers)
                      for m in range(len(models))]
        width = len(str(len(self.steps) - 1))
        self.labels = [f"{t:0{width}d}" for t in range(len(self.steps))]

    def sample(self, trial: optuna.trial.BaseTrial) -> PathRecipe:
        space = self.spec.space
        path = []
        for label, (model, layer) in zip(self.labels, self.steps, strict=True):
            used = trial.suggest_int(f"use[{label}]", 0, 1)
            scale = trial.suggest_float(f"scale[{label}]", space.scale.low, space.scale.high, log=space.scale.log) \
                if space.scale is not None else 1.0
            if used:
                path.append(PathStep(model=model, layer=layer, scale=scale))
        path = path[: space.max_length or MAX_PATH_LENGTH] or [PathStep(model=self.steps[0][0], layer=self.steps[0][1])]
        return PathRecipe(path=path, outer=space.outer or self.spec.base_model, dtype=self.spec.dtype)

    def baselines(self) -> list[tuple[str, dict[str, Any]]]:
        """Each model's own blocks in order (first repeat), at scale 1 (or the nearest in range)."""
        space = self.spec.space
        scale = 1.0 if space.scale is None else min(max(1.0, space.scale.low), space.scale.high)
        out = []
        for model in self.spec.models:
            params: dict[str, Any] = {}
            for t, (label, (m, _)) in enumerate(zip(self.labels, self.steps, strict=True)):
                own = m == model and t < len(self.steps) // space.repeats
                params[f"use[{label}]"] = int(own)
                if space.scale is not None:
                    params[f"scale[{label}]"] = scale
            out.append((f"{model} blocks", params))
        return out


class Space(Protocol):
    """What the search needs of a space: a recipe per trial, and known points to evaluate first."""

    def sample(self, trial: optuna.trial.BaseTrial) -> RecipeForm: ...

    def baselines(self) -> list[tuple[str, dict[str, Any]]]: ...


def make_space(spec: SearchSpec, layout: LayerLayout) -> Space:
    return PathSpace(spec, layout) if spec.space.kind == "dataflow" else WeightSpace(spec, layout)
