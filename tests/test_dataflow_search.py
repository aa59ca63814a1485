"""A data-flow search (space.kind: dataflow) on the demo zoo: the space's steps and baselines, bad specs
refused before compute, a search that exports the path it scored, and resume after SIGKILL at events."""

import json
import subprocess
import sys

import optuna
import pytest
import torch
import yaml
from helpers import CLI_ENV, sigkill_at
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.cli import main
from evomerge.demo import TASKS_DIR
from evomerge.evaluate import Evaluator
from evomerge.layout import LayerLayout
from evomerge.models import open_checkpoint
from evomerge.recipes import PathRecipe
from evomerge.run import Attr, RunFolder, counted, structured_attr
from evomerge.space import PathSpace, make_space
from evomerge.spec import SearchSpec, TaskSpec

SPEC = {
    "base_model": "demo:base",
    "models": ["demo:add", "demo:reverse"],
    "space": {"kind": "dataflow", "repeats": 2, "max_length": 6, "scale": {"low": 0.5, "high": 1.5}},
    "evaluation": {"include_paths": ["demo"], "tasks": [{"name": "demo_add"}, {"name": "demo_reverse"}],
                   "search_examples": 40, "screen_examples": None, "top_k": 2},
    "sampler": "tpe",
    "seed": 1,
}
LAYOUT = LayerLayout(prefix="model.layers.", num_layers=4)


def spec_with(**space) -> SearchSpec:
    return SearchSpec.model_validate({**SPEC, "space": {**SPEC["space"], **space}})


def test_steps_run_by_repeat_then_block_then_model_and_the_path_is_cut_at_max_length():
    space = PathSpace(spec_with(max_length=3), LAYOUT)
    assert len(space.steps) == 2 * 4 * 2 and space.steps[:3] == [("demo:add", 0), ("demo:reverse", 0), ("demo:add", 1)]
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    space.sample(trial)
    assert len(trial.params) == 2 * len(space.steps)
    every = {**{f"use[{label}]": 1 for label in space.labels}, **{f"scale[{label}]": 0.75 for label in space.labels}}
    recipe = space.sample(optuna.trial.FixedTrial(every))
    assert [(s.model, s.layer, s.scale) for s in recipe.path] == [("demo:add", 0, 0.75), ("demo:reverse", 0, 0.75),
                                                                  ("demo:add", 1, 0.75)]
    assert recipe.outer == "demo:base"
    none = {**every, **{f"use[{label}]": 0 for label in space.labels}}
    assert [(s.model, s.layer) for s in space.sample(optuna.trial.FixedTrial(none)).path] == [("demo:add", 0)]


def test_baselines_are_each_models_own_blocks_and_outer_follows_the_spec():
    spec = spec_with(outer="demo:reverse", scale=None)
    space = make_space(spec, LAYOUT)
    assert isinstance(space, PathSpace)
    decoded = {label: space.sample(optuna.trial.FixedTrial(params)) for label, params in space.baselines()}
    assert list(decoded) == ["demo:add blocks", "demo:reverse blocks"]
    for label, recipe in decoded.items():
        model = label.split()[0]
        assert isinstance(recipe, PathRecipe) and recipe.outer == "demo:reverse"
        assert [(s.model, s.layer, s.scale) for s in recipe.path] == [(model, i, 1.0) for i in range(4)]


