"""Run folders through the command line: a recorded --storage URL used by every command, reading commands
that write nothing, broken runs and bad arguments as one line with exit 2, one search per run at a time,
Ctrl-C with a resumable run."""

import os
import shutil
import signal
import subprocess
import sys

import optuna
import pytest
import torch
import yaml
from helpers import SMALL, one_line_error, tree_digest, wait_for
from optuna.trial import TrialState

from evomerge.cli import main
from evomerge.run import STUDY_NAME, RunFolder, counted, sqlite_url


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


@pytest.fixture(scope="module")
def external_run(tmp_path_factory, spec_file):
    """A finished run whose study lives outside the run folder (--storage)."""
    root = tmp_path_factory.mktemp("ext")
    db = root / "elsewhere" / "study.db"
    db.parent.mkdir()
    run = root / "runs" / "[v2] ext"
    assert main(["search", str(spec_file), "--budget", "3", "--run", str(run), "--storage", sqlite_url(db)]) == 0
    return run, db






@pytest.mark.slow
def test_recorded_storage_serves_every_command(external_run, tmp_path, capsys):
    run, db = external_run
    assert not (run / "study.db").exists() and db.exists()
    capsys.readouterr()
    assert main(["status", str(run)]) == 0
    assert "3/3 finished" in " ".join(capsys.readouterr().out.split())
    assert main(["search", "--resume", str(run), "--budget", "4"]) == 0
    assert sum(counted(t) for t in RunFolder(run).trials()) == 4 and not (run / "study.db").exists()
    assert main(["report", str(run)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").exists()
    capsys.readouterr()
    other = tmp_path / "other.db"
    assert main(["search", "--resume", str(run), "--storage", sqlite_url(other)]) == 2
    one_line_error(capsys, "keeps its study at")
    assert not other.exists()


@pytest.mark.slow
def test_resume_cannot_move_a_run_to_another_storage(tmp_path, spec_file, capsys):
    run = tmp_path / "run"
    assert main(["search", str(spec_file), "--budget", "2", "--run", str(run)]) == 0
    capsys.readouterr()
    before = tree_digest(tmp_path)
    other = tmp_path / "other.db"
    assert main(["search", "--resume", str(run), "--budget", "3", "--storage", sqlite_url(other)]) == 2
    one_line_error(capsys, f"keeps its study at {sqlite_url(run / 'study.db')}")
    assert tree_digest(tmp_path) == before


def test_reading_a_recorded_storage_that_is_gone_creates_nothing(external_run, tmp_path, capsys):
    run, db = external_run
    moved = tmp_path / "copy"
    shutil.copytree(run, moved)
    doc = yaml.safe_load((moved / "spec.yaml").read_text())
    doc["storage"] = sqlite_url(tmp_path / "gone" / "study.db")
    (moved / "spec.yaml").write_text(yaml.safe_dump(doc))
    before = tree_digest(tmp_path)
    for argv in (["status", str(moved)], ["report", str(moved)], ["search", "--resume", str(moved)]):
        assert main(argv) == 2
        one_line_error(capsys, "")
    assert tree_digest(tmp_path) == before and not (tmp_path / "gone").exists()


def test_error_text_is_printed_literally(external_run, capsys):
    run, _ = external_run
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(run.parent / "out"), "--trial", "999"]) == 2
    one_line_error(capsys, f"trial 999 of {run} has no evaluated recipe")  # "[v2]" is not eaten as markup


def test_reading_commands_write_nothing(tmp_path, spec_file, capsys):
    run = tmp_path / "runs" / "no-study"
    run.mkdir(parents=True)
    (run / "spec.yaml").write_text(yaml.safe_dump({"spec_hash": "x", "budget": 3, "spec": SMALL}))
    before = tree_digest(tmp_path)
    for argv in (["status", str(run)], ["report", str(run)], ["export", str(run), "--out", str(tmp_path / "o"),
                                                               "--trial", "0"]):
        assert main(argv) == 2
        one_line_error(capsys, "has no study yet")
    assert main(["status", "--runs", str(tmp_path / "runs")]) == 0
    assert "unreadable" in capsys.readouterr().out
    assert tree_digest(tmp_path) == before


BROKEN_RUNS = {
    "spec.yaml not YAML": ({"spec.yaml": "budget: [3"}, "spec.yaml: unreadable"),
    "spec.yaml without a spec": ({"spec.yaml": "budget: 3\n"}, "not a run's spec.yaml"),
    "stored spec invalid": ({"spec.yaml": yaml.safe_dump({"budget": 3, "spec": {"base_model": "demo:base"}})},
                            "the stored spec is invalid"),
    "study not SQLite": ({"spec.yaml": yaml.safe_dump({"budget": 3, "spec": SMALL}), "study.db": "garbage" * 100},
                         "cannot read its study"),
    "summary not JSON": ({"spec.yaml": yaml.safe_dump({"budget": 3, "spec": SMALL}), "summary.json": "{"},
                         "summary.json: unreadable"),
}


