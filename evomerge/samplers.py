"""The study's sampler and the study itself: which Optuna sampler a spec gets, sized to its space and its
workers, and the study opened (or created) in the run's storage."""

from __future__ import annotations

import warnings

import optuna
from optuna.distributions import BaseDistribution

from evomerge.async_cmaes import AsyncCmaEsSampler, default_popsize
from evomerge.run import RunFolder
from evomerge.space import Space
from evomerge.spec import SearchSpec


def make_sampler(spec: SearchSpec, workers: int,
                 distributions: dict[str, BaseDistribution]) -> optuna.samplers.BaseSampler:
    """The spec's sampler over ``distributions`` (one recipe's parameters). With several workers, results
    arrive out of order: ``cmaes`` on a space of floats is ``AsyncCmaEsSampler`` (it learns from every finished
    trial whatever generation it was asked in) and TPE treats the trials in flight as scored with the worst
    score so far (Optuna's ``constant_liar``), so that W proposals made at once are not W copies of one.
    ``cmaes-generations`` is Optuna's generation-bound CMA-ES, kept to compare with."""
    kind = spec.sampler or default_sampler(spec)
    if kind == "cmaes" and AsyncCmaEsSampler.can_sample(distributions):
        return AsyncCmaEsSampler(distributions, seed=spec.seed)
    if kind in ("cmaes", "cmaes-generations"):  # a data-flow space's 0/1 steps: Optuna's, with margin
        # a generation holds every candidate in flight, or the extra ones would be wasted
        return optuna.samplers.CmaEsSampler(seed=spec.seed, warn_independent_sampling=False,
                                            popsize=max(default_popsize(len(distributions)), workers),
                                            with_margin=spec.space.kind == "dataflow")  # keeps 0/1 steps moving
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, group=True, constant_liar=workers > 1)
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
    """The sampler of the spec's study over ``space`` (one probed recipe's parameters: what the asynchronous
    CMA-ES samples from the first trial, and how many numbers size a CMA-ES population). Builds everything in
    memory."""
    probe = optuna.create_study().ask()
    space.sample(probe)
    with warnings.catch_warnings():  # TPE's group is "experimental"; used knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return make_sampler(spec, workers, probe.distributions)


def open_study(spec: SearchSpec, run: RunFolder, space: Space, workers: int = 1) -> optuna.Study:
    directions = ["maximize"] * (len(spec.evaluation.tasks) if spec.evaluation.objective == "pareto" else 1)
    sampler = study_sampler(spec, space, workers)
    return optuna.create_study(study_name=run.study_name(), storage=run.storage_url(), sampler=sampler,
                               pruner=optuna.pruners.NopPruner(), directions=directions, load_if_exists=True)
