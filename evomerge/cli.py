"""The ``evomerge`` command: argument parsing, progress display and exit codes (2 = bad input, 1 = a search
that could not go on, 130 = interrupted)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.text import Text

from evomerge.errors import SearchError, SpecError
from evomerge.events import SearchEvents
from evomerge.interrupt import CtrlC

if TYPE_CHECKING:
    from evomerge.events import Progress as SearchProgress
    from evomerge.run import RunFolder
    from evomerge.search import Search
    from evomerge.spec import SearchSpec

console = Console(stderr=True)


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        console.print(Text(f"error: {self.prog}: {message}"), highlight=False, soft_wrap=True)
        sys.exit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


def _folder(text: str) -> str:
    """A folder argument; an empty or blank one would quietly mean the current folder (which ``--force`` would
    replace)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} names no folder")
    return text


def _merge(args: argparse.Namespace) -> None:
    from evomerge.checkpoint import shard_bytes
    from evomerge.dataflow import write_recipe_folder
    from evomerge.recipes import recipe_from_yaml

    shard = shard_bytes(args.shard_size)
    recipe = recipe_from_yaml(args.recipe)
    with Progress(TextColumn("merging tensors"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("merge", total=None)
        write_recipe_folder(recipe, Path(args.out), force=args.force, max_shard_bytes=shard,
                            on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    console.print(Text(f"wrote {args.out}"))


def _search(args: argparse.Namespace) -> None:
    if not args.spec and not args.resume:  # the built-in demo needs nothing from a hub: never ask one
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from evomerge.chain import dataflow_stage, export_stage_winner
    from evomerge.demo import DEMO_SPEC
    from evomerge.launch import default_run_name
    from evomerge.run import RunFolder
    from evomerge.spec import SearchSpec, spec_hash

    if args.resume:
        if args.spec:
            raise SpecError("give either a spec or --resume RUN, not both")
        run = RunFolder(Path(args.resume))
        spec, stored_budget = run.load()
        budget = args.budget or stored_budget
    else:
        spec = SearchSpec.from_yaml(args.spec or DEMO_SPEC)
        if args.budget is None:
            raise SpecError("--budget N is required for a new search")
        budget = args.budget
        run = RunFolder(Path(args.run or Path("runs") / default_run_name(args.spec)))
    stage = dataflow_stage(spec, run) if spec.then is not None else None
    begun = stage is not None and stage[1].spec.exists()
    if begun:  # the first stage is done and its winner in use: neither a new spec nor a new search (--force)
        other = run.read_doc().get("spec_hash") != spec_hash(spec)
        if other or args.force:
            raise SpecError(f"run {run.root} has begun its then stage{' with another spec' if other else ''}; "
                            "use another --run")
    else:
        _search_run(spec, run, budget, args, args.storage, args.force)
    if stage is not None:
        stage_spec, stage_run = stage
        stage_budget = args.budget or (stage_run.budget() if begun else budget)
        with run.lock():  # the chain's folder stays ours while its winner is written and the stage runs
            console.print(Text(f"then: a data-flow search over the models and this winner, in {stage_run.root}"))
            export_stage_winner(run, fixed=begun)
            _search_run(stage_spec, stage_run, stage_budget, args, None, force=False)


def _search_run(spec: SearchSpec, run: RunFolder, budget: int, args: argparse.Namespace, storage: str | None,
                force: bool) -> None:
    """One run folder's search, checked before compute, to its budget and the hold-out re-check. A new run
    whose start fails after all (before its search begins) is taken back: nothing is left of it."""
    from evomerge.launch import (
        check_budget,
        check_run_folder,
        check_spec,
        check_storage,
        choose_executor,
        make_executor,
        run_search,
    )

    if args.inputs_on:
        spec = spec.model_copy(update={"inputs_on": args.inputs_on})
    recorded = check_run_folder(spec, run, force, storage)
    if recorded or run.spec.exists():
        check_storage(recorded or run.default_storage())
    if run.spec.exists() and not force:
        check_budget(run, budget)
    _quiet_libraries()
    check_spec(spec)
    kind = choose_executor(spec, args.executor, args.workers, args.ray_address, args.gpus_per_worker)
    fresh = None if run.spec.exists() else _NewRun.before(run)
    lock = run.lock() if run.root.is_dir() else None  # a run being searched is refused before models load
    events = _ConsoleEvents(budget)
    try:
        # the workers start (models load, a cluster is joined) before anything is written for a new run
        if kind == "ray" and args.ray_address:
            console.print(Text(f"joining the Ray cluster at {args.ray_address} ..."))
        executor = make_executor(spec, kind, args.workers, args.ray_address, args.gpus_per_worker)
        try:
            if lock is None:
                run.root.mkdir(parents=True, exist_ok=True)
                lock = run.lock()
            with CtrlC() as ctrl_c:
                summary = run_search(spec, run, budget, executor, force=force, storage=storage,
                                     max_examples=args.max_examples, ctrl_c=ctrl_c, events=events).summary
                ctrl_c.check()
            _print_summary(summary)
        finally:
            events.searched()
            executor.close()
    except KeyboardInterrupt:
        if not events.begun_at or not run.spec.exists():
            raise
        raise _Interrupted(f"interrupted; the candidates in flight will run again: "
                           f"evomerge search --resume {run.root}") from None
    finally:
        if lock is not None:
            lock.close()
        if fresh is not None and not events.begun_at:
            fresh.take_back()


@dataclass(frozen=True)
class _NewRun:
    """What a new run's start may create (its folders, lock, record and own study file), noted before it does,
    so that a start that fails after all can remove exactly that."""

    folders: tuple[Path, ...]  # deepest first
    files: tuple[Path, ...]

    @classmethod
    def before(cls, run: RunFolder) -> _NewRun:
        from evomerge.files import missing_folders
        from evomerge.run import STUDY_FILE

        folders = tuple(missing_folders(run.root.absolute()))
        files = tuple(p for p in (run.lock_file, run.spec, run.layout_file, run.root / STUDY_FILE) if not p.exists())
        return cls(folders, files)

    def take_back(self) -> None:
        from evomerge.files import remove_empty_folders

        for path in self.files:
            path.unlink(missing_ok=True)
        remove_empty_folders(self.folders)  # anything else put there is kept


class _ConsoleEvents(SearchEvents):
    """A search on the console: its step lines, and a progress bar (done of budget, best so far, workers busy,
    ETA) while the budget is spent."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.begun_at: Search | None = None  # the open search: a failure from here on leaves a resumable run
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def begun(self, search: Search) -> None:
        self.begun_at = search

    def say(self, line: str) -> None:
        console.print(Text(line))

    def progress(self, progress: SearchProgress) -> None:
        if self._bar is None:
            columns = (TextColumn("trials"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("best {task.fields[best]}"), TextColumn("workers {task.fields[busy]}"),
                       TimeRemainingColumn())
            self._bar = Progress(*columns, console=console)
            self._bar.start()
            self._task = self._bar.add_task("search", total=self.budget, best="-", busy="-")
        self._bar.update(self._task, completed=progress.done,
                         best="-" if progress.best is None else f"{progress.best:.4f}",
                         busy=f"{progress.busy}/{progress.workers} busy")

    def searched(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class _Interrupted(Exception):
    """Ctrl-C, with what to say about it."""


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    from evomerge.run import describe_margin

    table = Table(title=f"winner: trial {summary['winner_trial']}")
    table.add_column("model")
    table.add_column("validation", justify="right")
    table.add_column("test", justify="right")
    for label, row in summary["table"].items():
        table.add_row(Text(label), f"{row['validation']:.4f}", f"{row['test']:.4f}")
    Console().print(table)
    Console().print(Text(describe_margin(summary["margin_vs_uniform_average"])))


def _export(args: argparse.Namespace) -> None:
    from evomerge.export import export_trial

    number, out = export_trial(Path(args.run), Path(args.out), trial=args.trial, force=args.force)
    console.print(Text(f"wrote trial {number} to {out}"))


def _status(args: argparse.Namespace) -> None:
    from evomerge.status import run_table, runs_table

    Console().print(run_table(Path(args.run), limit=args.limit) if args.run else runs_table(Path(args.runs)))


def _report(args: argparse.Namespace) -> None:
    from evomerge.report import write_report

    out = write_report(Path(args.run))
    console.print(Text(f"wrote {out} and {out.with_suffix('.png').name} beside it"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="evomerge", description="Evolutionary merge search for language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    merge = sub.add_parser("merge", help="apply a fixed recipe (no search) and write a Hugging Face folder")
    merge.add_argument("recipe", help="recipe YAML (evomerge or mergekit format)")
    merge.add_argument("--out", required=True, type=_folder, help="output folder")
    merge.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    merge.add_argument("--shard-size", type=float, default=2.0, help="maximum shard size in GiB (default 2)")
    merge.set_defaults(handler=_merge)

    search = sub.add_parser("search", help="search merge recipes (no spec: the built-in demo)")
    search.add_argument("spec", nargs="?", help="search spec YAML (default: the built-in demo)")
    search.add_argument("--budget", type=_positive_int, help="finished candidate evaluations to reach")
    search.add_argument("--max-examples", type=_positive_int,
                        help="also stop once the trials have scored this many examples (no new candidate starts; "
                             "recorded for --resume)")
    search.add_argument("--run", type=_folder, help="run folder (default: runs/SPEC-TIMESTAMP)")
    search.add_argument("--resume", metavar="RUN", type=_folder, help="continue the search of this run folder")
    search.add_argument("--storage", help="SQLAlchemy URL of the study (default: sqlite in the run folder); "
                                          "recorded in the run folder for resume, status, report and export")
    search.add_argument("--force", action="store_true",
                        help="start a new search in a run folder that holds one (made with this spec or another); "
                             "the old one is set aside in a set-aside-* folder inside it")
    search.add_argument("--executor", choices=("auto", "local", "ray"), default="auto",
                        help="where candidates run: in this process, or on Ray workers (auto: Ray when --workers "
                             "> 1, --ray-address, or several GPUs)")
    search.add_argument("--workers", type=_positive_int,
                        help="Ray workers (default: one per GPU, else 1); CPU workers share the cores' threads")
    search.add_argument("--gpus-per-worker", type=_positive_int,
                        help="GPUs per Ray worker, for models too large for one (default 1; refused without GPUs)")
    search.add_argument("--ray-address", help="join a running Ray cluster (auto or HOST:PORT) instead of a local one")
    search.add_argument("--inputs-on", choices=("auto", "device", "host"),
                        help="where workers keep the models they merge: on their device as stored, memory-mapped in "
                             "host memory, or auto (device when they fit on a GPU); default: the spec's inputs_on")
    search.set_defaults(handler=_search)

    export = sub.add_parser("export", help="write a run's winner (or a trial) as a Hugging Face folder")
    export.add_argument("run", type=_folder, help="run folder")
    export.add_argument("--out", required=True, type=_folder, help="output folder")
    export.add_argument("--trial", type=int, help="trial number (default: the validated winner)")
    export.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    export.set_defaults(handler=_export)

    status = sub.add_parser("status", help="a run's trials, best first (no run: every run under --runs)")
    status.add_argument("run", nargs="?", type=_folder, help="run folder")
    status.add_argument("--limit", type=_positive_int, default=20, help="rows to show (default 20)")
    status.add_argument("--runs", default="runs", type=_folder, help="folder of run folders (default: runs)")
    status.set_defaults(handler=_status)

    report = sub.add_parser("report", help="write report.md and report.png (curve, winner, per-layer parameters)")
    report.add_argument("run", type=_folder, help="run folder")
    report.set_defaults(handler=_report)
    return parser


def _quiet_libraries() -> None:
    """Library chatter (study creation logs, weight-loading bars) would hide our progress display."""
    import optuna
    import transformers

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _say(label: str, style: str, message: object) -> None:
    """One line, printed literally (a path like ``runs/[v2]`` is not rich markup)."""
    console.print(Text.assemble((label, style), str(message).replace("\n", " ")), highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a bad argument (2, already said in one line)
        return int(stop.code or 0)
    try:
        args.handler(args)
    except SpecError as err:
        _say("error: ", "red", err)
        return 2
    except SearchError as err:
        _say("search stopped: ", "red", err)
        return 1
    except _Interrupted as err:
        _say("", "yellow", err)
        return 130
    except KeyboardInterrupt:
        _say("", "yellow", "interrupted")
        return 130
    return 0


# commands that start no processes or servers, so nothing is left to shut down once their files are closed
_QUICK_EXIT = ("merge", "export")


def run() -> NoReturn:
    """The ``evomerge`` command. After ``merge`` and ``export`` it exits without the interpreter's teardown,
    which spends a third of a second freeing torch's modules; every other command exits normally (a search's
    Ray and storage shut down at exit)."""
    code = main()
    if sys.argv[1:2] and sys.argv[1] in _QUICK_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
