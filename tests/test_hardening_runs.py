"""Run folders that are bad input, each class refused before compute (one line, exit 2, nothing written) or,
where valid, served: ``--force`` sets the old search aside instead of mixing it in; budgets that fall below the
finished trials or are not positive whole numbers; ``layer_module`` patterns that match no tensor;
``--gpus-per-worker`` without GPUs; ``status --runs`` on something not a folder; storage files that are not
databases or lie on read-only file systems; run files cut or edited by hand; a study cut short while it was
being created; a start that fails late, after the run folder was made; a Ray address where nothing listens.

Most runs here are built by hand (a study with finished trials, a log, a summary), so that no model is scored."""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution

from evomerge.cli import main
from evomerge.launch import check_storage, prepare_run
from evomerge.layout import LayerLayout
from evomerge.recipes import Recipe
from evomerge.run import STUDY_NAME, Attr, RunFolder, as_text, counted, sqlite_url
from evomerge.samplers import open_study
from evomerge.space import make_space
from evomerge.spec import SearchSpec, spec_hash

SMALL = {
    "base_model": "demo:base",
    "models": ["demo:add", "demo:reverse"],
    "space": {"methods": ["linear"], "granularity": "global", "parameters": {"weight": {"low": 0.0, "high": 1.0}}},
    "evaluation": {"include_paths": ["demo"], "tasks": [{"name": "demo_add"}, {"name": "demo_reverse"}],
                   "search_examples": 20, "screen_examples": 8, "top_k": 1},
    "sampler": "random",
    "seed": 3,
    "device": "cpu",
}
RECIPE = Recipe(merge_method="linear", models=[{"model": "demo:add"}, {"model": "demo:reverse"}]).model_dump(
    mode="json", exclude_defaults=True)
ROW = {"validation": 0.5, "test": 0.5, "validation_tasks": {}, "test_tasks": {}}
SUMMARY = {"winner_trial": 0, "winner_recipe": RECIPE, "search_score": {"demo_add": 0.5},
           "table": {"winner (trial 0)": ROW, "uniform average": ROW},
           "margin_vs_uniform_average": {"mean": 0.0, "ci95_low": 0.0, "ci95_high": 0.0}}


