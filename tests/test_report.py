"""`evomerge report` and `evomerge status` over a real (small) demo search."""

import json
import re
import shutil
import subprocess
import sys

import optuna
import pytest
import yaml
from helpers import CLI_ENV, SPEC, one_line_error

from evomerge.cli import main
from evomerge.layout import LayerLayout
from evomerge.models import open_checkpoint
from evomerge.recipes import Recipe
from evomerge.report import TrialPoint, best_so_far
from evomerge.run import STUDY_NAME, RunFolder, counted


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
    per_layer = recipe.per_layer(LayerLayout.of(open_checkpoint("demo:add")))["weight"]
    assert per_layer["demo:add"] == pytest.approx([0, 1 / 3, 2 / 3, 1])  # layer i of 4 at i/3 on the gradient
    assert per_layer["demo:sort"] == pytest.approx([0.5] * 4)


def _copy_without_models(run, tmp_path):
    """The run folder copied, its spec naming model folders that are gone (moved away after the search)."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    doc = yaml.safe_load((copy / "spec.yaml").read_text())
    doc["spec"]["base_model"] = str(tmp_path / "moved" / "base")
    doc["spec"]["models"] = [str(tmp_path / "moved" / m.removeprefix("demo:")) for m in doc["spec"]["models"]]
    (copy / "spec.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    for stale in ("report.md", "report.png"):
        (copy / stale).unlink(missing_ok=True)
    return copy


@pytest.mark.slow
def test_report_reads_the_run_folder_only_and_imports_no_torch(run, tmp_path):
    assert main(["report", str(run)]) == 0
    copy = _copy_without_models(run, tmp_path)
    script = ("import sys; from pathlib import Path; from evomerge.report import write_report; "
              f"write_report(Path({str(copy)!r})); print(sorted(m for m in ('torch', 'evomerge.checkpoint') "
              "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], env=CLI_ENV, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
    tables = (run / "report.md").read_text().split("```")[-1]  # after the recipe: the per-layer tables
    assert "`weight` per layer" in tables
    assert (copy / "report.md").read_text().split("```")[-1] == tables


def test_report_of_a_run_without_a_layout_record_says_so(run, tmp_path):
    copy = _copy_without_models(run, tmp_path)
    (copy / "layout.json").unlink()
    assert main(["report", str(copy)]) == 0
    text = (copy / "report.md").read_text()
    assert "layout.json is missing" in text and "No per-layer tables" in text and "per layer (mean" not in text
    assert "## Winner: trial" in text


@pytest.mark.parametrize("bad", ["{not json", '{"prefix": "model.layers.", "num_layers": -1}',
                                 '{"prefix": "model.layers.", "num_layers": 4, "extra": 1}'])
def test_report_refuses_a_broken_layout_record(run, tmp_path, capsys, bad):
    copy = _copy_without_models(run, tmp_path)
    (copy / "layout.json").write_text(bad)
    assert main(["report", str(copy)]) == 2
    one_line_error(capsys, "layout.json: not a layer layout")
    assert not (copy / "report.md").exists() and not (copy / "report.png").exists()


def test_a_search_records_the_bases_layout(run):
    recorded = RunFolder(run).read_layout()
    assert recorded == LayerLayout.of(open_checkpoint("demo:base"))
    assert recorded.num_layers == 4 and len(recorded.block_tensors) == 4 * 9
