"""Ctrl-C stops a search only at safe points: at once while waiting on workers, later when it lands inside
storage code or a finalizer; the run is left resumable either way."""

import os
import signal

import pytest
import sqlalchemy.orm.loading
from helpers import in_process
from optuna.trial import TrialState

from evomerge.interrupt import CtrlC
from evomerge.launch import prepare_run
from evomerge.run import RunFolder, counted
from evomerge.search import Search
from evomerge.spec import SearchSpec

SPEC = {
    "base_model": "demo:base",
    "models": ["demo:add", "demo:reverse"],
    "space": {"methods": ["linear"], "granularity": "groups:2", "parameters": {"weight": {"low": 0.0, "high": 1.0}}},
    "evaluation": {"include_paths": ["demo"], "tasks": [{"name": "demo_add"}], "search_examples": 20,
                   "screen_examples": None, "top_k": 1},
    "sampler": "random",
    "seed": 5,
}


def press_ctrl_c() -> None:
    signal.raise_signal(signal.SIGINT)  # to this thread: another thread of the process might take a kill()
    for _ in range(1000):  # Python runs the handler at the next bytecode boundary: here, in this frame
        pass


def test_ctrl_c_while_waiting_raises_at_once_and_elsewhere_at_the_next_check():
    before = signal.getsignal(signal.SIGINT)  # Python's default handler, or SIG_IGN in a background job
    with CtrlC() as ctrl_c:
        press_ctrl_c()  # not waiting: remembered only
        assert ctrl_c.pressed
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()
    with CtrlC() as ctrl_c, pytest.raises(KeyboardInterrupt), ctrl_c.waiting():
        press_ctrl_c()
        raise AssertionError("Ctrl-C while waiting on workers must stop at once")
    assert signal.getsignal(signal.SIGINT) is before  # given back as it was


def test_ctrl_c_inside_storage_code_waits_for_the_next_check():
    storage_code = {"__name__": "sqlalchemy.engine.fake", "press_ctrl_c": press_ctrl_c}
    exec("def execute():\n    press_ctrl_c()\n    return 'statement done'", storage_code)
    with CtrlC() as ctrl_c, ctrl_c.waiting():
        assert storage_code["execute"]() == "statement done"  # not cut in the middle
        assert ctrl_c.pressed
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()


def test_ctrl_c_inside_a_finalizer_is_not_lost(capsys):
    """Python swallows a KeyboardInterrupt raised in ``__del__``; ``check`` raises it again."""

    class SignalsOnCollection:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)

    with CtrlC() as ctrl_c, ctrl_c.waiting():
        SignalsOnCollection()  # collected at once: the handler runs inside __del__, whose exception is dropped
        assert ctrl_c.pressed
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()
    assert "KeyboardInterrupt" not in capsys.readouterr().err  # the dropped one is not reported as an error


@pytest.mark.slow
@pytest.mark.parametrize("query", [61, 103, 145])  # each cut a multi-row read under the old handler
def test_ctrl_c_inside_a_storage_query_leaves_a_resumable_run(tmp_path, monkeypatch, query):
    """The CI failure this guards against: Ctrl-C while SQLAlchemy read a query's rows left the SQLite
    statement open, and marking the candidates in flight failed ("database is locked")."""
    spec = SearchSpec.model_validate(SPEC)
    run = RunFolder(tmp_path / "run")
    prepare_run(spec, run, 6, force=False)
    original = sqlalchemy.orm.loading.instances
    count = {"queries": 0}

    def ctrl_c_then_load_rows(cursor, context):
        count["queries"] += 1
        if count["queries"] == query:
            press_ctrl_c()
        return original(cursor, context)

    with CtrlC() as ctrl_c:
        search = Search(spec, run, in_process(spec), ctrl_c)
        monkeypatch.setattr(sqlalchemy.orm.loading, "instances", ctrl_c_then_load_rows)
        with pytest.raises(KeyboardInterrupt):
            search.run_budget(6)
        monkeypatch.undo()
    assert count["queries"] >= query
    trials = run.trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert sum(counted(t) for t in trials) < 6
    Search(spec, run, in_process(spec)).run_budget(6)
    assert sum(counted(t) for t in run.trials()) == 6
