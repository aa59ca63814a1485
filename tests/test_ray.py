"""Searches on Ray workers: a local pool, a cluster the test starts, a worker killed mid-candidate, a killed
driver, failing candidates. Every kill waits for an event (a trial line written, a worker's process title
saying it runs a candidate), never for a fixed time. Run inside a loopback-only network namespace
(scripts/test.sh does): Ray's start-up probes addresses beyond the machine otherwise."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import SPEC, study_of, wait_for
from optuna.trial import TrialState

from evomerge.executors import Job
from evomerge.ray_executor import RayExecutor
from evomerge.recipes import Recipe
from evomerge.run import Attr, RunFolder, counted
from evomerge.spec import SearchSpec

pytestmark = pytest.mark.slow  # every test starts a Ray cluster: the full suite only

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
SMALL = {**SPEC, "evaluation": {**SPEC["evaluation"], "top_k": 1}, "device": "cpu"}  # CPU workers, GPU or not


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


def search_cmd(spec_file: Path, run: Path, budget: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "evomerge.cli", "search", str(spec_file), "--budget", str(budget), "--run", str(run),
            *extra]


def resume_cmd(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "evomerge.cli", "search", "--resume", str(run), *extra]


def finish(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def kill_session(proc: subprocess.Popen) -> None:
    """End what a killed driver's local Ray leaves behind (its agents outlive a SIGKILLed driver)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def busy_worker(driver: psutil.Process) -> psutil.Process | None:
    """A Ray worker process below ``driver`` that is running a candidate now (Ray titles it so)."""
    for child in driver.children(recursive=True):
        try:
            if " ".join(child.cmdline()).startswith("ray::Worker.run"):
                return child
        except psutil.Error:
            continue
    return None


def assert_exact_budget(run: Path, budget: int) -> list:
    trials = study_of(run).get_trials()
    assert sum(counted(t) for t in trials) == budget
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    logged = [row["trial"] for row in RunFolder(run).log_rows() if row["state"] != "fail"]
    assert len(logged) == len(set(logged)) and set(logged) <= {t.number for t in trials if counted(t)}
    assert (run / "summary.json").exists()
    return trials


def test_two_cpu_workers_finish_exactly_the_budget(tmp_path):
    """Two Ray workers take candidates; with ``subset: answers`` the references answer the pool (spread over the
    workers) before any trial, and every trial is scored on the stored subset (16 documents per task, 6 per
    rung)."""
    answers = {**SMALL, "evaluation": {**SMALL["evaluation"], "search_examples": 16, "screen_examples": 6,
                                       "subset": "answers", "subset_pool": 40}}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(answers))
    run = tmp_path / "two"
    finish(search_cmd(spec_file, run, 8, "--workers", "2"))
    trials = assert_exact_budget(run, 8)
    workers = {row["worker"].split(":")[0] for row in RunFolder(run).log_rows()}
    assert workers == {"ray0", "ray1"}  # both workers took candidates
    study = study_of(run)
    assert study.user_attrs["search_subset_examples"] == 3 * 2 * 40
    chosen = json.loads(study.user_attrs["search_subset"])["doc_ids"]
    assert [len(ids) for ids in chosen.values()] == [16, 16]
    for t in trials:
        if counted(t):
            assert t.user_attrs["examples"] == {"full": 32, "screen": 12}[t.user_attrs["fidelity"]]


