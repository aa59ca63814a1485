"""The search: an Optuna study driven by asynchronous ask/tell, resumable from its storage, then a hold-out
re-check of the best candidates.

Up to one candidate per executor slot is in flight; a freed slot gets the next ``ask`` at once and results
are told in whatever order they arrive. Budget = finished candidate evaluations (full or screened); a
failed one is retried a bounded number of times and does not count; a duplicate of an evaluated (or
in-flight) recipe reuses its score and does not count. A killed driver leaves its in-flight trials RUNNING
in the study; the next start marks them failed and queues them again, as Ctrl-C does at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import optuna
from optuna.trial import TrialState

from evomerge.errors import SearchError, SpecError
from evomerge.evaluate import EvalResult
from evomerge.executors import Candidate, Executor, Outcome, has_room, run_all
from evomerge.files import atomic_write_text, check_apart
from evomerge.interrupt import CtrlC
from evomerge.layout import LayerLayout
from evomerge.models import open_checkpoint
from evomerge.refs import model_folders
from evomerge.run import (
    STUDY_FILE,
    STUDY_NAME,
    Attr,
    RunFolder,
    as_text,
    counted,
    examples_scored,
    sqlite_file,
    stored_recipe,
)
from evomerge.scores import task_shares, weighted_mean
from evomerge.screening import Screen, race
from evomerge.space import Space, make_space
from evomerge.spec import AnyRecipe, Recipe, SearchSpec, SpaceSpec, TaskSpec, recipe_from_yaml
from evomerge.subsets import AnswerStrata, FirstDocuments, SearchSubset

K = TypeVar("K")  # the key of a batch of jobs
MAX_RETRIES = 2
MAX_FAILURES_IN_ROW = 5
MAX_DUPLICATES_IN_ROW = 50


def spec_hash(spec: SearchSpec) -> str:
    """The spec's identity in its run folder. Fields added later are left out while they hold the value that
    means "as before" (one method everywhere, no task options), so older run folders keep their hash; where the
    inputs live (``inputs_on``) changes no result and is never part of it."""
    unchanged: dict[str, Any] = {"inputs_on": True, "evaluation": {"tasks": {
        i: {o for o in TaskSpec.OPTIONS if getattr(task, o) is None} for i, task in enumerate(spec.evaluation.tasks)}}}
    if spec.evaluation.subset == "first":
        unchanged["evaluation"].update({"subset": True, "subset_pool": True})
    if spec.space.method_granularity == "global":
        unchanged["space"] = {"method_granularity"}
    if spec.space.kind == "weights":
        unchanged.setdefault("space", set()).update({"kind", *SpaceSpec.DATAFLOW_FIELDS})
    if spec.then is None:
        unchanged["then"] = True
    if spec.tokenizer_source is None:
        unchanged["tokenizer_source"] = True
    return hashlib.sha256(spec.model_dump_json(exclude=unchanged).encode()).hexdigest()[:16]


def recipe_hash(recipe: AnyRecipe) -> str:
    """A recipe's identity in its run (duplicates reuse a score); a field added later is left out while it
    holds its default, so that a resumed older run still knows its recipes."""
    later = {"tokenizer_source"} if isinstance(recipe, Recipe) and recipe.tokenizer_source is None else None
    return hashlib.sha256(recipe.model_dump_json(exclude=later).encode()).hexdigest()[:16]


def default_run_name(spec_path: str | None) -> str:
    stem = Path(spec_path).stem if spec_path else "demo"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_spec(spec: SearchSpec) -> None:
    """Everything about the spec that can fail before compute: model folders, their compatibility, tasks."""
    from evomerge.evaluate import check_tasks
    from evomerge.executors import include_paths
    from evomerge.models import check_compatible, check_loadable
    from evomerge.refs import resolve_model_path

    checkpoints = {ref: open_checkpoint(ref) for ref in [spec.base_model, *spec.models]}
    check_compatible(list(checkpoints.values()), aligned_vocab=spec.tokenizer_source is not None)
    check_loadable(spec.base_model, checkpoints[spec.base_model])
    layout = LayerLayout.of(checkpoints[spec.base_model])
    check_modules(spec, layout)
    try:  # what a Search builds in memory before its study is opened: a failure here, not once files are written
        study_sampler(spec, make_space(spec, layout))
    except ValueError as err:
        raise SpecError(f"sampler {spec.sampler or default_sampler(spec)} with seed {spec.seed}: {err}") from None
    tokenizer = spec.base_model  # the tasks' tokenizer (a union starts from the base's)
    if spec.tokenizer_source is not None:
        from evomerge.registry import get_method
        from evomerge.vocab import plan_vocab, source_model

        tokenizer = source_model(spec.tokenizer_source, spec.base_model) or tokenizer
        searched = plan_vocab(spec.tokenizer_source, checkpoints, spec.base_model).tokenizer.get_vocab()
        baseless = [m for m in spec.space.methods if get_method(m).base == "none"]
        if baseless and spec.tokenizer_source == "union":  # their union starts from models[0], not the base
            without = {ref: checkpoints[ref] for ref in spec.models}
            if plan_vocab("union", without, spec.base_model).tokenizer.get_vocab() != searched:
                raise SpecError(f"tokenizer_source union: {baseless[0]} merges without the base, and the union of the "
                                "models alone numbers the tokens otherwise than the one that starts from the base; "
                                "drop it from space.methods, put the model that shares the base's token ids first, "
                                "or use tokenizer_source base")
    paths = spec.space if spec.space.kind == "dataflow" else spec.then.space if spec.then else None
    if paths is not None and paths.scale is not None:  # a then stage's too: checked before the first stage runs
        from evomerge.dataflow import check_scalable

        for ref in spec.models:
            check_scalable(checkpoints[ref], f"{'then.' if spec.then else ''}space.scale ({ref})")
    check_tasks(spec.evaluation.tasks, include_paths(spec), tokenizer=resolve_model_path(tokenizer))


def check_modules(spec: SearchSpec, layout: LayerLayout) -> None:
    """A ``layer_module`` space searches one coefficient per block and module pattern: a pattern that matches no
    tensor of the base's blocks (``layout``) would search a dimension that changes nothing."""
    if spec.space.kind != "weights" or spec.space.grain.kind != "layer_module" or not layout.num_layers:
        return
    for module in spec.space.modules:
        filters = [f"{layout.prefix}{i}.{module}" for i in range(layout.num_layers)]
        if not any(f in name for name in layout.block_tensors for f in filters):
            raise SpecError(f"space.modules: {module!r} matches no tensor of {spec.base_model}'s blocks "
                            f"(no name contains {filters[0]!r}); name a module the blocks have")


