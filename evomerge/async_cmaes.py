"""CMA-ES that learns from every finished trial, in whatever order results arrive.

Optuna's ``CmaEsSampler`` ties each trial to the generation it was asked in and updates on the first
``popsize`` of that generation to finish; with W workers and W > popsize, the rest of a generation (and
every trial of a generation it has moved past) informs nothing. Here a trial belongs to no generation: the
optimizer takes finished trials in the order they finished, ``popsize`` at a time, whichever distribution
they were drawn from, so at 64 workers it learns from as many trials as at one. The optimizer's state is
rebuilt from the study (the finished trials, in finishing order) whenever it is not the one held in memory,
so a resumed search continues from the state its trials give; each proposal's randomness is seeded by the
trial's number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import optuna
from cmaes import CMA
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from evomerge.run import Attr


class AsyncCmaEsSampler(optuna.samplers.BaseSampler):
    """CMA-ES over a fixed space of floats (``search_space``: name to ``FloatDistribution``, log or linear,
    without step). Every completed trial that holds the space's parameters and is not an enqueued reference
    (a baseline) is told to the optimizer once, ``popsize`` at a time, in the order trials finished; the last
    fewer than ``popsize`` wait for the next ones. The first proposals come from the initial distribution
    (the box's centre, sigma a sixth of its narrowest side, as Optuna's), not from an independent sampler."""

    def __init__(self, search_space: dict[str, BaseDistribution], popsize: int | None = None,
                 seed: int | None = None) -> None:
        for name, dist in search_space.items():
            if not self.can_sample({name: dist}):
                raise ValueError(f"AsyncCmaEsSampler samples floats without a step; {name} is {dist}")
        if not search_space:
            raise ValueError("AsyncCmaEsSampler needs at least one parameter")
        self._space = dict(search_space)
        self._log = {name: bool(dist.log) for name, dist in search_space.items()}  # type: ignore[attr-defined]
        self._names = sorted(search_space)
        self._popsize = popsize or default_popsize(len(search_space))
        self._seed = seed if seed is not None else np.random.SeedSequence().entropy % 2**31
        self._fallback = optuna.samplers.RandomSampler(seed=seed)
        self._optimizer = self._fresh_optimizer()
        self._told: list[int] = []

    @staticmethod
    def can_sample(search_space: dict[str, BaseDistribution]) -> bool:
        """Whether ``search_space`` is one this sampler takes: at least one parameter, all floats without a step."""
        return bool(search_space) and all(isinstance(d, FloatDistribution) and d.step is None
                                          for d in search_space.values())

    @property
    def popsize(self) -> int:
        return self._popsize

    def learned_from(self, study: optuna.Study) -> list[int]:
        """The numbers of the trials the optimizer has been told, given the study's trials now, in the
        order told."""
        self._catch_up(study)
        return list(self._told)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self._space)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, float]:
        self._catch_up(study)
        self._optimizer.reseed_rng(_trial_seed(self._seed, trial.number))
        x = self._optimizer.ask()
        return {name: self._from_internal(name, v) for name, v in zip(self._names, x, strict=True)}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> object:
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def reseed_rng(self) -> None:
        self._fallback.reseed_rng()

    def _catch_up(self, study: optuna.Study) -> None:
        """Tell the optimizer every full batch of finished trials it has not seen; start over from the
        study when the trials it holds are not the first ones finished (another study, a resumed run)."""
        finished = self._learnable(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if [t.number for t in finished[:len(self._told)]] != self._told:
            self._optimizer, self._told = self._fresh_optimizer(), []
        sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0  # CMA minimizes
        while len(finished) - len(self._told) >= self._popsize:
            batch = finished[len(self._told):len(self._told) + self._popsize]
            self._optimizer.tell([(self._to_internal(t), sign * t.values[0]) for t in batch])
            self._told.extend(t.number for t in batch)

    def _learnable(self, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
        ok = [t for t in trials if Attr.BASELINE not in t.user_attrs and all(n in t.params for n in self._names)]
        return sorted(ok, key=lambda t: (t.datetime_complete, t.number))

    def _fresh_optimizer(self) -> CMA:
        bounds = np.array([self._internal_bounds(n) for n in self._names])
        return CMA(mean=bounds.mean(axis=1), sigma=float(min(bounds[:, 1] - bounds[:, 0])) / 6, bounds=bounds,
                   seed=self._seed, population_size=self._popsize)

    def _internal_bounds(self, name: str) -> tuple[float, float]:
        low, high = self._space[name].low, self._space[name].high  # type: ignore[attr-defined]
        return (math.log(low), math.log(high)) if self._log[name] else (low, high)

    def _to_internal(self, trial: FrozenTrial) -> np.ndarray:
        return np.array([math.log(trial.params[n]) if self._log[n] else trial.params[n] for n in self._names])

    def _from_internal(self, name: str, value: float) -> float:
        low, high = self._space[name].low, self._space[name].high  # type: ignore[attr-defined]
        return min(high, max(low, math.exp(value) if self._log[name] else float(value)))


def default_popsize(dimensions: int) -> int:
    """CMA-ES's default population for a space of ``dimensions`` numbers (Hansen's 4 + 3 ln n, as Optuna's)."""
    return 4 + math.floor(3 * math.log(max(1, dimensions)))


def _trial_seed(seed: int, number: int) -> int:
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0] % 2**31)