def test_joins_a_cluster_started_with_ray_start(spec_file, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    head = [*ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
            "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp]
    started = subprocess.run(head, capture_output=True, text=True, env=ENV, timeout=120)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        run = tmp_path / "cluster"
        finish(search_cmd(spec_file, run, 5, "--workers", "2", "--ray-address", f"127.0.0.1:{port}"))
        assert_exact_budget(run, 5)
    finally:
        subprocess.run([*ray, "stop", "--force"], capture_output=True, env=ENV, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_worker_killed_mid_candidate_is_restarted_and_the_candidate_rerun(spec_file, tmp_path):
    run = tmp_path / "worker-kill"
    proc = subprocess.Popen(search_cmd(spec_file, run, 10, "--workers", "2"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    try:
        driver = psutil.Process(proc.pid)
        assert wait_for(lambda: len(RunFolder(run).log_rows()) >= 2, proc)
        victim = []
        assert wait_for(lambda: victim.append(busy_worker(driver)) or victim[-1] is not None, proc)
        victim[-1].kill()
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
    finally:
        kill_session(proc)
    trials = assert_exact_budget(run, 10)
    died = [t for t in trials if t.state == TrialState.FAIL and "died" in t.user_attrs.get(Attr.ERROR, "")]
    assert 1 <= len(died) <= 2  # the candidate it was running, and the one queued behind it
    for dead in died:
        rerun = [t for t in trials if t.params == dead.params and t.number > dead.number]
        assert rerun and rerun[0].state == TrialState.COMPLETE and rerun[0].user_attrs[Attr.RETRY] == 1


def test_driver_killed_then_resumed_finishes_exactly_the_budget(spec_file, tmp_path):
    run = tmp_path / "driver-kill"
    proc = subprocess.Popen(search_cmd(spec_file, run, 10, "--workers", "2"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    try:
        assert wait_for(lambda: len(RunFolder(run).log_rows()) >= 3, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        kill_session(proc)
    running = [t for t in study_of(run).get_trials() if t.state == TrialState.RUNNING]
    assert running  # the killed driver had candidates in flight
    finish(resume_cmd(run, "--workers", "2"))
    trials = assert_exact_budget(run, 10)
    # each interrupted candidate was queued again (one asked but not yet sampled has nothing to queue)
    assert {t.user_attrs.get(Attr.RERUN_OF) for t in trials} >= {t.number for t in running if t.params}


def test_a_worker_is_restarted_twice_then_dropped(tmp_path):
    """Each death of a worker fails the job it ran and the one queued behind it, and counts once: the
    worker comes back after the first and second deaths and is out of the pool after the third."""
    spec = SearchSpec.model_validate(SMALL)
    executor = RayExecutor(spec, workers=1)
    good = Recipe(merge_method="linear", models=[{"model": "demo:add"}, {"model": "demo:reverse"}])
    job = Job(good, "search", {"demo_add": list(range(30)), "demo_reverse": list(range(30))})
    try:
        for death in range(1, 4):
            executor.submit(0, job)  # waits for the restarted worker when it is still coming back
            _, first = executor.wait_any()
            assert first.error is None and executor.workers() == (0, 1)
            pid = int(first.worker.rsplit("pid", 1)[1])
            executor.submit(1, Job(good, "search"))  # the whole search split: seconds, not milliseconds
            executor.submit(2, job)  # queued behind job 1 on the same worker
            os.kill(pid, signal.SIGKILL)
            outcomes = dict(executor.wait_any() for _ in range(2))
            assert outcomes[1].worker_lost and "died" in outcomes[1].error
            # the queued job fails with it (or, had Ray not yet sent it, runs on the restarted worker)
            assert outcomes[2].worker_lost or outcomes[2].error is None
            if death < 3:
                assert executor.slots() == 2  # restarting: still counted, Ray brings it back
        assert executor.slots() == 0 and executor.workers() == (0, 0)
    finally:
        executor.close()


def test_failing_candidates_come_back_as_failed_outcomes(tmp_path):
    spec = SearchSpec.model_validate(SMALL)
    executor = RayExecutor(spec, workers=2)
    try:
        good = Recipe(merge_method="linear", models=[{"model": "demo:add"}, {"model": "demo:reverse"}])
        foreign = Recipe(merge_method="linear", models=[{"model": "demo:sort"}])
        ids = {"demo_add": [0, 1], "demo_reverse": [0]}
        executor.submit(1, Job(foreign, "search", ids))
        executor.submit(2, Job(good, "search", ids))
        outcomes = dict(executor.wait_any() for _ in range(2))
        assert outcomes[1].result is None and "demo:sort" in outcomes[1].error
        assert outcomes[2].error is None and set(outcomes[2].result.examples["demo_add"]) == {0, 1}
        assert executor.slots() == 4 and executor.busy() == 0  # the failure cost no worker (2 jobs each)
        assert executor.workers() == (0, 2)
    finally:
        executor.close()