@pytest.mark.parametrize("case", list(BROKEN_RUNS))
def test_broken_run_is_one_line_for_every_command(case, tmp_path, capsys):
    files, expected = BROKEN_RUNS[case]
    run = tmp_path / "runs" / "broken"
    run.mkdir(parents=True)
    for name, text in files.items():
        (run / name).write_text(text)
    if "summary.json" in files:  # a readable study, so that the summary is what breaks
        optuna.create_study(study_name=STUDY_NAME, storage=sqlite_url(run / "study.db"))
    before = tree_digest(tmp_path)
    assert main(["report", str(run)]) == 2
    one_line_error(capsys, expected)
    for argv in (["status", str(run)], ["search", "--resume", str(run)], ["export", str(run), "--out",
                                                                          str(tmp_path / "o")]):
        assert main(argv) == 2, argv
        one_line_error(capsys, "")
    assert main(["status", "--runs", str(tmp_path / "runs")]) == 0
    assert "unreadable" in capsys.readouterr().out
    assert tree_digest(tmp_path) == before


BAD_ARGS = {
    "budget zero": (["--budget", "0"], "0 is not a positive whole number"),
    "budget not a number": (["--budget", "many"], "'many' is not a whole number"),
    "unknown storage scheme": (["--budget", "2", "--storage", "nosuchdb://x/y"], "--storage nosuchdb://x/y"),
    "storage without a driver": (["--budget", "2", "--storage", "postgresql://u@127.0.0.1:1/db"], "--storage"),
    "storage folder missing": (["--budget", "2", "--storage", "sqlite:////no/such/folder/s.db"],
                               "folder /no/such/folder does not exist"),
    "local with workers": (["--budget", "2", "--executor", "local", "--workers", "2"], "need the Ray executor"),
    "too many CPU workers": (["--budget", "2", "--workers", str(os.cpu_count() + 1)],
                             f"{os.cpu_count() + 1} CPU workers need at least {os.cpu_count() + 1} CPUs"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_search_arguments_fail_before_anything_is_written(case, tmp_path, spec_file, capsys):
    extra, expected = BAD_ARGS[case]
    run = tmp_path / "run"
    assert main(["search", str(spec_file), "--run", str(run), *extra]) == 2
    one_line_error(capsys, expected)
    assert list(tmp_path.iterdir()) == []


def test_run_that_is_a_file_and_device_that_is_missing(tmp_path, spec_file, capsys):
    run = tmp_path / "run"
    run.write_text("not a folder")
    assert main(["search", str(spec_file), "--budget", "2", "--run", str(run)]) == 2
    one_line_error(capsys, "is a file")
    gpu = tmp_path / "gpu.yaml"
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (cuda:0 without one)
    gpu.write_text(yaml.safe_dump({**SMALL, "device": missing}))
    assert main(["search", str(gpu), "--budget", "2", "--run", str(tmp_path / "r")]) == 2
    one_line_error(capsys, f"device '{missing}'")
    assert not (tmp_path / "r").exists()


def test_second_search_on_a_live_run_is_refused(tmp_path, spec_file, capsys):
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    held = run.lock()  # another live process searching this run
    try:
        assert main(["search", str(spec_file), "--budget", "2", "--run", str(run.root)]) == 2
        one_line_error(capsys, "is being searched by another process")
        assert not run.spec.exists()
    finally:
        held.close()


@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_and_a_resumable_run(tmp_path, spec_file):
    run = RunFolder(tmp_path / "run")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "evomerge.cli", "search", str(spec_file), "--budget", "12", "--run", str(run.root)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    assert wait_for(lambda: len(run.log_rows()) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"evomerge search --resume {run.root}" in err.strip().splitlines()[-1]
    trials = run.trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t.number for t in trials if t.user_attrs.get("error") == "interrupted"]
    assert len(interrupted) <= 1  # the candidate in flight (if the signal came during one), queued again
    assert main(["search", "--resume", str(run.root)]) == 0
    trials = run.trials()
    assert sum(counted(t) for t in trials) == 12
    reruns = {t.user_attrs.get("rerun_of") for t in trials if t.state == TrialState.COMPLETE}
    assert set(interrupted) <= reruns


@pytest.mark.slow
def test_max_examples_stops_the_search_and_holds_on_resume(spec_file, tmp_path, capsys):
    """--max-examples: no candidate starts once the trials have scored that many examples (the one in flight
    finishes: in process, the last one crosses the line), the search still ends with its hold-out check; the
    cap is recorded, so a plain --resume scores nothing more."""
    import json

    from evomerge.run import Attr, examples_scored

    run = RunFolder(tmp_path / "run")
    assert main(["search", str(spec_file), "--budget", "10", "--max-examples", "50", "--run", str(run.root)]) == 0
    trials = run.trials()
    scored = examples_scored(run.load_study())
    last = max((t for t in trials if Attr.EXAMPLES in t.user_attrs), key=lambda t: t.number)
    assert scored >= 50 > scored - last.user_attrs[Attr.EXAMPLES]
    assert sum(counted(t) for t in trials) < 10 and run.max_examples() == 50
    assert json.loads(run.summary.read_text())["examples_scored"] == scored
    capsys.readouterr()
    assert main(["status", str(run.root)]) == 0
    assert f"{scored} examples scored (at most 50)" in " ".join(capsys.readouterr().out.split())
    assert main(["search", "--resume", str(run.root)]) == 0
    assert examples_scored(run.load_study()) == scored