def state(root: Path) -> dict[str, str]:
    """Every entry below ``root``: a file with its bytes' hash, a folder as such (proves nothing written)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def refused(argv: list[str], root: Path, capsys, expected: str) -> str:
    """``argv`` exits 2 with one line naming ``expected`` and leaves every entry under ``root`` as it was."""
    before = state(root)
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err
    assert state(root) == before
    return err


def write_spec(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def made_run(root: Path, trials: int = 3, storage: str | None = None, summary: bool = True,
             recipe: str | None = None) -> RunFolder:
    """A finished run as a search leaves it, built by hand: its record, a study of ``trials`` full-fidelity
    trials (the first one's stored recipe ``recipe`` when given), their log and (``summary``) its summary."""
    run = RunFolder(root)
    root.mkdir(parents=True)
    spec = SearchSpec.model_validate(SMALL)
    study_name = f"{root.name}-study" if storage else STUDY_NAME
    run.write_doc(spec.model_dump(mode="json"), spec_hash(spec), max(trials, 1), storage, study_name)
    study = optuna.create_study(study_name=study_name, storage=storage or run.default_storage(),
                                direction="maximize")
    for number in range(trials):
        attrs = {Attr.RECIPE: recipe if recipe is not None and number == 0 else as_text(RECIPE),
                 Attr.SCORES: {"demo_add": 0.5, "demo_reverse": 0.5}, Attr.FIDELITY: "full", Attr.EXAMPLES: 20}
        study.add_trial(optuna.trial.create_trial(value=0.5 + number / 10, params={"w": number / 10},
                                                  distributions={"w": FloatDistribution(0, 1)}, user_attrs=attrs))
        with run.log.open("a") as f:
            f.write(json.dumps({"trial": number, "state": "full", "score": 0.5, "seconds": 0.1}) + "\n")
    if summary:
        run.summary.write_text(json.dumps(SUMMARY))
    return run


# ----------------------------------------------------------------------------- --force: a new search, set aside


@pytest.mark.parametrize("shared", [False, True], ids=["run's own study file", "shared --storage database"])
def test_force_sets_the_old_search_aside(shared, tmp_path):
    db = sqlite_url(tmp_path / "shared.db") if shared else None
    run = made_run(tmp_path / "run", trials=3, storage=db)
    old_study, old_files = run.study_name(), {p.name: p.read_bytes() for p in run.root.iterdir() if p.is_file()}
    other = SearchSpec.model_validate({**SMALL, "seed": 7})
    for spec in (other, SearchSpec.model_validate(SMALL)):  # another spec, and the same one: a new search each time
        prepare_run(spec, run, 2, force=True, storage=db)
        study = open_study(spec, run, make_space(spec, LayerLayout.of(_base())))
        assert study.get_trials() == [] and run.budget() == 2 and not run.log.exists() and not run.summary.exists()
        assert (run.study_name() != old_study) == shared and run.read_doc().get("storage") == db  # own: a new file
    aside = [p for p in run.root.glob("set-aside-*") if (p / "spec.yaml").read_bytes() == old_files["spec.yaml"]]
    assert len(list(run.root.glob("set-aside-*"))) == 2 and len(aside) == 1  # the first search, kept whole
    kept = {p.name: p.read_bytes() for p in aside[0].iterdir()}
    assert {k: v for k, v in kept.items() if k != "study.db"} == {k: v for k, v in old_files.items()
                                                                  if k != "study.db"}
    storage = db or sqlite_url(aside[0] / "study.db")
    assert sum(counted(t) for t in optuna.load_study(study_name=old_study, storage=storage).trials) == 3


def _base():
    from evomerge.models import open_checkpoint

    return open_checkpoint("demo:base")


# ----------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("budget", ["1", "2"])
def test_resume_budget_below_the_finished_trials_is_refused(budget, tmp_path, capsys):
    run = made_run(tmp_path / "run", trials=3)
    refused(["search", "--resume", str(run.root), "--budget", budget], tmp_path, capsys,
            f"--budget {budget} is below the 3 trials")
    spec = write_spec(tmp_path / "same.yaml", SMALL)  # the same spec named again: the same rule
    refused(["search", str(spec), "--run", str(run.root), "--budget", budget], tmp_path, capsys, "is below the 3")


STORED_BUDGETS = [-5, 0, "3", 2.5, True, None, [3]]


@pytest.mark.parametrize("budget", STORED_BUDGETS, ids=repr)
def test_stored_budget_not_a_positive_whole_number_is_refused(budget, tmp_path, capsys):
    run = made_run(tmp_path / "runs" / "run")
    doc = yaml.safe_load(run.spec.read_text())
    run.spec.write_text(yaml.safe_dump({**doc, "budget": budget}))
    for argv in (["search", "--resume", str(run.root)], ["status", str(run.root)], ["report", str(run.root)],
                 ["export", str(run.root), "--out", str(tmp_path / "out")]):
        refused(argv, tmp_path, capsys, "budget")
    assert main(["status", "--runs", str(run.root.parent)]) == 0
    assert "unreadable" in capsys.readouterr().out


def test_stored_max_examples_and_duplicate_keys_are_refused(tmp_path, capsys):
    run = made_run(tmp_path / "run")
    text = run.spec.read_text()
    for bad, expected in ((text + "max_examples: -1\n", "max_examples -1"),
                          (text + "budget: 4\n", "key 'budget' is given twice"),
                          (text.replace("storage: null", "storage: 5"), "storage 5 is not a name")):
        run.spec.write_text(bad)
        refused(["status", str(run.root)], tmp_path, capsys, expected)


# ----------------------------------------------------------------------------- the spec's modules


@pytest.mark.parametrize("modules", [["nosuch"], ["self_attn", "mlpx"], ["layers"], ["self_attn.q_proj_x"]])
def test_layer_module_pattern_matching_no_tensor_is_refused(modules, tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.yaml", {**SMALL, "space": {**SMALL["space"], "granularity": "layer_module",
                                                                   "modules": modules}})
    bad = next(m for m in modules if m not in ("self_attn", "mlp"))
    refused(["search", str(spec), "--budget", "2", "--run", str(tmp_path / "run")], tmp_path, capsys,
            f"space.modules: {bad!r} matches no tensor")


