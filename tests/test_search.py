"""The search end to end on the demo zoo: budget, resume after SIGKILL, export, bad specs."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import CLI_ENV, SPEC, in_process, sigkill_at, study_of
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.cli import main
from evomerge.demo import TASKS_DIR
from evomerge.evaluate import Evaluator
from evomerge.launch import prepare_run
from evomerge.run import RunFolder, counted
from evomerge.search import Search
from evomerge.spec import SearchSpec, TaskSpec


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path




@pytest.mark.slow
def test_search_resume_and_export(spec_file, tmp_path, capsys):
    run = tmp_path / "runs" / "demo"
    assert main(["search", str(spec_file), "--budget", "7", "--run", str(run)]) == 0
    trials = study_of(run).get_trials()
    assert sum(counted(t) for t in trials) == 7
    assert [t.user_attrs.get("baseline") for t in trials[:3]] == ["uniform average", "demo:add alone",
                                                                  "demo:reverse alone"]
    log = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    assert len(log) == 7 and all(row["worker"].startswith("in-process") for row in log)
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["table"]) >= {"uniform average", "parent demo:add", "parent demo:reverse"}
    assert "winner: trial" in capsys.readouterr().out

    assert main(["search", "--resume", str(run), "--budget", "9"]) == 0
    assert sum(counted(t) for t in study_of(run).get_trials()) == 9

    out = tmp_path / "merged"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert {"README.md", "mergekit_config.yml", "evomerge_recipe.yaml", "config.json"} <= {p.name for p in
                                                                                          out.iterdir()}
    winner = json.loads((run / "summary.json").read_text())["winner_trial"]
    recorded = study_of(run).trials[winner].user_attrs["scores"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tasks = [TaskSpec(name="demo_add"), TaskSpec(name="demo_reverse")]
    evaluator = Evaluator(model, AutoTokenizer.from_pretrained(out), tasks, [TASKS_DIR])
    fresh = evaluator.evaluate("search", {"demo_add": range(40), "demo_reverse": range(40)}).scores
    assert fresh == pytest.approx(recorded, abs=1e-9)


@pytest.mark.slow
def test_duplicate_recipes_are_not_counted(tmp_path):
    spec = SearchSpec.model_validate({**SPEC, "space": {**SPEC["space"], "granularity": "global"}})
    run = RunFolder(tmp_path / "run")
    prepare_run(spec, run, 4, force=False)
    search = Search(spec, run, in_process(spec))
    search.seed_baselines()
    search.study.enqueue_trial({"weight[m0][all]": 0.25, "weight[m1][all]": 0.75})
    search.study.enqueue_trial({"weight[m0][all]": 0.25, "weight[m1][all]": 0.75})
    search.run_budget(5)
    trials = search.study.get_trials()
    assert len(trials) == 6 and sum(counted(t) for t in trials) == 5
    assert trials[4].user_attrs["duplicate_of"] == 3 and trials[4].values == trials[3].values








@pytest.mark.slow
def test_sigkill_four_times_at_events_then_resume(spec_file, tmp_path):
    """SIGKILL at events, each kind twice, of a new run and of resumed ones: every other start as soon as it holds
    the run's lock (loading), the others right after one more trial line is written; then a resume finishes
    exactly the budget."""
    run = RunFolder(tmp_path / "killed")
    cmd = [sys.executable, "-m", "evomerge.cli", "search", str(spec_file), "--budget", "20", "--run", str(run.root)]
    kills = 0
    for attempt in range(4):
        lines = len(run.log_rows())
        if attempt % 2 == 0:
            def event(proc):  # the run's lock taken by this process (and the run recorded, on the first)
                return run.spec.exists() and run.lock_file.exists() and \
                    run.lock_file.read_text().strip() == str(proc.pid)
        else:
            def event(_, before=lines):
                return len(run.log_rows()) > before
        kills += sigkill_at(cmd if attempt == 0 else [*cmd[:4], "--resume", str(run.root)], event)
    assert kills == 4
    final = subprocess.run([*cmd[:4], "--resume", str(run.root)], capture_output=True, text=True, env=CLI_ENV)
    assert final.returncode == 0, final.stderr[-3000:]
    trials = study_of(run.root).get_trials()
    assert sum(counted(t) for t in trials) == 20
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    logged = [row["trial"] for row in run.log_rows() if row["state"] != "fail"]
    assert len(logged) == len(set(logged)) and set(logged) <= {t.number for t in trials if counted(t)}
    assert (run.root / "summary.json").exists()


def bad(tmp_path, **changes):
    doc = json.loads(json.dumps(SPEC))
    for key, value in changes.items():
        target = doc
        *path, last = key.split("__")
        for p in path:
            target = target[p]
        target[last] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


BAD_SPECS = {
    "missing model": ({"models": ["demo:add", "/no/such/model"]}, "model folder not found: /no/such/model"),
    "unknown demo model": ({"base_model": "demo:nope"}, "no demo model 'nope'"),
    "unknown method": ({"space__methods": ["linear", "tiez"]}, "unknown merge method 'tiez'"),
    "granularity": ({"space__granularity": "layers:3"}, "space.granularity 'layers:3' is not"),
    "range order": ({"space__parameters": {"weight": {"low": 1.0, "high": 0.5}}}, "range low 1.0 must be below"),
    "range limits": ({"space__methods": ["ties"], "space__parameters": {"density": {"low": 0.2, "high": 1.5}}},
                     "density=1.5 is outside [0.0, 1.0]"),
    "foreign parameter": ({"space__parameters": {"t": {"low": 0, "high": 1}}}, "no chosen method takes parameter 't'"),
    "cmaes categorical": ({"space__methods": ["linear", "ties"]}, "sampler cmaes cannot choose among methods"),
    "unknown task": ({"evaluation__tasks": [{"name": "demo_multiply"}]}, "task 'demo_multiply' not found"),
    "task folder": ({"evaluation__include_paths": ["/no/tasks"]}, "task folder not found: /no/tasks"),
    "unknown key": ({"evaluation__subsample": 3}, "evaluation.subsample: Extra inputs are not permitted"),
    "fidelity order": ({"evaluation__screen_examples": 50}, "screen_examples must be below search_examples"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec_fails_before_compute(case, tmp_path, capsys):
    changes, expected = BAD_SPECS[case]
    spec = bad(tmp_path, **changes)
    run = tmp_path / "run"
    assert main(["search", str(spec), "--budget", "3", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not run.exists()


@pytest.mark.slow
def test_other_spec_on_existing_run_is_refused(spec_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["search", str(spec_file), "--budget", "3", "--run", str(run)]) == 0
    before = (run / "spec.yaml").read_text()
    other = bad(tmp_path, seed=4)
    assert main(["search", str(other), "--budget", "3", "--run", str(run)]) == 2
    assert "made with a different spec" in capsys.readouterr().err
    assert (run / "spec.yaml").read_text() == before
