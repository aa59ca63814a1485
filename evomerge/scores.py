"""The weighted mean of per-task scores, defined once: the search's objective, the screening vector's
weights, the winner's margin and the report's curve all use it. Plain Python (no torch), so reading
commands can use it."""

from __future__ import annotations

from collections.abc import Mapping

from evomerge.errors import SpecError


def task_shares(weights: Mapping[str, float]) -> dict[str, float]:
    """Each task's weight over the sum of weights: the one normalization behind every weighted task mean."""
    total = sum(weights.values())
    if total <= 0:
        raise SpecError(f"the task weights sum to {total:g}; they must sum to more than 0")
    return {task: weight / total for task, weight in weights.items()}


def weighted_mean(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """The weighted mean of per-task values (every task in ``weights`` must have one): the search's single
    objective and the ranking of a Pareto front."""
    return sum(share * values[task] for task, share in task_shares(weights).items())
