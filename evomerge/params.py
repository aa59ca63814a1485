"""A recipe's parameter settings (mergekit's forms: a scalar, a gradient over the blocks' depth, a list filtered
by tensor name) and their values for one tensor, by name alone (no tensor data, no torch): per-model value >
global value > method default. Below the recipes, which declare their fields with these forms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, Field

from evomerge.errors import SpecError
from evomerge.layout import layer_index, layer_position
from evomerge.yaml_io import STRICT

if TYPE_CHECKING:
    from evomerge.recipes import Recipe, WeightRecipe


Scalar = bool | float


Gradient = Annotated[list[float], Field(min_length=1)]


class Filtered(BaseModel):
    """A value that applies to tensors whose name contains ``filter`` (no filter: every tensor)."""

    model_config = STRICT
    filter: str | None = None
    value: Scalar | Gradient


Setting = Scalar | Gradient | Annotated[list[Filtered], Field(min_length=1)]


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


def check_resolved(recipe: WeightRecipe, names: list[str], num_layers: int) -> None:
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

