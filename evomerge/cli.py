"""The ``evomerge`` command: argument parsing, progress display and exit codes (2 = bad input)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from evomerge.errors import SearchError, SpecError

console = Console(stderr=True)


def _merge(args: argparse.Namespace) -> None:
    from evomerge.merge import merge_to_folder
    from evomerge.spec import Recipe

    recipe = Recipe.from_yaml(args.recipe)
    with Progress(TextColumn("merging tensors"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("merge", total=None)
        merge_to_folder(recipe, Path(args.out), force=args.force, max_shard_bytes=int(args.shard_size * 1024**3),
                        on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    console.print(f"wrote {args.out}")


def _load_spec(path: str | None):
    from evomerge.demo import DEMO_SPEC
    from evomerge.spec import SearchSpec

    return SearchSpec.from_yaml(path or DEMO_SPEC)


def _search(args: argparse.Namespace) -> None:
    if not args.spec and not args.resume:  # the built-in demo needs nothing from a hub: never ask one
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from evomerge.search import RunFolder, Search, check_spec, default_run_name, load_run, prepare_run

    if args.resume:
        if args.spec:
            raise SpecError("give either a spec or --resume RUN, not both")
        run = RunFolder(Path(args.resume))
        spec, stored_budget = load_run(run)
        budget = args.budget or stored_budget
    else:
        spec = _load_spec(args.spec)
        if args.budget is None:
            raise SpecError("--budget N is required for a new search")
        budget = args.budget
        run = RunFolder(Path(args.run or Path("runs") / default_run_name(args.spec)))
    _quiet_libraries()
    check_spec(spec)
    prepare_run(spec, run, budget, force=args.force)
    console.print(f"run folder: {run.root}")
    search = Search(spec, run, storage=args.storage)
    columns = (TextColumn("trials"), BarColumn(), MofNCompleteColumn(), TextColumn("best {task.fields[best]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("search", total=budget, best="-")

        def show(p) -> None:
            progress.update(task, completed=p.done, best="-" if p.best is None else f"{p.best:.4f}")

        search.run_budget(budget, show)
    console.print("re-scoring the best candidates on the validation split ...")
    _print_summary(search.finalize())


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    from evomerge.search import describe_margin

    table = Table(title=f"winner: trial {summary['winner_trial']}")
    table.add_column("model")
    table.add_column("validation", justify="right")
    table.add_column("test", justify="right")
    for label, row in summary["table"].items():
        table.add_row(label, f"{row['validation']:.4f}", f"{row['test']:.4f}")
    Console().print(table)
    Console().print(describe_margin(summary["margin_vs_uniform_average"]))


def _export(args: argparse.Namespace) -> None:
    from evomerge.export import export_trial

    number, out = export_trial(Path(args.run), Path(args.out), trial=args.trial, force=args.force)
    console.print(f"wrote trial {number} to {out}")


def _status(args: argparse.Namespace) -> None:
    from evomerge.status import run_table, runs_table

    Console().print(run_table(Path(args.run), limit=args.limit) if args.run else runs_table(Path(args.runs)))


def _report(args: argparse.Namespace) -> None:
    from evomerge.report import write_report

    out = write_report(Path(args.run))
    console.print(f"wrote {out} and {out.with_suffix('.png').name} beside it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary merge search for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="apply a fixed recipe (no search) and write a Hugging Face folder")
    merge.add_argument("recipe", help="recipe YAML (evomerge or mergekit format)")
    merge.add_argument("--out", required=True, help="output folder")
    merge.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    merge.add_argument("--shard-size", type=float, default=2.0, help="maximum shard size in GiB (default 2)")
    merge.set_defaults(handler=_merge)

    search = sub.add_parser("search", help="search merge recipes (no spec: the built-in demo)")
    search.add_argument("spec", nargs="?", help="search spec YAML (default: the built-in demo)")
    search.add_argument("--budget", type=int, help="finished candidate evaluations to reach")
    search.add_argument("--run", help="run folder (default: runs/SPEC-TIMESTAMP)")
    search.add_argument("--resume", metavar="RUN", help="continue the search of this run folder")
    search.add_argument("--storage", help="SQLAlchemy URL of the study (default: sqlite in the run folder)")
    search.add_argument("--force", action="store_true", help="reuse a run folder made with another spec")
    search.set_defaults(handler=_search)

    export = sub.add_parser("export", help="write a run's winner (or a trial) as a Hugging Face folder")
    export.add_argument("run", help="run folder")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--trial", type=int, help="trial number (default: the validated winner)")
    export.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    export.set_defaults(handler=_export)

    status = sub.add_parser("status", help="a run's trials, best first (no run: every run under --runs)")
    status.add_argument("run", nargs="?", help="run folder")
    status.add_argument("--limit", type=int, default=20, help="rows to show (default 20)")
    status.add_argument("--runs", default="runs", help="folder of run folders (default: runs)")
    status.set_defaults(handler=_status)

    report = sub.add_parser("report", help="write report.md and report.png (curve, winner, per-layer parameters)")
    report.add_argument("run", help="run folder")
    report.set_defaults(handler=_report)
    return parser


def _quiet_libraries() -> None:
    """Library chatter (study creation logs, weight-loading bars) would hide our progress display."""
    import optuna
    import transformers

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except SpecError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        return 2
    except SearchError as err:
        console.print(f"[red]search stopped:[/red] {err}", highlight=False, soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