SQLITE_HEADER = b"SQLite format 3\x00"


def check_sqlite_file(db: Path, url: str) -> None:
    """A SQLite study file that the search can create, or open and write: its folder exists and is writable (a
    read-only file system is not); an existing file is a writable SQLite database (or empty, as a search
    killed while creating it leaves it)."""
    folder = db.resolve().parent
    if not folder.is_dir():
        raise SpecError(f"--storage {url}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SpecError(f"--storage {url}: folder {folder} is not writable")
    if not db.exists():
        return
    if not db.is_file():
        raise SpecError(f"--storage {url}: {db} is not a file")
    try:
        with db.open("rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as err:
        raise SpecError(f"--storage {url}: {db} is unreadable ({err.strerror})") from None
    if head and head != SQLITE_HEADER:
        raise SpecError(f"--storage {url}: {db} is not a SQLite database")
    if not os.access(db, os.W_OK):
        raise SpecError(f"--storage {url}: {db} is not writable")


def check_storage(url: str) -> None:
    """A study storage URL that names a known database kind and can be reached and written, checked before
    anything is written. SQLite files are not opened (that would create them): see ``check_sqlite_file``."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            db = sqlite_file(parsed)
            if db is not None:
                check_sqlite_file(db, url)
            return
        engine = sqlalchemy.create_engine(parsed)
        with engine.connect():
            pass
        engine.dispose()
    except SpecError:
        raise
    except Exception as err:  # unknown scheme, missing driver, unreachable server, bad credentials
        raise SpecError(f"--storage {url}: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from None


def spec_inputs(spec: SearchSpec) -> list[Path]:
    """Every folder the search reads models from: the base's, each model's (a LoRA's base and adapter) and the
    ``tokenizer_source`` model's; its run folder must keep clear of them."""
    from evomerge.vocab import source_model

    named = source_model(spec.tokenizer_source, spec.base_model) if spec.tokenizer_source else None
    return [folder for ref in [spec.base_model, *spec.models, *([named] if named else [])]
            for folder in model_folders(ref)]


def check_run_folder(spec: SearchSpec, run: RunFolder, force: bool, storage: str | None = None) -> str | None:
    """Whether ``run`` may take this search (a new folder, or one made by the same spec and storage; with
    ``force`` any run folder, for a new search; never one that is, contains or lies inside an input, nor holds a
    file one reads through its links, nor one this process cannot write); returns the ``--storage`` URL to
    record (None: the run's own file). Reads only."""
    check_apart(run.root, "run folder", spec_inputs(spec))
    if run.root.exists() and not run.root.is_dir():
        raise SpecError(f"run folder {run.root} is a file")
    if not run.spec.exists():
        parent = next(p for p in run.root.absolute().parents if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise SpecError(f"cannot create the run folder {run.root}: {parent} is not a writable folder")
        return storage
    doc = run.read_doc()
    if not os.access(run.root, os.W_OK | os.X_OK):  # a read-only file system: its lock, log and study
        raise SpecError(f"run folder {run.root} is not writable")
    if force:  # a new search; the old one's study is set aside (``prepare_run``), in its storage unless told
        return storage or doc.get("storage")
    if doc.get("spec_hash") != spec_hash(spec):
        raise SpecError(f"run {run.root} was made with a different spec; use another --run or pass --force")
    recorded = run.storage_url()
    if storage and storage != recorded:
        raise SpecError(f"run {run.root} keeps its study at {recorded}, not {storage}")
    return doc.get("storage")


def check_budget(run: RunFolder, budget: int) -> None:
    """A run's budget may grow or stay, never fall below the trials it has finished (they would all count,
    and the hold-out check would run again under a budget rewritten downwards). Reads only."""
    try:
        done = sum(counted(t) for t in run.trials())
    except SpecError:  # no study yet, or its creation cut short: nothing finished (the search completes it)
        return
    if budget < done:
        raise SpecError(f"--budget {budget} is below the {done} trials run {run.root} has finished; give at "
                        f"least {done}")


def set_aside(run: RunFolder) -> Path:
    """Move a run folder's search (its record, log, summary, report, then stage and, in the run's own file, its
    study) into a ``set-aside-*`` folder inside it, so that a new search starts from nothing and the old one
    is kept, never mixed in. Returns that folder."""
    own_file = not run.read_doc().get("storage")
    aside = run.root / f"set-aside-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    aside.mkdir()
    for path in (run.spec, run.log, run.summary, run.root / "report.md", run.root / "report.png",
                 run.root / STAGE_WINNER, run.root / STAGE_FOLDER, *([run.root / STUDY_FILE] if own_file else [])):
        if path.exists() or path.is_symlink():
            path.rename(aside / path.name)
    return aside


def prepare_run(spec: SearchSpec, run: RunFolder, budget: int, force: bool, storage: str | None = None,
                max_examples: int | None = None) -> None:
    """Create the run folder (or take over one made by the same spec; with ``force``, set aside the search it
    holds) and record spec, budget (and example budget), storage and study name (a fresh one in a
    ``--storage`` database, so that runs sharing it never share a study) and the base's block layout (what
    ``evomerge report`` reads instead of the model)."""
    storage = check_run_folder(spec, run, force, storage)
    if force and run.spec.exists():
        set_aside(run)
    study = run.study_name() if run.spec.exists() else \
        (f"{run.root.name}-{uuid.uuid4().hex[:8]}" if storage else STUDY_NAME)
    layout = LayerLayout.of(open_checkpoint(spec.base_model))
    run.root.mkdir(parents=True, exist_ok=True)
    run.write_doc(spec.model_dump(mode="json"), spec_hash(spec), budget, storage, study, max_examples)
    run.write_layout(layout)


STAGE_WINNER = "ps-winner"  # the first stage's winner, exported into the run folder for the then stage
STAGE_FOLDER = "dataflow"  # the then stage's run folder, inside the first stage's


def dataflow_stage(spec: SearchSpec, run: RunFolder) -> tuple[SearchSpec, RunFolder]:
    """The ``then`` stage of ``spec``'s run: its spec (the first stage's winner folder among the models) and
    its run folder. Reads nothing."""
    return spec.dataflow_stage(str((run.root / STAGE_WINNER).resolve())), RunFolder(run.root / STAGE_FOLDER)


def export_stage_winner(run: RunFolder, fixed: bool) -> None:
    """Write the first stage's winner into the run folder, where the then stage's pool reads it. Once the
    then stage has begun (``fixed``) the folder is kept as it is; before, a winner that changed (the first
    stage resumed with a larger budget) replaces it."""
    from evomerge.merge import merge_to_folder

    folder = run.root / STAGE_WINNER
    winner = stored_recipe(run.read_summary()["winner_recipe"], f"{run.summary}: winner_recipe")
    written = folder / "evomerge_recipe.yaml"
    if folder.exists() and (fixed or (written.is_file() and recipe_from_yaml(written) == winner)):
        return
    merge_to_folder(winner, folder, force=True)


def make_sampler(spec: SearchSpec, workers: int = 1, dimensions: int = 1) -> optuna.samplers.BaseSampler:
    """The spec's sampler. CMA-ES gets a population of at least ``workers``: with more candidates in flight
    than one generation holds, the extra ones are wasted (Optuna's advice)."""
    kind = spec.sampler or default_sampler(spec)
    if kind == "cmaes":
        default = 4 + math.floor(3 * math.log(max(1, dimensions)))
        return optuna.samplers.CmaEsSampler(seed=spec.seed, warn_independent_sampling=False,
                                            popsize=max(default, workers),
                                            with_margin=spec.space.kind == "dataflow")  # keeps 0/1 steps moving
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, group=True)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.seed)
    return optuna.samplers.RandomSampler(seed=spec.seed)


def default_sampler(spec: SearchSpec) -> str:
    if spec.evaluation.objective == "pareto":
        return "nsga2"
    if spec.space.kind == "dataflow":  # CMA-ES on 0/1 decisions alone soon proposes the same path again and again
        return "cmaes" if spec.space.scale is not None else "tpe"
    return "tpe" if len(spec.space.methods) > 1 else "cmaes"


def study_sampler(spec: SearchSpec, space: Space, workers: int = 1) -> optuna.samplers.BaseSampler:
    """The sampler of the spec's study, sized to ``space`` (how many numbers one recipe takes sizes CMA-ES's
    population). Builds everything in memory."""
    probe = optuna.create_study().ask()
    space.sample(probe)
    with warnings.catch_warnings():  # TPE's group is "experimental"; used knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return make_sampler(spec, workers, len(probe.params))


def open_study(spec: SearchSpec, run: RunFolder, space: Space, workers: int = 1) -> optuna.Study:
    directions = ["maximize"] * (len(spec.evaluation.tasks) if spec.evaluation.objective == "pareto" else 1)
    sampler = study_sampler(spec, space, workers)
    return optuna.create_study(study_name=run.study_name(), storage=run.storage_url(), sampler=sampler,
                               pruner=optuna.pruners.NopPruner(), directions=directions, load_if_exists=True)


def _requeue(study: optuna.Study, trial: optuna.trial.BaseTrial, **attrs: Any) -> None:
    """Queue a trial's parameters again (its baseline label kept) with ``attrs`` added."""
    if trial.params:
        keep = {k: v for k, v in trial.user_attrs.items() if k == Attr.BASELINE}
        study.enqueue_trial(trial.params, user_attrs={**keep, **attrs})


def recover_interrupted(study: optuna.Study) -> int:
    """Trials left RUNNING by an interrupted search (killed, or stopped by an exception; one search per run
    at a time, so they are all its own): mark them failed and queue their parameters again, a bounded
    number of times (a candidate that kills the driver must not be run again on every resume)."""
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        retry = t.user_attrs.get(Attr.RETRY, 0)
        if retry < MAX_RETRIES:
            _requeue(study, t, **{Attr.RERUN_OF: t.number, Attr.RETRY: retry + 1})
    return len(stale)


def _objective(spec: SearchSpec, result: EvalResult) -> list[float]:
    if spec.evaluation.objective == "pareto":
        return [result.scores[t.name] for t in spec.evaluation.tasks]
    return [result.score]


@dataclass
class Progress:
    done: int
    budget: int
    best: float | None
    busy: int  # workers with a candidate in flight
    workers: int  # workers alive


@dataclass
class _Flight:
    """A candidate handed to the executor and not yet told."""

    trial: optuna.Trial
    recipe: AnyRecipe
    key: str
    start: float


class Search:
    """One run folder's search: ask, sample, submit (screen, then the rest, in one worker call), tell, log."""

    def __init__(self, spec: SearchSpec, run: RunFolder, executor: Executor, ctrl_c: CtrlC | None = None) -> None:
        """Opens the study of a prepared run (``prepare_run``) and reads nothing else: the space is laid out by
        the base's layout recorded in the run folder, and the models live in ``executor``'s workers."""
        self.spec = spec
        self.ctrl_c = ctrl_c or CtrlC()  # not installed: Python's own Ctrl-C handling
        self.run = run
        layout = run.read_layout()
        if layout is None:
            raise SpecError(f"{run.root} has no {run.layout_file.name}: prepare the run first (prepare_run)")
        self.space = make_space(spec, layout)
        self.executor = executor
        self.study = open_study(spec, run, self.space, self.executor.slots())
        # None until the reference models have answered the pool (``subset: answers``, a new run)
        self.subset: SearchSubset | None = self._stored_subset()
        self.screens = self._race()
        self._seen: dict[str, tuple[int, list[float], str]] = {}  # recipe hash -> (trial, values, fidelity)
        self._flight: dict[int, _Flight] = {}
        self._waiting: dict[str, list[optuna.Trial]] = {}  # duplicates of in-flight recipes, by recipe hash
        self._failures = 0

    # ------------------------------------------------------------------ the loop

    def _race(self) -> tuple[Screen, ...]:
        ev = self.spec.evaluation
        if ev.screen_examples is None or ev.objective != "weighted" or self.subset is None:
            return ()
        return race(self.subset, ev.rungs, ev.weights, self.study.get_trials(deepcopy=False))

    def pool(self, size: int | None) -> dict[str, list[int]]:
        """The first ``size`` search documents of each task (None: all), in the order a search takes them."""
        return {t.name: self.executor.doc_ids(t.name, "search")[:size] for t in self.spec.evaluation.tasks}

    def _stored_subset(self) -> SearchSubset | None:
        """The search subset: the first documents, or an answer-stratified one this study chose before."""
        ev = self.spec.evaluation
        if ev.subset == "first":
            return FirstDocuments(self.pool(ev.search_examples))
        stored = self.study.user_attrs.get(Attr.SUBSET)
        return AnswerStrata.from_json(json.loads(stored)) if stored else None

    def choose_subset(self) -> None:
        """``subset: answers`` on a new run: the reference models answer the pool, the strata give the subset,
        stored in the study (with the examples it cost) before any candidate is scored."""
        if self.subset is not None:
            return
        ev = self.spec.evaluation
        pool = self.pool(ev.subset_pool)
        answers = self.reference_answers(pool)
        subset = AnswerStrata.from_answers(pool, answers, ev.search_examples)
        self.study.set_user_attr(Attr.SUBSET, as_text(subset.to_json()))
        self.study.set_user_attr(Attr.SUBSET_EXAMPLES, sum(map(_examples, answers)))
        self.subset = subset
        self.screens = self._race()

    def reference_answers(self, pool: dict[str, list[int]]) -> list[EvalResult]:
        """Each reference model's answers on the ``pool`` search documents (what an answer subset is drawn by)."""
        jobs = {label: Candidate(r, "search", pool) for label, r in self.reference_recipes().items()}
        return list(self._score_all(jobs, "the reference models' answers on the subset's pool").values())

    def seed_baselines(self) -> None:
        if not self.study.get_trials(deepcopy=False):
            for label, params in self.space.baselines():
                self.study.enqueue_trial(params, user_attrs={Attr.BASELINE: label}, skip_if_exists=True)

    def finished(self) -> int:
        return sum(counted(t) for t in self.study.get_trials(deepcopy=False))

    def best(self) -> float | None:
        """Best value among full-fidelity evaluations (single objective), from the in-memory record: the
        progress display asks after every trial, so no storage query."""
        return max((values[0] for _, values, fidelity in self._seen.values() if fidelity == "full"
                    and len(values) == 1), default=None)

    def run_budget(self, budget: int, on_progress: Callable[[Progress], None] | None = None,
                   max_examples: int | None = None) -> None:
        """Evaluate until ``budget`` trials are counted, or, with ``max_examples``, until the trials have scored
        that many examples (no new candidate starts then; those in flight finish). On any exception (Ctrl-C
        included) the candidates in flight are marked failed and queued again, so a resumed search re-runs
        them."""
        recover_interrupted(self.study)
        self.choose_subset()
        self.seed_baselines()
        trials = self.study.get_trials(deepcopy=False)
        self._seen = {t.user_attrs[Attr.RECIPE_HASH]: (t.number, t.values, t.user_attrs.get(Attr.FIDELITY))
                      for t in trials if counted(t) and Attr.RECIPE_HASH in t.user_attrs}
        done, scored = self.finished(), examples_scored(self.study)
        capped = False
        try:
            while True:
                capped = max_examples is not None and scored >= max_examples
                self._dispatch(0 if capped else budget - done)
                if on_progress:
                    on_progress(Progress(done, budget, self.best(), *self.executor.workers()))
                if not self._flight:
                    break
                with self.ctrl_c.waiting():
                    number, outcome = self.executor.wait_any()
                done += self._receive(self._flight.pop(number), outcome)
                scored += _examples(outcome.result) if outcome.error is None and outcome.result else 0
        except BaseException:
            self._abandon_flight()
            raise
        if done < budget and not capped:
            raise SearchError(f"no worker left ({done} of {budget} trials finished); resume when workers are back")

    def _dispatch(self, remaining: int) -> None:
        """Fill free slots with new candidates, at most ``remaining`` in flight."""
        duplicates = 0
        while len(self._flight) < remaining and has_room(self.executor):
            trial = self.study.ask()
            recipe = self.space.sample(trial)
            key = recipe_hash(recipe)
            trial.set_user_attr(Attr.RECIPE_HASH, key)
            in_flight = any(f.key == key for f in self._flight.values())
            if key in self._seen or in_flight:
                duplicates += 1
                if duplicates >= MAX_DUPLICATES_IN_ROW:
                    self.study.tell(trial, state=TrialState.FAIL)
                    raise SearchError(f"{duplicates} duplicate recipes in a row: the space looks exhausted")
                if in_flight:
                    self._waiting.setdefault(key, []).append(trial)
                else:
                    self._tell_duplicate(trial, key)
                continue
            duplicates = 0
            trial.set_user_attr(Attr.RECIPE, as_text(recipe.model_dump(mode="json", exclude_defaults=True)))
            self._flight[trial.number] = _Flight(trial, recipe, key, time.perf_counter())
            self.executor.submit(trial.number, Candidate(recipe, "search", self.subset.doc_ids,
                                                             self.screens))

    def _tell_duplicate(self, trial: optuna.Trial, key: str) -> None:
        number, values, fidelity = self._seen[key]
        trial.set_user_attr(Attr.DUPLICATE_OF, number)
        trial.set_user_attr(Attr.FIDELITY, fidelity)
        self.study.tell(trial, values)

    def _receive(self, flight: _Flight, outcome: Outcome) -> int:
        """Tell one finished candidate (and its waiting duplicates); returns how many trials it counts."""
        trial, seconds = flight.trial, time.perf_counter() - flight.start
        waiting = self._waiting.pop(flight.key, [])
        if outcome.error is not None or outcome.result is None:
            self._failures += 1
            trial.set_user_attr(Attr.ERROR, outcome.error)
            self.study.tell(trial, state=TrialState.FAIL)
            for dup in waiting:
                self.study.tell(dup, state=TrialState.FAIL)
            retry = trial.user_attrs.get(Attr.RETRY, 0)
            if retry < MAX_RETRIES:
                _requeue(self.study, trial, **{Attr.RETRY: retry + 1})
            self._log(trial.number, "fail", None, flight.recipe, seconds, worker=outcome.worker, error=outcome.error)
            if self._failures >= MAX_FAILURES_IN_ROW:
                raise SearchError(f"{self._failures} candidate evaluations failed in a row; last error: "
                                  f"{outcome.error}")
            return 0
        self._failures = 0
        result = self.subset.weigh(outcome.result)
        values = _objective(self.spec, result)
        examples = _examples(result)
        trial.set_user_attr(Attr.FIDELITY, outcome.fidelity)
        trial.set_user_attr(Attr.SCORES, result.scores)
        trial.set_user_attr(Attr.EXAMPLES, examples)
        if outcome.rung_vectors:
            trial.set_user_attr(Attr.SCREEN, as_text(outcome.rung_vectors[0]))
            if len(outcome.rung_vectors) > 1:
                trial.set_user_attr(Attr.RUNGS, as_text(outcome.rung_vectors[1:]))
        self.study.tell(trial, values)
        if outcome.fidelity == "full" and outcome.rung_vectors:
            for screen, vector in zip(self.screens, outcome.rung_vectors, strict=True):
                screen.record(result.score, vector)
        self._seen[flight.key] = (trial.number, values, outcome.fidelity)
        for dup in waiting:
            self._tell_duplicate(dup, flight.key)
        self._log(trial.number, outcome.fidelity, result, flight.recipe, seconds, worker=outcome.worker,
                  merge_s=outcome.merge_s, eval_s=outcome.eval_s, examples=examples,
                  baseline=trial.user_attrs.get(Attr.BASELINE))
        return 1

    def _abandon_flight(self) -> None:
        """Mark every in-flight candidate failed ("interrupted") and queue it again; then the same for any
        other trial this search left RUNNING (asked but not yet submitted, duplicates waiting)."""
        for flight in self._flight.values():
            try:
                flight.trial.set_user_attr(Attr.ERROR, "interrupted")
            except RuntimeError:  # already told when the interruption came
                continue
        recover_interrupted(self.study)
        self._flight.clear()
        self._waiting.clear()

    def _log(self, number: int, state: str, result: EvalResult | None, recipe: AnyRecipe, seconds: float,
             **extra: Any) -> None:
        """Append one JSON line per trial (a line cut by a kill is skipped by readers)."""
        row = {"trial": number, "state": state, "score": result.score if result else None,
               "scores": result.scores if result else None, "seconds": round(seconds, 4),
               "recipe": recipe.model_dump(mode="json", exclude_defaults=True),
               **{k: v for k, v in extra.items() if v is not None}}
        with self.run.log.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------------ the hold-out re-check

    def candidates(self) -> list[optuna.trial.FrozenTrial]:
        """The top-k full-fidelity trials (the Pareto front, ranked by weighted score, for pareto)."""
        full = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get(Attr.FIDELITY) == "full" and Attr.DUPLICATE_OF not in t.user_attrs]
        if self.spec.evaluation.objective == "pareto":
            front = {t.number for t in self.study.best_trials}
            full = [t for t in full if t.number in front]
        return sorted(full, key=lambda t: weighted_mean(t.user_attrs[Attr.SCORES], self.spec.evaluation.weights),
                      reverse=True)[: self.spec.evaluation.top_k]

    def reference_recipes(self) -> dict[str, Recipe]:
        """What the winner is compared with: each parent alone and their uniform average. With a
        ``tokenizer_source`` each is a task arithmetic of all the models on the base (a parent: weight 1, the
        others 0; equal up to float rounding), so that it has the searched vocabulary: a union depends on the
        models merged and starts from the base only when the merge reads it."""
        spec = self.spec
        if spec.tokenizer_source is None:
            refs = {f"parent {m}": Recipe(merge_method="linear", models=[{"model": m}], dtype=spec.dtype)
                    for m in spec.models}
            refs["uniform average"] = Recipe(merge_method="linear", models=[{"model": m} for m in spec.models],
                                             dtype=spec.dtype)
            return refs

        def arithmetic(weights: list[float]) -> Recipe:
            return Recipe(merge_method="task_arithmetic", base_model=spec.base_model, dtype=spec.dtype,
                          tokenizer_source=spec.tokenizer_source,
                          models=[{"model": m, "parameters": {"weight": w}} for m, w in zip(spec.models, weights,
                                                                                             strict=True)])

        refs = {f"parent {m}": arithmetic([float(o == m) for o in spec.models]) for m in spec.models}
        refs["uniform average"] = arithmetic([1 / len(spec.models)] * len(spec.models))
        return refs

    def _score_all(self, jobs: dict[K, Candidate], what: str = "the hold-out re-check") -> dict[K, EvalResult]:
        """Run jobs spread over the workers; their results under the jobs' keys (in the jobs' order), or
        SearchError naming ``what`` failed."""
        keys = list(jobs)
        outcomes = run_all(self.executor, {i: jobs[key] for i, key in enumerate(keys)}, waiting=self.ctrl_c.waiting)
        failed = [o.error for o in outcomes.values() if o.result is None]
        if failed or len(outcomes) < len(jobs):
            raise SearchError(f"{what} failed: {failed[0] if failed else 'no worker left'}")
        return {key: outcomes[i].result for i, key in enumerate(keys)}

    def finalize(self) -> dict[str, Any]:
        """Re-score the top-k on validation, pick the winner there, report test scores and margins."""
        candidates = self.candidates()
        if not candidates:
            raise SearchError("no trial finished at full fidelity; nothing to choose from")
        refs = self.reference_recipes()
        jobs: dict[tuple[str | int, str], Candidate] = {(t.number, "validation"): Candidate(_recipe_of(t), "validation")
                                                        for t in candidates}
        jobs |= {(label, role): Candidate(r, role) for label, r in refs.items() for role in ("validation", "test")}
        first = self._score_all(jobs)  # keyed (trial number or reference label, role)
        validation = {t.number: first[t.number, "validation"] for t in candidates}
        winner = max(candidates, key=lambda t: validation[t.number].score)
        winner_test = self._score_all({"test": Candidate(_recipe_of(winner), "test")})["test"]
        winner_label = f"winner (trial {winner.number})"
        scored = {winner_label: (validation[winner.number], winner_test)}
        scored |= {label: (first[label, "validation"], first[label, "test"]) for label in refs}
        rows = {label: {"validation": val.score, "test": test.score, "validation_tasks": val.scores,
                        "test_tasks": test.scores} for label, (val, test) in scored.items()}
        summary = {
            "winner_trial": winner.number,
            "winner_recipe": _recipe_of(winner).model_dump(mode="json", exclude_defaults=True),
            "search_score": winner.user_attrs[Attr.SCORES],
            "candidates_validation": {str(n): r.score for n, r in validation.items()},
            "table": rows,
            "margin_vs_uniform_average": paired_margin(winner_test, scored["uniform average"][1]),
            "finished_trials": self.finished(),
            "examples_scored": examples_scored(self.study),
        }
        atomic_write_text(self.run.summary, json.dumps(summary, indent=2))
        return summary


def _examples(result: EvalResult) -> int:
    return sum(len(v) for v in result.examples.values())


def _recipe_of(trial: optuna.trial.FrozenTrial) -> AnyRecipe:
    return stored_recipe(trial.user_attrs[Attr.RECIPE], f"trial {trial.number}")


def paired_margin(a: EvalResult, b: EvalResult) -> dict[str, float]:
    """Weighted mean per-example difference a - b with a 95% normal interval (paired, same documents)."""
    diffs: list[float] = []
    weights: list[float] = []
    shares = task_shares(a.weights)
    for task, per_doc in a.examples.items():
        for doc, weight in a.example_weights(task, per_doc).items():
            diffs.append(per_doc[doc] - b.examples[task][doc])
            weights.append(shares[task] * weight)
    mean = sum(w * d for w, d in zip(weights, diffs, strict=True))
    variance = sum(w * w * (d - mean) ** 2 for w, d in zip(weights, diffs, strict=True)) * len(diffs) / max(
        1, len(diffs) - 1)
    half = 1.96 * math.sqrt(variance)
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half}
