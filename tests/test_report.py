"""`evomerge report` and `evomerge status` over a real (small) demo search."""

import json
import re

import optuna
import pytest
import yaml
from helpers import SPEC

from evomerge.cli import main
from evomerge.report import TrialPoint, best_so_far, layer_parameters
from evomerge.run import STUDY_NAME, RunFolder, counted
from evomerge.spec import Recipe


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    assert main(["search", str(spec), "--budget", "6", "--run", str(root / "small")]) == 0
    return root / "small"


def test_report_numbers_match_the_study(run):
    assert main(["report", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"
    trials = optuna.load_study(study_name=STUDY_NAME, storage=RunFolder(run).default_storage()).get_trials()
    full = [t for t in trials if counted(t) and t.user_attrs["fidelity"] == "full"]
    by_hand = max((t.user_attrs["scores"]["demo_add"] + 2 * t.user_attrs["scores"]["demo_reverse"]) / 3 for t in full)
    assert f"| 6 | {by_hand:.4f} |" in text
    summary = json.loads((run / "summary.json").read_text())
    assert f"## Winner: trial {summary['winner_trial']}" in text
    winner = trials[summary["winner_trial"]]
    for m, model in enumerate(SPEC["models"]):  # groups:2 over 4 layers: layers 0-1 share one weight, 2-3 the other
        low, high = winner.params[f"weight[m{m}][L0-1]"], winner.params[f"weight[m{m}][L2-3]"]
        row = f"| {model} | {low:.3f} | {low:.3f} | {high:.3f} | {high:.3f} |"
        assert row in text, row


def test_status_lists_runs_and_trials(run, capsys):
    assert main(["status", "--runs", str(run.parent)]) == 0
    assert re.search(r"small .* 6/6", capsys.readouterr().out)
    assert main(["status", str(run), "--limit", "3"]) == 0
    assert "6/6 finished" in " ".join(capsys.readouterr().out.split())  # the title wraps with long paths


def test_report_of_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_best_so_far_ignores_screened_trials():
    points = [TrialPoint(0, "screen", 0.9), TrialPoint(1, "full", 0.5), TrialPoint(2, "screen", 0.8),
              TrialPoint(3, "full", 0.4), TrialPoint(4, "full", 0.6)]
    assert best_so_far(points) == [None, 0.5, 0.5, 0.5, 0.6]


def test_layer_parameters_follow_a_gradient():
    recipe = Recipe(merge_method="linear", models=[{"model": "demo:add", "parameters": {"weight": [0.0, 1.0]}},
                                                   {"model": "demo:sort", "parameters": {"weight": 0.5}}])
    per_layer = layer_parameters(recipe)["weight"]
    assert per_layer["demo:add"] == pytest.approx([0, 1 / 3, 2 / 3, 1])  # layer i of 4 at i/3 on the gradient
    assert per_layer["demo:sort"] == pytest.approx([0.5] * 4)
