"""The virtual-clock executor: jobs come back in the order their simulated finish times give (a cluster of W
workers replayed on one), and a real search runs through it to its budget with results told out of order."""

import json

import pytest
from helpers import SPEC

from evomerge.async_cmaes import AsyncCmaEsSampler
from evomerge.evaluate import EvalResult
from evomerge.executors import Job, Outcome
from evomerge.launch import run_search
from evomerge.recipes import Recipe
from evomerge.run import Attr, RunFolder, counted
from evomerge.spec import SearchSpec
from evomerge.virtual_clock import PerExample, VirtualClockExecutor
from evomerge.worker import Worker

RECIPE = Recipe(merge_method="linear", models=[{"model": "demo:add"}, {"model": "demo:reverse"}])


class CountingRunner:
    """A worker that scores each job's documents as right, for real time 1 s merging and 1 s evaluating."""

    name = "counting"

    def inputs(self) -> str:
        return "nowhere"

    def doc_ids(self, task: str, role: str) -> list[int]:
        return list(range(10))

    def run(self, job: Job) -> Outcome:
        examples = {t: dict.fromkeys(ids, 1.0) for t, ids in job.doc_ids.items()}
        return Outcome(EvalResult({t: 1.0 for t in examples}, examples, dict.fromkeys(examples, 1.0)), "full", None,
                       1.0, 1.0, self.name)


def job(examples: int) -> Job:
    return Job(RECIPE, "search", {"t": list(range(examples))})


def test_jobs_finish_in_simulated_time_order():
    clock = VirtualClockExecutor(CountingRunner(), workers=3, duration=PerExample(merge_s=1.0, example_s=1.0, sigma=0))
    for key, examples in ((10, 5), (11, 1), (12, 3)):  # at t=0: finish at 6, 2 and 4
        clock.submit(key, job(examples))
    assert not clock.can_submit() and clock.workers() == (3, 3)
    with pytest.raises(RuntimeError, match="all 3 simulated workers"):
        clock.submit(13, job(1))
    key, outcome = clock.wait_any()
    assert (key, clock.now, outcome.worker) == (11, 2.0, "virtual-1")
    assert (outcome.merge_s, outcome.eval_s) == (1.0, 1.0)  # 2 simulated seconds, split as the real ones were
    clock.submit(13, job(1))  # on the freed worker, at t=2: finishes at 4, with job 12 (submitted first)
    assert [clock.wait_any()[0] for _ in range(2)] == [12, 13] and clock.now == 4.0
    key, outcome = clock.wait_any()
    assert (key, clock.now, outcome.worker) == (10, 6.0, "virtual-0")
    with pytest.raises(RuntimeError, match="no job in flight"):
        clock.wait_any()


def test_a_failed_job_costs_its_merge_only():
    class Failing(CountingRunner):
        def run(self, job: Job) -> Outcome:
            return Outcome(None, "full", None, 0.5, 0.0, self.name, error="RuntimeError: planted")

    clock = VirtualClockExecutor(Failing(), workers=2, duration=PerExample(merge_s=3.0, example_s=1.0, sigma=0))
    clock.submit(0, job(50))
    assert clock.wait_any()[1].error == "RuntimeError: planted" and clock.now == 3.0


@pytest.mark.slow
def test_a_search_over_eight_simulated_workers_is_told_out_of_order(tmp_path):
    spec = SearchSpec.model_validate(SPEC)  # racing on: a stopped candidate finishes early
    clock = VirtualClockExecutor(Worker(spec), workers=8, seed=1)
    run = RunFolder(tmp_path / "run")
    done = run_search(spec, run, 20, clock, finalize=False)
    assert sum(counted(t) for t in done.search.study.get_trials()) == 20
    rows = [json.loads(line) for line in run.log.read_text().splitlines()]
    told = [row["trial"] for row in rows]
    assert told != sorted(told)  # results arrive in simulated finish order, not in the order they were asked
    assert {row["worker"] for row in rows} == {f"virtual-{i}" for i in range(8)}
    assert clock.now > 0 and clock.busy() == 0
    # every evaluated trial but the references and the last batch still filling informed the sampler
    sampler, study = done.search.study.sampler, done.search.study
    assert isinstance(sampler, AsyncCmaEsSampler)
    learned = sampler.learned_from(study)
    sampled = [t.number for t in study.get_trials() if counted(t) and Attr.BASELINE not in t.user_attrs]
    assert len(learned) >= sampler.popsize and set(learned) <= set(sampled)
    assert len(sampled) - len(learned) < sampler.popsize
