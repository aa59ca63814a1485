"""The merge methods' registry: each method's name, parameters with their ranges, and the contract a recipe
must meet. It holds declarations only: the tensor functions live in :mod:`evomerge.kernels` and load on first
use, so checking a spec or recipe needs no torch (as lm-eval's registry loads a task's code only when run).

Semantics follow mergekit's, so a recipe means the same in both tools.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from evomerge.errors import SpecError

KERNELS = "evomerge.kernels"  # the module that holds a function per method name
BasePolicy = Literal["none", "optional", "required"]
Sparsifier = Literal["none", "magnitude", "random", "outliers", "rank"]


@dataclass(frozen=True)
class Param:
    """One tunable parameter: its default and the closed range it must lie in (ignored for flags)."""

    default: float | bool
    low: float = 0.0
    high: float = 1.0

    def check(self, name: str, value: float | bool, where: str) -> None:
        """SpecError naming ``where`` unless ``value`` is a flag for a flag, else a finite number in range."""
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                raise SpecError(f"{where}: {name} must be true or false, got {value!r}")
            return
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"{where}: {name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise SpecError(f"{where}: {name}={value} is not a finite number")
        if not self.low <= value <= self.high:
            raise SpecError(f"{where}: {name}={value} is outside [{self.low}, {self.high}]")


# No natural limit, but beyond +/-10 a merge is a blow-up, not a recipe: the range says so up front.
WEIGHT = Param(1.0, -10.0, 10.0)
DENSITY = Param(1.0, 0.0, 1.0)


@dataclass(frozen=True)
class MergeMethod:
    """A registry entry: the contract the recipe must meet, and the name of its tensor function in
    :mod:`evomerge.kernels` (``name`` itself), imported on first use so the registry needs no torch."""

    name: str
    base: BasePolicy
    uses_deltas: bool
    min_models: int = 1  # inputs other than the base
    max_models: int | None = None
    per_model: dict[str, Param] = field(default_factory=dict)
    shared: dict[str, Param] = field(default_factory=dict)
    seeded: bool = False  # draws random masks: needs a generator
    check: Callable[[dict[str, float]], str | None] | None = None  # joint limits on one model's values
    stacks: bool = False  # fn also takes ``stacked=``: the deltas as rows of one scratch tensor
    elementwise: bool = False  # an output entry depends on the inputs' entries at its position alone

    @property
    def fn(self) -> Callable[..., Any]:
        """The tensor function (see :mod:`evomerge.kernels` for the calling convention)."""
        return getattr(importlib.import_module(KERNELS), self.name)

    @property
    def parameters(self) -> dict[str, Param]:
        """Every parameter the method takes, shared or per model (per-model ones may also be set globally)."""
        return {**self.shared, **self.per_model}

    def check_model_count(self, n: int) -> None:
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            want = str(self.min_models) if self.min_models == self.max_models else (
                f"at least {self.min_models}" if self.max_models is None
                else f"{self.min_models} to {self.max_models}")
            raise SpecError(f"method {self.name} needs {want} model(s) besides the base, got {n}")


# ----------------------------------------------------------------------------- the registry

_GAMMA = Param(0.01, 0.0, 1.0)
_EPSILON = Param(0.15, 0.0, 0.5)
_LAMBDA = Param(1.0, -10.0, 10.0)  # as WEIGHT: no natural limit, a declared sane one


def _della_limits(values: dict[str, float]) -> str | None:
    density, epsilon = values["density"], values["epsilon"]
    if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        return f"density {density} +/- epsilon {epsilon} must stay inside (0, 1)"
    return None


def _task_vector_entry(name: str, sparsify: Sparsifier, normalize: bool, rescale: bool) -> MergeMethod:
    per_model = {"weight": WEIGHT, "density": DENSITY}
    if sparsify == "outliers":
        per_model["gamma"] = _GAMMA
    if sparsify == "rank":
        per_model["epsilon"] = _EPSILON
    return MergeMethod(
        name=name, base="required", uses_deltas=True,
        per_model=per_model,
        shared={"lambda": _LAMBDA, "normalize": Param(normalize), "rescale": Param(rescale)},
        seeded=sparsify in ("random", "rank"), check=_della_limits if sparsify == "rank" else None,
        stacks=True, elementwise=sparsify == "none",
    )


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("linear", base="none", uses_deltas=False, per_model={"weight": WEIGHT},
                    shared={"normalize": Param(True)}, elementwise=True),
        _task_vector_entry("task_arithmetic", "none", normalize=False, rescale=False),
        _task_vector_entry("ties", "magnitude", normalize=True, rescale=False),
        _task_vector_entry("dare_ties", "random", normalize=False, rescale=True),
        _task_vector_entry("dare_linear", "random", normalize=False, rescale=True),
        _task_vector_entry("breadcrumbs", "outliers", normalize=False, rescale=False),
        _task_vector_entry("breadcrumbs_ties", "outliers", normalize=False, rescale=False),
        _task_vector_entry("della", "rank", normalize=True, rescale=True),
        _task_vector_entry("della_linear", "rank", normalize=False, rescale=True),
        MergeMethod("slerp", base="required", uses_deltas=False, min_models=1, max_models=1,
                    shared={"t": Param(0.5, 0.0, 1.0)}),
        MergeMethod("nuslerp", base="optional", uses_deltas=True, min_models=2, max_models=2,
                    per_model={"weight": WEIGHT},
                    shared={"nuslerp_flatten": Param(True), "nuslerp_row_wise": Param(False)}),
        MergeMethod("model_stock", base="required", uses_deltas=True, min_models=2,
                    shared={"filter_wise": Param(False)}),
    )
}


def get_method(name: str) -> MergeMethod:
    """The registry entry for ``name``; a SpecError naming the known methods otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise SpecError(f"unknown merge method {name!r}; known: {', '.join(METHODS)}") from None
