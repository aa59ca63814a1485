"""The run folder and its study: what a search leaves on disk and how every command reads it.

A run folder holds ``spec.yaml`` (the resolved spec, its hash, the budget and the study's storage URL),
``layout.json`` (the base's blocks: what the report needs of the model), ``trials.jsonl`` (one line per
finished or failed trial), ``summary.json`` (the validated winner) and, by default, ``study.db`` (the Optuna
study). Reading commands (status, report, export's lookup) open the
study read-only and never create anything. This module imports neither torch nor the search stack.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict, ValidationError

from evomerge.errors import SpecError
from evomerge.files import atomic_write_text
from evomerge.layout import LayerLayout
from evomerge.yaml_io import load_yaml

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from evomerge.recipes import RecipeForm
    from evomerge.spec import SearchSpec

STUDY_NAME = "evomerge"
STUDY_FILE = "study.db"


class Attr:
    """Names of the user attributes a search stores on each trial."""

    RECIPE = "recipe"  # the evaluated recipe (JSON text)
    RECIPE_HASH = "recipe_hash"  # detects duplicates
    SCORES = "scores"  # per-task search scores
    FIDELITY = "fidelity"  # "full" or "screen"
    SCREEN = "screen"  # weighted per-example answers on the screening subset (JSON text)
    RUNGS = "rungs"  # the same on each later rung of a race (JSON text: a list of vectors)
    BASELINE = "baseline"  # label of an enqueued baseline recipe
    DUPLICATE_OF = "duplicate_of"  # number of the trial whose score a duplicate reuses
    RETRY = "retry"  # how often this candidate's parameters were re-queued after a failure
    RERUN_OF = "rerun_of"  # the interrupted trial this one runs again
    ERROR = "error"  # why a trial failed
    EXAMPLES = "examples"  # examples scored for this trial (screen + rest)
    # the study's own: an answer-stratified search subset (JSON text) and the examples that choosing it scored
    SUBSET = "search_subset"
    SUBSET_EXAMPLES = "search_subset_examples"


def as_text(value: Any) -> str:
    """A structured attribute as compact JSON text: optuna-dashboard shows text whole, while it cuts any
    other value's JSON at 1024 characters, mid-value (a recipe or a screening vector is longer)."""
    return json.dumps(value, separators=(",", ":"))


def structured_attr(trial: FrozenTrial, name: str, default: Any = None) -> Any:
    """A user attribute stored by ``as_text`` (or, by runs written before it, as the value itself)."""
    value = trial.user_attrs.get(name, default)
    return json.loads(value) if isinstance(value, str) else value


def stored_recipe(value: Any, where: str) -> RecipeForm:
    """A recipe as a run stores it (a trial's JSON text, a summary's mapping); SpecError naming ``where`` when
    a cut or a hand edit left something that is not a recipe."""
    from evomerge.recipes import parse_recipe
    from evomerge.yaml_io import describe_error

    try:
        data = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as err:
        raise SpecError(f"{where}: the stored recipe is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{where}: not a recipe (a mapping)")
    try:
        return parse_recipe(data)
    except ValidationError as err:
        raise SpecError(f"{where}: not a valid recipe ({describe_error(err)})") from None
    except SpecError as err:  # an unknown method, a parameter it does not take
        raise SpecError(f"{where}: not a valid recipe ({err})") from None


class _Row(BaseModel):
    model_config = ConfigDict(strict=True)
    validation: float
    test: float


class _Margin(BaseModel):
    model_config = ConfigDict(strict=True)
    mean: float
    ci95_low: float
    ci95_high: float


class _Summary(BaseModel):
    """What every reader of summary.json (status, report, export, a then stage) takes from it."""

    model_config = ConfigDict(strict=True, extra="allow")
    winner_trial: int
    winner_recipe: dict[str, Any]
    table: dict[str, _Row]
    margin_vs_uniform_average: _Margin


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def examples_scored(study: optuna.Study) -> int:
    """Examples a search scored: its trials' (screen and rest; a failed or duplicate trial scored none) and the
    reference models' answers that chose its subset."""
    return study.user_attrs.get(Attr.SUBSET_EXAMPLES, 0) + sum(t.user_attrs.get(Attr.EXAMPLES, 0)
                                                                for t in study.get_trials(deepcopy=False))


def counted(trial: FrozenTrial) -> bool:
    """Whether a trial uses up budget: a finished evaluation that was not a duplicate."""
    return trial.state == TrialState.COMPLETE and Attr.DUPLICATE_OF not in trial.user_attrs


