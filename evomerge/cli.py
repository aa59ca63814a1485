"""The ``evomerge`` command: argument parsing, progress display and exit codes (2 = bad input)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from evomerge.errors import SpecError

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary merge search for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="apply a fixed recipe (no search) and write a Hugging Face folder")
    merge.add_argument("recipe", help="recipe YAML (evomerge or mergekit format)")
    merge.add_argument("--out", required=True, help="output folder")
    merge.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    merge.add_argument("--shard-size", type=float, default=2.0, help="maximum shard size in GiB (default 2)")
    merge.set_defaults(run=_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except SpecError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
