"""Turning an Optuna trial into a Recipe: method choice, layer granularity, ranges, shared parameters.

Coefficients vary over *slots*: one (global), K gradient control points, N layer groups, every layer,
or every layer x module filter. Slot values become recipe settings mergekit understands: a scalar, a
gradient list, or a filter list whose last entry (embeddings, final norm, head) takes the first slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from evomerge.checkpoint import LAYER_PATTERN, Checkpoint
from evomerge.methods import MergeMethod, get_method
from evomerge.spec import Filtered, Granularity, Recipe, SearchSpec, Setting


@dataclass(frozen=True)
class LayerLayout:
    """How block tensors are named: ``prefix`` + index + ``.`` (e.g. ``model.layers.3.``)."""

    prefix: str
    num_layers: int

    @classmethod
    def of(cls, ckpt: Checkpoint) -> LayerLayout:
        for name in ckpt.tensors:
            match = LAYER_PATTERN.search(name)
            if match:
                return cls(name[: match.start(1)], ckpt.num_layers)
        return cls("", 0)


@dataclass(frozen=True)
class Slot:
    """One independently searched coefficient position: its label and the tensor filters it covers."""

    label: str
    filters: tuple[str, ...]


def make_slots(granularity: Granularity, layout: LayerLayout, modules: list[str]) -> list[Slot]:
    n = layout.num_layers
    if granularity.kind == "global" or n == 0:
        return [Slot("all", ())]
    if granularity.kind == "gradient":
        return [Slot(f"g{i}", ()) for i in range(granularity.count)]
    if granularity.kind == "layer_module":
        return [Slot(f"L{i}.{m}", (f"{layout.prefix}{i}.{m}",)) for i in range(n) for m in [*modules, ""]]
    groups = n if granularity.kind == "layer" else min(n, granularity.count)
    bounds = [round(g * n / groups) for g in range(groups + 1)]
    return [Slot(f"L{bounds[g]}-{bounds[g + 1] - 1}", tuple(f"{layout.prefix}{i}." for i in
                                                        range(bounds[g], bounds[g + 1])))
            for g in range(groups)]


class SearchSpace:
    """Samples recipes from a SearchSpec; also builds the parameter dicts of known baselines."""

    def __init__(self, spec: SearchSpec, layout: LayerLayout) -> None:
        self.spec = spec
        grain = spec.space.grain
        self.slots = make_slots(grain, layout, spec.space.modules)
        self.gradient = grain.kind == "gradient"
        self.model_labels = [f"m{i}" for i in range(len(spec.models))]

    def _names(self, method: MergeMethod, param: str) -> list[list[str]]:
        """Optuna parameter names: [model][slot] for per-model params, [[slot...]] for shared ones."""
        slots = ["all"] if param in self.spec.space.shared else [s.label for s in self.slots]
        owners = self.model_labels if param in method.per_model else ["shared"]
        prefix = f"{method.name}." if len(self.spec.space.methods) > 1 else ""
        return [[f"{prefix}{param}[{o}][{s}]" for s in slots] for o in owners]

    def searched(self, method: MergeMethod) -> list[str]:
        return [p for p in self.spec.space.parameters if p in method.parameters]

    def sample(self, trial: optuna.trial.BaseTrial) -> Recipe:
        methods = self.spec.space.methods
        method = get_method(trial.suggest_categorical("method", methods) if len(methods) > 1 else methods[0])
        values: dict[str, list[list[float]]] = {}
        for param in self.searched(method):
            rng = self.spec.space.parameters[param]
            values[param] = [[trial.suggest_float(n, rng.low, rng.high, log=rng.log) for n in row]
                             for row in self._names(method, param)]
        return self.recipe(method, values)

    def _setting(self, row: list[float]) -> Setting:
        if len(row) == 1:
            return row[0]
        if self.gradient:
            return row
        entries = [Filtered(filter=f, value=v) for slot, v in zip(self.slots, row, strict=True) for f in slot.filters]
        return [*entries, Filtered(value=row[0])]

    def recipe(self, method: MergeMethod, values: dict[str, list[list[float]]]) -> Recipe:
        """The recipe for given slot values ([model][slot] per-model, [[slot]] shared)."""
        spec = self.spec
        fixed = {k: v for k, v in spec.space.fixed.items() if k in method.parameters}
        shared = {p: self._setting(v[0]) for p, v in values.items() if p not in method.per_model}
        models = [{"model": m, "parameters": {p: self._setting(v[i]) for p, v in values.items()
                                              if p in method.per_model}}
                  for i, m in enumerate(spec.models)]
        return Recipe(merge_method=method.name, base_model=spec.base_model, models=models,
                      parameters={**fixed, **shared}, dtype=spec.dtype, seed=spec.seed)

    def point(self, method_name: str, per_model: dict[str, list[float]] | None = None,
              shared: dict[str, float] | None = None) -> dict[str, Any] | None:
        """Optuna params of a recipe with one value per model (or shared) in every slot; None if a value
        lies outside the space or the method is not in it. Unnamed parameters take range midpoints."""
        if method_name not in self.spec.space.methods:
            return None
        method = get_method(method_name)
        params: dict[str, Any] = {"method": method_name} if len(self.spec.space.methods) > 1 else {}
        for param in self.searched(method):
            rng = self.spec.space.parameters[param]
            mid = (rng.low * rng.high) ** 0.5 if rng.log else (rng.low + rng.high) / 2
            for i, row in enumerate(self._names(method, param)):
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