def sqlite_url(path: Path, read_only: bool = False) -> str:
    path = path.resolve()
    return f"sqlite:///file:{path}?mode=ro&uri=true" if read_only else f"sqlite:///{path}"


def sqlite_file(url: URL) -> Path | None:
    """The database file a SQLite URL names (its ``file:`` URI form included); None for an in-memory one."""
    database = url.database or ""
    if database in ("", ":memory:"):
        return None
    return Path(database.removeprefix("file:").split("?")[0]).expanduser()


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def spec(self) -> Path:
        return self.root / "spec.yaml"

    @property
    def log(self) -> Path:
        return self.root / "trials.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def layout_file(self) -> Path:
        return self.root / "layout.json"

    @property
    def lock_file(self) -> Path:
        return self.root / ".search.lock"

    def default_storage(self) -> str:
        return sqlite_url(self.root / STUDY_FILE)

    # ------------------------------------------------------------------ spec.yaml

    def read_doc(self) -> dict[str, Any]:
        """spec.yaml as written by ``write_doc``; SpecError when the folder is not a readable run."""
        if self.root.exists() and not self.root.is_dir():
            raise SpecError(f"{self.root} is a file, not a run folder")
        if not self.spec.is_file():
            raise SpecError(f"{self.root} is not a run folder (no spec.yaml)")
        try:
            doc = load_yaml(self.spec.read_text(), f"{self.spec}: unreadable")
        except (UnicodeDecodeError, OSError) as err:
            raise SpecError(f"{self.spec}: unreadable ({str(err).splitlines()[0]})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict) or "budget" not in doc:
            raise SpecError(f"{self.spec}: not a run's spec.yaml (needs a spec mapping and an integer budget)")
        for key in ("budget", "max_examples"):
            if (key == "budget" or doc.get(key) is not None) and not _positive_int(doc.get(key)):
                raise SpecError(f"{self.spec}: {key} {doc.get(key)!r} is not a positive whole number")
        for key in ("storage", "study"):
            if doc.get(key) is not None and not (isinstance(doc[key], str) and doc[key].strip()):
                raise SpecError(f"{self.spec}: {key} {doc[key]!r} is not a name")
        return doc

    def load(self) -> tuple[SearchSpec, int]:
        """The spec and budget the run was made with."""
        from pydantic import ValidationError

        from evomerge.spec import SearchSpec

        doc = self.read_doc()
        try:
            return SearchSpec.model_validate(doc["spec"]), doc["budget"]
        except (ValidationError, SpecError) as err:
            raise SpecError(f"{self.spec}: the stored spec is invalid ({str(err).splitlines()[0]})") from None

    def budget(self) -> int:
        return self.read_doc()["budget"]

    def storage_url(self) -> str:
        """The study's storage: the URL recorded at creation (``--storage``), else the run's SQLite file."""
        return self.read_doc().get("storage") or self.default_storage()

    def study_name(self) -> str:
        """The study's name in its storage: ``evomerge`` in the run's own file; a name of its own in a
        ``--storage`` database, which other runs may share."""
        return self.read_doc().get("study") or STUDY_NAME

    def max_examples(self) -> int | None:
        """The example budget the run was given (``--max-examples``), if any."""
        return self.read_doc().get("max_examples")

    def write_doc(self, spec_doc: dict[str, Any], digest: str, budget: int, storage: str | None,
                  study: str, max_examples: int | None = None) -> None:
        doc = {"spec_hash": digest, "budget": budget, "storage": storage, "study": study, "spec": spec_doc}
        if max_examples is not None:
            doc["max_examples"] = max_examples
        atomic_write_text(self.spec, yaml.safe_dump(doc, sort_keys=False))

    def write_layout(self, layout: LayerLayout) -> None:
        atomic_write_text(self.layout_file, layout.model_dump_json(indent=1) + "\n")

    def read_layout(self) -> LayerLayout | None:
        """The base's block layout as recorded when the run was prepared; None for a run folder written before
        evomerge recorded it (resuming the search records it)."""
        if not self.layout_file.exists():
            return None
        try:
            return LayerLayout.model_validate_json(self.layout_file.read_bytes())
        except OSError as err:
            raise SpecError(f"{self.layout_file}: unreadable ({str(err).splitlines()[0]})") from None
        except ValidationError as err:
            from evomerge.yaml_io import describe_error

            raise SpecError(f"{self.layout_file}: not a layer layout ({describe_error(err)})") from None

    # ------------------------------------------------------------------ the study, read-only

    def load_study(self) -> optuna.Study:
        """The run's study for reading (status, report, export): opened read-only, never created. A SQLite
        file must exist and is opened read-only; another database must already hold Optuna's tables."""
        import sqlalchemy
        from sqlalchemy.engine import make_url

        url = self.storage_url()
        try:
            parsed = make_url(url)
            if parsed.get_backend_name() == "sqlite":
                db = sqlite_file(parsed)
                if db is None or not db.is_file():
                    raise SpecError(f"{self.root} has no study yet ({db or url} is missing)")
                url = sqlite_url(db, read_only=True)
            else:
                engine = sqlalchemy.create_engine(parsed)
                try:
                    if not sqlalchemy.inspect(engine).has_table("studies"):
                        raise SpecError(f"{self.root} has no study yet (no Optuna tables at {url})")
                finally:
                    engine.dispose()
            storage = optuna.storages.RDBStorage(url, skip_compatibility_check=True)
            return optuna.load_study(study_name=self.study_name(), storage=storage)
        except SpecError:
            raise
        except sqlalchemy.exc.OperationalError as err:  # read-only, Optuna found tables or rows still to create
            if "readonly database" not in str(err):
                raise SpecError(f"{self.root}: cannot read its study (OperationalError: "
                                f"{str(err).splitlines()[0][:200]})") from None
            raise SpecError(f"{self.root} has no study yet (its creation was cut short; "
                            f"evomerge search --resume {self.root} completes it)") from None
        except KeyError:  # the storage holds no study of that name (killed before it was created)
            raise SpecError(f"{self.root} has no study yet (no study {self.study_name()!r} at {url})") from None
        except Exception as err:  # corrupt file, unreachable database, no such study: one line, not a traceback
            raise SpecError(f"{self.root}: cannot read its study ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200]})") from None

    def trials(self) -> list[FrozenTrial]:
        return self.load_study().get_trials(deepcopy=False)

    def read_summary(self) -> dict[str, Any] | None:
        """What the final validation re-check wrote, or None before the search finished."""
        if not self.summary.exists():
            return None
        try:
            summary = json.loads(self.summary.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
            raise SpecError(f"{self.summary}: unreadable ({err})") from None
        from evomerge.yaml_io import describe_error

        try:
            _Summary.model_validate(summary)
        except ValidationError as err:
            raise SpecError(f"{self.summary}: not a run summary ({describe_error(err)})") from None
        stored_recipe(summary["winner_recipe"], f"{self.summary}: winner_recipe")
        return summary

    def log_rows(self) -> list[dict[str, Any]]:
        """The trial log's rows; the last line, if a kill cut it, is skipped. Any other line that is not a
        trial's JSON object (a hand edit) is a SpecError naming it."""
        if not self.log.exists():
            return []
        try:
            lines = self.log.read_text().splitlines()
        except (UnicodeDecodeError, OSError) as err:
            raise SpecError(f"{self.log}: unreadable ({str(err).splitlines()[0]})") from None
        rows = []
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):
                    continue
                raise SpecError(f"{self.log}: line {number} is not JSON") from None
            seconds = row.get("seconds", 0.0) if isinstance(row, dict) else None
            if not isinstance(seconds, int | float) or isinstance(seconds, bool):
                raise SpecError(f"{self.log}: line {number} is not a trial (a JSON object with its seconds)")
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ one search at a time

    def lock(self) -> IO[str]:
        """Hold the run's search lock for as long as the returned file stays open; SpecError when another
        live process is searching this run (the lock dies with its process, SIGKILL included)."""
        try:
            handle = self.lock_file.open("a")
        except OSError as err:  # a read-only file system, a folder in its place
            raise SpecError(f"{self.root}: cannot take its search lock ({err.strerror})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise SpecError(f"{self.root} is being searched by another process; wait for it or stop it") from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return handle


# ----------------------------------------------------------------------------- rendering a summary


def summary_table_markdown(table: dict[str, dict[str, Any]]) -> list[str]:
    """The winner-vs-references table of a summary as Markdown lines (report page, model card)."""
    return ["| model | validation | test |", "|---|---|---|",
            *(f"| {label} | {row['validation']:.4f} | {row['test']:.4f} |" for label, row in table.items())]


def describe_margin(margin: dict[str, float]) -> str:
    return (f"winner - uniform average on test: {margin['mean']:+.4f} (95% CI {margin['ci95_low']:+.4f} .. "
            f"{margin['ci95_high']:+.4f})")
