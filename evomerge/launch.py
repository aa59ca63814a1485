"""Launching a search: everything checked before compute (the spec, its models and tasks, the run folder, the
storage, the budget), the run folder prepared, and the workers chosen and started. It sits above both
executors, so neither imports the other (the Ray executor builds on the in-process one's Worker and job types)."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from evomerge.chain import STAGE_FOLDER, STAGE_WINNER
from evomerge.errors import SpecError
from evomerge.events import SearchEvents
from evomerge.executors import Executor, InProcessExecutor
from evomerge.files import check_apart
from evomerge.interrupt import CtrlC
from evomerge.layout import LayerLayout
from evomerge.models import open_checkpoint
from evomerge.ray_executor import RayExecutor, check_gpus_per_worker, plan_workers
from evomerge.refs import model_folders
from evomerge.run import STUDY_FILE, STUDY_NAME, RunFolder, counted, sqlite_file
from evomerge.samplers import default_sampler, study_sampler
from evomerge.search import Search
from evomerge.space import make_space
from evomerge.spec import SearchSpec, spec_hash
from evomerge.worker import Worker, check_device


def choose_executor(spec: SearchSpec, kind: Literal["auto", "local", "ray"] = "auto", workers: int | None = None,
                    address: str | None = None, gpus_per_worker: int | None = None) -> Literal["local", "ray"]:
    """``local`` (in-process) or ``ray``: Ray when asked for, when several workers, a cluster address or GPUs
    per worker (None: not given, 1) are given, or when the spec may use GPUs and several are visible. Checked
    before anything starts: the device of an in-process run, the worker plan of a local Ray (a cluster's
    resources are known only once joined)."""
    several_gpus = spec.device in ("auto", "cuda") and torch.cuda.device_count() > 1
    asked = (workers or 1) > 1 or address or gpus_per_worker is not None
    if kind == "ray" or (kind == "auto" and (asked or several_gpus)):
        if not address:
            plan = plan_workers(spec, {"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()}, workers,
                                gpus_per_worker or 1)
            check_gpus_per_worker(plan, gpus_per_worker)
        return "ray"
    if asked:
        raise SpecError("--workers above 1, --ray-address and --gpus-per-worker need the Ray executor "
                        "(--executor ray or auto)")
    check_device(spec.device)
    return "local"


def make_executor(spec: SearchSpec, kind: Literal["local", "ray"], workers: int | None = None,
                  address: str | None = None, gpus_per_worker: int | None = None) -> Executor:
    """The executor ``choose_executor`` picked, started (models loaded on every worker)."""
    if kind == "ray":
        return RayExecutor(spec, workers=workers, address=address, gpus_per_worker=gpus_per_worker)
    return InProcessExecutor(Worker(spec))


def default_run_name(spec_path: str | None) -> str:
    stem = Path(spec_path).stem if spec_path else "demo"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_spec(spec: SearchSpec) -> None:
    """Everything about the spec that can fail before compute: model folders, their compatibility, tasks."""
    from evomerge.evaluate import check_tasks
    from evomerge.models import check_compatible, check_loadable
    from evomerge.refs import resolve_model_path
    from evomerge.worker import include_paths

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
    for path in (run.spec, run.layout_file, run.log, run.summary, run.root / "report.md", run.root / "report.png",
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


@dataclass(frozen=True)
class SearchRun:
    """A search that ran to its budget: the search (its study, its space) and the hold-out re-check's summary
    (None when the re-check was not asked for)."""

    search: Search
    summary: dict[str, Any] | None


def run_search(spec: SearchSpec, run: RunFolder, budget: int, executor: Executor, *, force: bool = False,
               storage: str | None = None, max_examples: int | None = None, ctrl_c: CtrlC | None = None,
               events: SearchEvents | None = None, finalize: bool = True) -> SearchRun:
    """One run folder's search on started workers: prepare the run folder (``prepare_run``), open the study,
    choose the search subset, run to ``budget`` (or ``max_examples``; None: the run's recorded example budget
    when resumed) and, with ``finalize``, the hold-out re-check. The pre-flight checks (``check_spec``,
    ``check_run_folder``, ``check_storage``, ``check_budget``) come first, before the workers start; the caller
    holds the run's lock where another process may search the same folder."""
    events = events or SearchEvents()
    if max_examples is None and run.spec.exists() and not force:
        max_examples = run.max_examples()
    prepare_run(spec, run, budget, force=force, storage=storage, max_examples=max_examples)
    search = Search(spec, run, executor, ctrl_c)
    events.begun(search)
    events.say(f"run folder: {run.root}")
    events.say(executor.inputs)
    if search.subset is None:
        events.say(f"the reference models answer {spec.evaluation.subset_pool or 'all'} search documents per "
                   "task to choose the search subset ...")
        search.choose_subset()
    search.run_budget(budget, events.progress, max_examples)
    events.searched()
    if not finalize:
        return SearchRun(search, None)
    events.say("re-scoring the best candidates on the validation split ...")
    return SearchRun(search, search.finalize())