# ----------------------------------------------------------------------------- GPUs per worker, --runs


@pytest.mark.parametrize("executor", ["auto", "ray", "local"])
@pytest.mark.parametrize("gpus", ["1", "2"])
def test_gpus_per_worker_without_gpu_workers_is_refused(executor, gpus, tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.yaml", SMALL)  # device cpu: no worker gets a GPU, on any machine
    expected = "need the Ray executor" if executor == "local" else f"--gpus-per-worker {gpus}: the workers run on CPUs"
    refused(["search", str(spec), "--budget", "2", "--run", str(tmp_path / "run"), "--executor", executor,
             "--gpus-per-worker", gpus], tmp_path, capsys, expected)


@pytest.mark.parametrize("kind", ["a file", "missing", "a link to a file"])
def test_status_runs_that_is_not_a_folder_is_refused(kind, tmp_path, capsys):
    target = tmp_path / "runs"
    if kind != "missing":
        (tmp_path / "file").write_text("not a folder")
        target = tmp_path / "file" if kind == "a file" else target
        if kind == "a link to a file":
            target.symlink_to(tmp_path / "file")
    refused(["status", "--runs", str(target)], tmp_path, capsys, f"--runs {target}")


# ----------------------------------------------------------------------------- storage files


NOT_DATABASES = {"text": b"garbage " * 64, "a PNG": b"\x89PNG\r\n\x1a\n" + bytes(100), "one byte": b"S"}


@pytest.mark.parametrize("kind", [*NOT_DATABASES, "a folder"])
def test_storage_that_is_not_a_database_is_refused(kind, tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.yaml", SMALL)
    db = tmp_path / "study.db"
    if kind == "a folder":
        db.mkdir()
    else:
        db.write_bytes(NOT_DATABASES[kind])
    expected = "is not a file" if kind == "a folder" else "is not a SQLite database"
    refused(["search", str(spec), "--budget", "2", "--run", str(tmp_path / "run"), "--storage", sqlite_url(db)],
            tmp_path, capsys, expected)
    run = made_run(tmp_path / "old")  # a run whose own study file was replaced
    (run.root / "study.db").unlink()
    if kind == "a folder":
        (run.root / "study.db").mkdir()
    else:
        (run.root / "study.db").write_bytes(NOT_DATABASES[kind])
    refused(["search", "--resume", str(run.root)], tmp_path, capsys, "study.db")


def _cut_short(db: Path, stage: str) -> None:
    """The SQLite file a search killed while creating its study leaves, at ``stage`` of the creation."""
    import sqlalchemy
    from optuna.storages._rdb import models

    if stage == "empty file":
        db.write_bytes(b"")
        return
    engine = sqlalchemy.create_engine(sqlite_url(db))
    if stage == "some tables":
        models.BaseModel.metadata.tables["studies"].create(engine)
    else:  # every table (and the version row), no study yet
        optuna.storages.RDBStorage(sqlite_url(db))
    engine.dispose()


@pytest.mark.parametrize("stage", ["empty file", "some tables", "tables, no study"])
def test_study_cut_short_while_created_is_no_study_yet_and_resumable(stage, tmp_path, capsys):
    run = made_run(tmp_path / "run", trials=0, summary=False)
    (run.root / "study.db").unlink()
    _cut_short(run.root / "study.db", stage)
    for argv in (["status", str(run.root)], ["report", str(run.root)],
                 ["export", str(run.root), "--trial", "0", "--out", str(tmp_path / "out")]):
        refused(argv, tmp_path, capsys, "has no study yet")
    check_storage(run.storage_url())  # what --resume checks first passes, and the study it opens is whole
    spec, _ = run.load()
    assert open_study(spec, run, make_space(spec, LayerLayout.of(_base()))).get_trials() == []
    assert main(["status", str(run.root)]) == 0


# ----------------------------------------------------------------------------- run files cut or edited by hand


BAD_SUMMARIES = {
    "cut in half": json.dumps(SUMMARY)[:40],
    "without its table": json.dumps({k: v for k, v in SUMMARY.items() if k != "table"}),
    "without its recipe": json.dumps({k: v for k, v in SUMMARY.items() if k != "winner_recipe"}),
    "without its margin": json.dumps({k: v for k, v in SUMMARY.items() if k != "margin_vs_uniform_average"}),
    "recipe not a recipe": json.dumps({**SUMMARY, "winner_recipe": {"merge_method": "nosuch", "models": []}}),
    "recipe a list": json.dumps({**SUMMARY, "winner_recipe": [1, 2]}),
    "a score as text": json.dumps({**SUMMARY, "table": {"w": {**ROW, "test": "0.5"}}}),
    "a list": "[1, 2]",
}


@pytest.mark.parametrize("case", list(BAD_SUMMARIES))
def test_summary_cut_or_edited_is_refused(case, tmp_path, capsys):
    run = made_run(tmp_path / "run")
    run.summary.write_text(BAD_SUMMARIES[case])
    for argv in (["report", str(run.root)], ["export", str(run.root), "--out", str(tmp_path / "out")],
                 ["status", str(run.root)]):
        refused(argv, tmp_path, capsys, "summary.json")


BAD_STORED_RECIPES = {"not JSON": "{\"merge_method\": ", "JSON, not a recipe": json.dumps({"merge_method": "nosuch"}),
                      "a JSON list": "[1, 2]", "a JSON number": "7"}


@pytest.mark.parametrize("case", list(BAD_STORED_RECIPES))
def test_stored_trial_recipe_edited_is_refused(case, tmp_path, capsys):
    run = made_run(tmp_path / "run", trials=1, summary=False, recipe=BAD_STORED_RECIPES[case])
    for argv in (["export", str(run.root), "--trial", "0", "--out", str(tmp_path / "out")],
                 ["report", str(run.root)], ["status", str(run.root)]):
        refused(argv, tmp_path, capsys, "trial 0")


BAD_LOG_LINES = {"a list": "[1, 2]", "a number": "3", "a string": '"trial"', "seconds as text": '{"seconds": "x"}',
                 "garbage, not last": "{garbage"}


@pytest.mark.parametrize("case", list(BAD_LOG_LINES))
def test_trial_log_line_that_is_not_a_trial_is_refused(case, tmp_path, capsys):
    run = made_run(tmp_path / "run")
    lines = run.log.read_text().splitlines()
    run.log.write_text("\n".join([lines[0], BAD_LOG_LINES[case], *lines[1:]]) + "\n")
    refused(["report", str(run.root)], tmp_path, capsys, "trials.jsonl: line 2")


@pytest.mark.parametrize("name", ["report.md", "report.png"])
def test_report_in_the_way_of_a_folder_writes_nothing(name, tmp_path, capsys):
    run = made_run(tmp_path / "run")
    (run.root / name).mkdir()
    refused(["report", str(run.root)], tmp_path, capsys, f"{name} is in the way")


@pytest.mark.slow
def test_valid_hand_made_run_is_served(tmp_path, capsys):
    """The run the refusals above break, whole (its log's last line cut by a kill): every command serves it."""
    run = made_run(tmp_path / "run")
    with run.log.open("a") as f:
        f.write('{"trial": 3, "sta')
    assert main(["report", str(run.root)]) == 0
    assert (run.root / "report.md").is_file() and (run.root / "report.png").is_file()
    assert main(["status", str(run.root)]) == 0
    assert main(["status", "--runs", str(tmp_path)]) == 0
    assert main(["export", str(run.root), "--out", str(tmp_path / "out")]) == 0


# ----------------------------------------------------------------------------- a late failure takes the start back


class _NoWorkers:
    inputs = "no inputs"

    def slots(self) -> int:
        return 1

    def close(self) -> None:
        pass


LATE_FAILURES = {
    "the workers": "make_executor",
    "the study": "open_study",
    "the record": "prepare_run",
}


@pytest.mark.parametrize("where", list(LATE_FAILURES))
@pytest.mark.parametrize("folder", ["new/nested/run", "existing-empty"])
def test_start_failing_late_leaves_nothing(where, folder, tmp_path, capsys, monkeypatch):
    import evomerge.launch
    import evomerge.search
    from evomerge.errors import SpecError

    spec = write_spec(tmp_path / "spec.yaml", SMALL)
    (tmp_path / "existing-empty").mkdir()

    def fail(*args, **kwargs):
        if where == "the record":  # fails once something is written
            RunFolder(tmp_path / folder).spec.write_text("half")
        raise SpecError(f"{where} failed late")

    monkeypatch.setattr(evomerge.launch, "make_executor",
                        fail if where == "the workers" else lambda *a, **k: _NoWorkers())
    if where != "the workers":
        module = evomerge.search if where == "the study" else evomerge.launch
        monkeypatch.setattr(module, LATE_FAILURES[where], fail)
    refused(["search", str(spec), "--budget", "2", "--run", str(tmp_path / folder)], tmp_path, capsys,
            f"{where} failed late")
    monkeypatch.undo()
    refused(["search", str(write_spec(tmp_path / "seed.yaml", {**SMALL, "seed": 2 ** 40})), "--budget", "2",
             "--run", str(tmp_path / folder)], tmp_path, capsys, "seed")


# ----------------------------------------------------------------------------- read-only file systems

READ_ONLY_SCRIPT = """
import contextlib, io, json, sys
from evomerge.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


@pytest.mark.slow
def test_read_only_file_system_is_refused(tmp_path):
    """Run folders, storage and reports on a file system mounted read-only (a bind mount in a mount namespace
    of a child process, which root cannot write through either)."""
    ro = tmp_path / "ro"
    run = made_run(ro / "run")
    spec = write_spec(tmp_path / "spec.yaml", SMALL)
    cases = [(["search", "--resume", str(run.root)], "is not writable"),
             (["search", str(spec), "--run", str(run.root), "--budget", "4"], "is not writable"),
             (["search", str(spec), "--run", str(ro / "new"), "--budget", "2"], "is not a writable folder"),
             (["search", str(spec), "--run", str(tmp_path / "w"), "--budget", "2", "--storage",
               sqlite_url(ro / "s.db")], "is not writable"),
             (["search", str(spec), "--run", str(tmp_path / "w"), "--budget", "2", "--storage",
               sqlite_url(run.root / "study.db")], "is not writable"),
             (["report", str(run.root)], "not a writable folder")]
    before = state(tmp_path)
    ns = ["unshare", "-m"] if os.getuid() == 0 else ["unshare", "-rm"]
    mount = f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro} && exec \"$0\" -c \"$1\" \"$2\""
    out = subprocess.run([*ns, "sh", "-c", mount, sys.executable, READ_ONLY_SCRIPT,
                          json.dumps([argv for argv, _ in cases])], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    for (argv, expected), (code, err) in zip(cases, json.loads(out.stdout.splitlines()[-1]), strict=True):
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, (argv, err)
    assert state(tmp_path) == before


# ----------------------------------------------------------------------------- Ray addresses


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "no-such-host.invalid"])
def test_ray_address_where_nothing_listens_fails_at_once(host, tmp_path, capsys, monkeypatch):
    import evomerge.ray_executor

    monkeypatch.setattr(evomerge.ray_executor, "RAY_CONNECT_TIMEOUT_S", 3.0)
    address = f"{host}:{_closed_port()}"
    spec = write_spec(tmp_path / "spec.yaml", SMALL)
    before = state(tmp_path)
    capsys.readouterr()
    assert main(["search", str(spec), "--budget", "2", "--run", str(tmp_path / "run"),
                 "--ray-address", address]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == f"joining the Ray cluster at {address} ..." and len(lines) == 2, lines
    assert f"cannot join the Ray cluster at {address}" in lines[1] and "waited at most 3 s" in lines[1]
    assert state(tmp_path) == before
