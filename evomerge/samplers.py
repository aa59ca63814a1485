"""The study's sampler and the study itself: which Optuna sampler a spec gets, sized to its space and its
workers, and the study opened (or created) in the run's storage."""

from __future__ import annotations

import math
import warnings

import optuna

from evomerge.run import RunFolder
from evomerge.space import Space
from evomerge.spec import SearchSpec


def make_sampler(spec: SearchSpec, workers: int = 1, dimensions: int = 1) -> optuna.samplers.BaseSampler:
    """The spec's sampler. CMA-ES gets a population of at least ``workers``: with more candidates in flight
    than one generation holds, the extra ones are wasted (Optuna's advice)."""
    kind = spec.sampler or default_sampler(spec)
    if kind == "cmaes":
        default = 4 + math.floor(3 * math.log(max(1, dimensions)))
        return optuna.samplers.CmaEsSampler(seed=spec.seed, warn_independent_sampling=False,
                                            popsize=max(default, workers),
                                            with_margin=spec.space.kind == "dataflow")  # keeps 0/1 steps moving
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, group=True)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.seed)
    return optuna.samplers.RandomSampler(seed=spec.seed)


def default_sampler(spec: SearchSpec) -> str:
    if spec.evaluation.objective == "pareto":
        return "nsga2"
    if spec.space.kind == "dataflow":  # CMA-ES on 0/1 decisions alone soon proposes the same path again and again
        return "cmaes" if spec.space.scale is not None else "tpe"
    return "tpe" if len(spec.space.methods) > 1 else "cmaes"


def study_sampler(spec: SearchSpec, space: Space, workers: int = 1) -> optuna.samplers.BaseSampler:
    """The sampler of the spec's study, sized to ``space`` (how many numbers one recipe takes sizes CMA-ES's
    population). Builds everything in memory."""
    probe = optuna.create_study().ask()
    space.sample(probe)
    with warnings.catch_warnings():  # TPE's group is "experimental"; used knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return make_sampler(spec, workers, len(probe.params))


def open_study(spec: SearchSpec, run: RunFolder, space: Space, workers: int = 1) -> optuna.Study:
    directions = ["maximize"] * (len(spec.evaluation.tasks) if spec.evaluation.objective == "pareto" else 1)
    sampler = study_sampler(spec, space, workers)
    return optuna.create_study(study_name=run.study_name(), storage=run.storage_url(), sampler=sampler,
                               pruner=optuna.pruners.NopPruner(), directions=directions, load_if_exists=True)
