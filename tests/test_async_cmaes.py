"""AsyncCmaEsSampler: every finished trial is told, popsize at a time in the order trials finished, whatever
distribution it was drawn from; its state is rebuilt from the study, so a resumed search proposes what the
uninterrupted one would."""

import random

import numpy as np
import optuna
import pytest
from cmaes import CMA
from optuna.distributions import FloatDistribution, IntDistribution

from evomerge.async_cmaes import AsyncCmaEsSampler
from evomerge.run import Attr

SPACE = {f"x{i}": FloatDistribution(-1.0, 3.0) for i in range(4)} | {"lr": FloatDistribution(1e-3, 1.0, log=True)}
OPTIMUM = {**{f"x{i}": 1.0 for i in range(4)}, "lr": 0.1}


def _loss(params: dict[str, float]) -> float:
    return sum((params[f"x{i}"] - 1.0) ** 2 for i in range(4)) + (np.log(params["lr"]) - np.log(0.1)) ** 2


def _study(storage=None, seed=0, name="s") -> optuna.Study:
    return optuna.create_study(sampler=AsyncCmaEsSampler(SPACE, seed=seed), storage=storage, study_name=name,
                               load_if_exists=True)


def _ask(study: optuna.Study) -> optuna.Trial:
    trial = study.ask()
    for name, dist in SPACE.items():
        trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    return trial


def _search(study: optuna.Study, trials: int, workers: int, rng: random.Random) -> list[int]:
    """Keep ``workers`` trials in flight and finish a random one of them each time; the finishing order."""
    flight, finished = [], []
    while len(finished) < trials:
        while len(flight) < workers and len(finished) + len(flight) < trials:
            flight.append(_ask(study))
        trial = flight.pop(rng.randrange(len(flight)))
        study.tell(trial, _loss(trial.params))
        finished.append(trial.number)
    return finished


optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_every_finished_trial_is_told_in_finishing_order_whatever_order_they_were_asked():
    study = _study()
    sampler = study.sampler
    order = _search(study, 100, workers=16, rng=random.Random(0))
    assert order != sorted(order)  # out of order, as from a cluster
    told = sampler.learned_from(study)
    popsize = sampler.popsize
    assert popsize == 4 + int(3 * np.log(5))
    assert told == order[:len(order) // popsize * popsize]  # all but the last batch still filling

    # the optimizer's state is exactly a plain CMA told those trials in that order, popsize at a time
    by_number = {t.number: t for t in study.trials}
    names = sorted(SPACE)  # lr, x0..x3
    reference = CMA(mean=np.array([np.log(1e-3) / 2, 1.0, 1.0, 1.0, 1.0]),
                    sigma=min(4.0, -np.log(1e-3)) / 6,
                    bounds=np.array([[np.log(1e-3), 0.0]] + [[-1.0, 3.0]] * 4), seed=0, population_size=popsize)
    for start in range(0, len(told), popsize):
        batch = [by_number[n] for n in told[start:start + popsize]]
        reference.tell([(np.array([np.log(t.params["lr"])] + [t.params[n] for n in names[1:]]), t.value)
                        for t in batch])
    assert np.allclose(sampler._optimizer.mean, reference.mean)
    assert reference.generation == len(told) // popsize


def test_it_finds_the_optimum_with_many_trials_in_flight():
    study = _study(seed=1)
    _search(study, 400, workers=32, rng=random.Random(1))
    assert study.best_value < 0.01
    mean = dict(zip(sorted(SPACE), study.sampler._optimizer.mean, strict=True))
    assert abs(mean["x0"] - 1.0) < 0.1 and abs(mean["lr"] - np.log(0.1)) < 0.2


def test_the_first_proposals_come_from_the_initial_distribution_not_an_independent_sampler():
    """Before any trial has finished, 64 proposals spread around the box's centre with sigma a sixth of it."""
    study = _study()
    xs = np.array([[_ask(study).params[f"x{i}"] for i in range(4)] for _ in range(64)])
    assert abs(xs.mean() - 1.0) < 0.15 and 0.5 < xs.std() < 0.9  # uniform on [-1, 3] would give sd 1.15


def test_references_are_not_told_and_a_resumed_sampler_proposes_as_the_first(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = _study(storage)
    study.enqueue_trial(OPTIMUM, user_attrs={Attr.BASELINE: "reference"})
    _search(study, 40, workers=8, rng=random.Random(2))
    reference = next(t.number for t in study.trials if Attr.BASELINE in t.user_attrs)
    assert reference not in study.sampler.learned_from(study)
    assert len(study.sampler.learned_from(study)) == 39 // study.sampler.popsize * study.sampler.popsize

    resumed = _study(storage)  # a new process: a fresh sampler on the same storage
    assert resumed.sampler.learned_from(resumed) == study.sampler.learned_from(study)
    first, second = _ask(study), _ask(resumed)
    assert first.number != second.number
    again = _study(storage)  # the same trial number gets the same proposal from a rebuilt sampler
    frozen = again.sampler.sample_relative(again, again.trials[first.number], SPACE)
    assert frozen == pytest.approx(first.params)


def test_it_refuses_what_it_cannot_sample():
    with pytest.raises(ValueError, match="floats without a step"):
        AsyncCmaEsSampler({"use": IntDistribution(0, 1)})
    with pytest.raises(ValueError, match="floats without a step"):
        AsyncCmaEsSampler({"w": FloatDistribution(0, 1, step=0.1)})
    with pytest.raises(ValueError, match="at least one"):
        AsyncCmaEsSampler({})
