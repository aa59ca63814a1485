"""A recipe's parameters resolved for one tensor, by name alone (no tensor data, no torch): per-model value >
global value > method default, with mergekit's gradients (over the block's depth) and name filters."""

from __future__ import annotations

from dataclasses import dataclass

from evomerge.errors import SpecError
from evomerge.layout import layer_index, layer_position
from evomerge.recipes import MergeRecipe, Recipe, resolve_setting


@dataclass(frozen=True)
class TensorParams:
    """A method's parameters resolved for one tensor: shared values and one list entry per input."""

    shared: dict[str, float | bool]
    per_model: dict[str, list[float]]


def resolve_params(recipe: Recipe, name: str, num_layers: int) -> TensorParams:
    """Per-model value > global value > method default, with mergekit's gradient/filter rules."""
    method = recipe.method
    t = layer_position(name, num_layers)

    def lookup(key: str, scopes: list[dict], default: float | bool | None) -> float | bool | None:
        for scope in scopes:
            if key in scope:
                value = resolve_setting(scope[key], name, t)
                if value is not None:
                    return value
        return default

    shared = {k: lookup(k, [recipe.parameters], p.default) for k, p in method.shared.items()}
    per_model = {k: [lookup(k, [m.parameters, recipe.parameters], p.default) for m in recipe.inputs]
                 for k, p in method.per_model.items()}
    return TensorParams(shared, per_model)


def check_resolved(recipe: MergeRecipe, names: list[str], num_layers: int) -> None:
    """Joint limits that only hold per resolved value (e.g. DELLA's density +/- epsilon)."""
    for name in names:
        part = recipe.part_for(layer_index(name))
        if part.method.check is None:
            continue
        params = resolve_params(part, name, num_layers)
        for i, entry in enumerate(part.inputs):
            problem = part.method.check({k: v[i] for k, v in params.per_model.items()})
            if problem:
                raise SpecError(f"{entry.model}, tensor {name}: {problem}")
