"""A run's study opens in optuna-dashboard: its own WSGI app, called in-process on the run's storage URL (what
``optuna-dashboard URL`` serves), lists the study and shows every trial's params, values and attributes."""

import json
from wsgiref.util import setup_testing_defaults

import optuna_dashboard
import pytest
import yaml
from helpers import SMALL
from optuna.trial import TrialState
from optuna_dashboard._serializer import MAX_ATTR_LENGTH

from evomerge.cli import main
from evomerge.run import Attr, RunFolder, structured_attr

# Enough screening examples that a trial's ``screen`` vector is as long as a real run's (over 1,000 characters
# of JSON), still a few seconds on the demo zoo.
SPEC = {**SMALL, "evaluation": {**SMALL["evaluation"], "search_examples": 60, "screen_examples": 40}}
BUDGET = 5  # the three baselines and two CMA-ES trials
OPTUNA_SYSTEM_ATTRS = ("fixed_params", "cma:")  # enqueue_trial's parameters, CmaEsSampler's state


@pytest.fixture(scope="module")
def dashboard_run(tmp_path_factory):
    """A finished search on the demo zoo, its study as Optuna reads it, and the dashboard's JSON for it."""
    root = tmp_path_factory.mktemp("dashboard")
    spec_file = root / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    run = RunFolder(root / "runs" / "watched")
    assert main(["search", str(spec_file), "--budget", str(BUDGET), "--run", str(run.root)]) == 0
    app = optuna_dashboard.wsgi(run.storage_url())
    studies = get_json(app, "/api/studies")["study_summaries"]
    listed = [s for s in studies if s["study_name"] == run.study_name()]
    detail = get_json(app, f"/api/studies/{listed[0]['study_id']}") if len(listed) == 1 else None
    return run, run.load_study(), studies, detail


def get_json(app, path: str) -> dict:
    """One GET through the WSGI app, no server: its status must be 200 and its body JSON."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": ""}
    setup_testing_defaults(environ)
    started = {}

    def start_response(status, headers, exc_info=None):
        started.update(status=status, headers=dict(headers))

    body = b"".join(app(environ, start_response))
    assert started["status"].startswith("200"), (path, started["status"], body[:300])
    assert started["headers"]["Content-Type"].startswith("application/json")
    return json.loads(body)


def shown(attrs: list[dict]) -> dict[str, str]:
    return {a["key"]: a["value"] for a in attrs}


def test_run_opens_in_dashboard(dashboard_run):
    run, study, studies, detail = dashboard_run
    assert [s["study_name"] for s in studies] == [run.study_name()]
    assert detail is not None and detail["name"] == run.study_name() == study.study_name
    assert detail["directions"] == ["maximize"] and detail["user_attrs"] == []

    trials = study.get_trials(deepcopy=False)
    assert len(trials) == BUDGET and all(t.state == TrialState.COMPLETE for t in trials)
    assert [t["number"] for t in detail["trials"]] == [t.number for t in trials]
    assert [t["number"] for t in detail["best_trials"]] == [study.best_trial.number]
    for frozen, served in zip(trials, detail["trials"], strict=True):
        assert served["state"] == "Complete" and served["values"] == frozen.values
        params = {p["name"]: p for p in served["params"]}
        assert set(params) == set(frozen.params)
        for name, value in frozen.params.items():
            assert params[name]["param_external_value"] == str(value)
            assert params[name]["param_internal_value"] == frozen.distributions[name].to_internal_repr(value)

        # user attributes: every one listed; text as it is, numbers as text, the rest as their JSON (which the
        # dashboard cuts at MAX_ATTR_LENGTH; whether anything is cut is the next test's question)
        attrs = shown(served["user_attrs"])
        assert set(attrs) == set(frozen.user_attrs)
        for key, value in frozen.user_attrs.items():
            assert not isinstance(value, bytes), key
            if isinstance(value, str):
                assert attrs[key] == value, key
            elif isinstance(value, int | float):
                assert attrs[key] == str(value), key
            else:
                assert attrs[key] == json.dumps(value)[:MAX_ATTR_LENGTH], key

        # system attributes: only Optuna's own, all plain JSON; the dashboard shows enqueue_trial's fixed_params
        system = frozen.system_attrs
        assert all(key.startswith(OPTUNA_SYSTEM_ATTRS) for key in system), sorted(system)
        assert json.loads(json.dumps(system)) == system
        fixed = {p["name"]: p["param_external_value"] for p in served["fixed_params"]}
        assert fixed == {name: str(value) for name, value in system.get("fixed_params", {}).items()}
        assert served["constraints"] == []

    union = {a["key"] for a in detail["union_user_attrs"]}
    assert union == {key for t in trials for key in t.user_attrs}


def test_every_user_attribute_reads_back_whole(dashboard_run):
    """The dashboard shows each attribute whole: the recipe and the screening vector (stored as JSON text,
    longer than the 1,024 characters at which it cuts other values) parse back to what the run reads."""
    _, study, _, detail = dashboard_run
    for frozen, served in zip(study.get_trials(deepcopy=False), detail["trials"], strict=True):
        shown_attrs = shown(served["user_attrs"])
        for key, value in frozen.user_attrs.items():
            text = shown_attrs[key]
            assert text == (value if isinstance(value, str) else json.dumps(value)), (frozen.number, key)
        for key in (Attr.RECIPE, Attr.SCREEN):
            if key in frozen.user_attrs:
                assert json.loads(shown_attrs[key]) == structured_attr(frozen, key)
    assert any(len(t.user_attrs.get(Attr.SCREEN, "")) > MAX_ATTR_LENGTH for t in study.get_trials())