BAD = {
    "weight field": ({"methods": ["ties"]}, "space.methods does not apply to space.kind dataflow"),
    "repeats": ({"repeats": 0}, "space.repeats"),
    "max_length": ({"max_length": 0}, "space.max_length"),
    "scale": ({"scale": {"low": 0.5, "high": 5.0}}, "space.scale [0.5, 5.0] must lie in (0, 4]"),
    "zero scale": ({"scale": {"low": 0.0, "high": 1.0}}, "must lie in (0, 4]"),
    "outer": ({"outer": "demo:sort"}, "space.outer 'demo:sort' is neither base_model nor one of models"),
    "dataflow field on weights": ({"kind": "weights", "repeats": 3}, "space.repeats does not apply to space.kind "
                                                                    "weights"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_dataflow_spec_fails_before_compute(case, tmp_path, capsys):
    change, message = BAD[case]
    doc = {**SPEC, "space": {**SPEC["space"], **change}}
    if case == "dataflow field on weights":
        doc["space"] = {"kind": "weights", "repeats": 3}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    run = tmp_path / "run"
    assert main(["search", str(path), "--budget", "3", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not run.exists()


@pytest.mark.slow
def test_dataflow_search_exports_and_reports_the_path_it_scored(tmp_path, capsys):
    spec = tmp_path / "dfs.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    run = RunFolder(tmp_path / "run")
    assert main(["search", str(spec), "--budget", "6", "--run", str(run.root)]) == 0
    trials = run.trials()
    assert [t.user_attrs.get("baseline") for t in trials[:2]] == ["demo:add blocks", "demo:reverse blocks"]
    summary = json.loads(run.summary.read_text())
    recipe = PathRecipe.model_validate(summary["winner_recipe"])
    out = tmp_path / "merged"
    assert main(["export", str(run.root), "--out", str(out)]) == 0
    assert open_checkpoint(str(out)).num_layers == len(recipe.path)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tasks = [TaskSpec(name="demo_add"), TaskSpec(name="demo_reverse")]
    evaluator = Evaluator(model, AutoTokenizer.from_pretrained(out), tasks, [TASKS_DIR])
    fresh = evaluator.evaluate("search", {"demo_add": range(40), "demo_reverse": range(40)}).scores
    assert fresh == pytest.approx(trials[summary["winner_trial"]].user_attrs["scores"], abs=1e-9)
    assert summary["table"]["uniform average"]["test"] >= 0  # the weight-space references ran on the same worker
    capsys.readouterr()
    assert main(["status", str(run.root)]) == 0
    assert f"path of {len(recipe.path)} blocks" in capsys.readouterr().out
    assert main(["report", str(run.root)]) == 0
    report = (run.root / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and line.count("|") == 5][1:]
    assert [r.split(" | ")[1:3] for r in rows] == [[s.model, str(s.layer)] for s in recipe.path]


@pytest.mark.slow
def test_dataflow_resume_after_sigkill_at_events(tmp_path):
    spec = tmp_path / "dfs.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    run = RunFolder(tmp_path / "killed")
    cmd = [sys.executable, "-m", "evomerge.cli", "search", str(spec), "--budget", "8", "--run", str(run.root)]
    for attempt in range(3):
        lines = len(run.log_rows())
        assert sigkill_at(cmd if attempt == 0 else [*cmd[:4], "--resume", str(run.root)],
                          lambda _, before=lines: len(run.log_rows()) > before)
    final = subprocess.run([*cmd[:4], "--resume", str(run.root)], capture_output=True, text=True, env=CLI_ENV)
    assert final.returncode == 0, final.stderr[-3000:]
    trials = run.trials()
    assert sum(counted(t) for t in trials) == 8
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    logged = {row["trial"]: row for row in run.log_rows() if row["state"] != "fail"}
    for t in trials:  # what the log says was scored is what the study holds, path and score
        if counted(t) and t.number in logged and "duplicate_of" not in t.user_attrs:
            assert logged[t.number]["recipe"] == structured_attr(t, Attr.RECIPE)
            assert logged[t.number]["score"] == t.values[0]


CHAIN = {**SPEC, "space": {"methods": ["linear"], "granularity": "global"}, "sampler": "random",
         "then": {"space": SPEC["space"], "sampler": "tpe"}}


@pytest.mark.slow
def test_ps_then_dfs_in_one_command_and_resumed_in_its_second_stage(tmp_path, capsys):
    """The first stage's winner is exported into the run folder and joins the second stage's pool; a SIGKILL
    in the second stage is resumed from the top folder without running the first stage again."""
    spec = tmp_path / "chain.yaml"
    spec.write_text(yaml.safe_dump(CHAIN))
    run = RunFolder(tmp_path / "chain")
    stage = RunFolder(run.root / "dataflow")
    cmd = [sys.executable, "-m", "evomerge.cli", "search", str(spec), "--budget", "5", "--run", str(run.root)]
    assert sigkill_at(cmd, lambda _: len(stage.log_rows()) >= 1)
    first = [t.number for t in run.trials()]
    assert sum(counted(t) for t in run.trials()) == 5 and run.summary.exists()
    final = subprocess.run([*cmd[:4], "--resume", str(run.root)], capture_output=True, text=True, env=CLI_ENV)
    assert final.returncode == 0, final.stderr[-3000:]
    assert [t.number for t in run.trials()] == first  # the first stage did not run again
    winner = (run.root / "ps-winner").resolve()
    stage_spec, budget = stage.load()
    assert budget == 5 and stage_spec.models == [str(winner), "demo:add", "demo:reverse"]
    assert stage_spec.space.kind == "dataflow" and stage_spec.then is None
    assert stage_spec.space.outer == str(winner)  # the winner's own blocks (a baseline) are the winner itself
    assert sum(counted(t) for t in stage.trials()) == 5 and stage.summary.exists()
    assert stage.trials()[0].user_attrs["baseline"] == f"{winner} blocks"
    ps = json.loads(run.summary.read_text())["winner_recipe"]
    assert yaml.safe_load((winner / "evomerge_recipe.yaml").read_text()) == ps
    changed = tmp_path / "changed.yaml"  # the first stage's winner is in use: its spec cannot change now
    changed.write_text(yaml.safe_dump({**CHAIN, "space": {"methods": ["linear"], "granularity": "layer"}}))
    before = run.spec.read_text()
    assert main(["search", str(changed), "--budget", "5", "--run", str(run.root), "--force"]) == 2
    assert "has begun its then stage with another spec" in capsys.readouterr().err
    assert run.spec.read_text() == before


def test_then_needs_a_dataflow_space_after_a_weight_space(tmp_path, capsys):
    for then, message in (({"space": {"kind": "weights"}}, "then.space.kind must be dataflow"),
                          ({"space": {"kind": "dataflow"}, "sampler": "nsga2"}, "then.sampler"),
                          ({"space": {"kind": "dataflow", "outer": "demo:sort"}},
                           "then: space.outer 'demo:sort' is neither base_model nor one of models")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**CHAIN, "then": then}))
        assert main(["search", str(path), "--budget", "3", "--run", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    path.write_text(yaml.safe_dump({**SPEC, "then": {"space": SPEC["space"]}}))
    assert main(["search", str(path), "--budget", "3", "--run", str(tmp_path / "run")]) == 2
    assert "space.kind must be weights" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_paths_stop_at_the_longest_a_recipe_takes_and_the_default_sampler_suits_the_space():
    from evomerge.recipes import MAX_PATH_LENGTH
    from evomerge.samplers import default_sampler

    spec = spec_with(repeats=1, max_length=None, scale=None)
    space = PathSpace(spec, LayerLayout(prefix="model.layers.", num_layers=600))
    every = {f"use[{label}]": 1 for label in space.labels}
    assert len(space.steps) == 1200 and len(space.sample(optuna.trial.FixedTrial(every)).path) == MAX_PATH_LENGTH
    assert default_sampler(spec.model_copy(update={"sampler": None})) == "tpe"  # 0/1 decisions alone
    assert default_sampler(SearchSpec.model_validate({**SPEC, "sampler": None})) == "cmaes"
