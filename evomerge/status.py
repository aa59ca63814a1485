"""`evomerge status`: a run's trials as a table, best first, with the budget and the winner if chosen;
without a run, one line per run folder (a broken run is one line saying what is wrong). Reads only."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table
from rich.text import Text

from evomerge.errors import SpecError
from evomerge.run import Attr, RunFolder, counted, examples_scored, stored_recipe


def run_table(run_dir: Path, limit: int = 20) -> Table:
    run = RunFolder(run_dir)
    budget = run.budget()
    study = run.load_study()
    trials = study.get_trials(deepcopy=False)
    summary = run.read_summary()
    finished = [t for t in trials if counted(t)]
    winner = summary["winner_trial"] if summary else None
    cap = run.max_examples()
    table = Table(title=Text(f"{run_dir}: {len(finished)}/{budget} finished, "
                             f"{sum(t.state.name == 'FAIL' for t in trials)} failed, {examples_scored(study)} "
                             f"examples scored" + (f" (at most {cap})" if cap is not None else "")
                             + (f", winner: trial {winner}" if winner is not None else "")))
    for col in ("trial", "fidelity", "score", "method", "note"):
        table.add_column(col, justify="right" if col in ("trial", "score") else "left")
    ranked = sorted(finished, key=lambda t: (t.user_attrs.get(Attr.FIDELITY) == "full", t.values[0]), reverse=True)
    for t in ranked[:limit]:
        note = t.user_attrs.get(Attr.BASELINE) or ("winner" if t.number == winner else "")
        method = stored_recipe(t.user_attrs.get(Attr.RECIPE), f"trial {t.number}'s recipe").label
        table.add_row(str(t.number), t.user_attrs.get(Attr.FIDELITY, ""), " ".join(f"{v:.4f}" for v in t.values),
                      method, Text(note))
    return table


def runs_table(root: Path) -> Table:
    """Every run folder under ``root``: finished of budget, best full-fidelity search score, winner. A ``root``
    that is not a folder is an error, not an empty table."""
    if not root.is_dir():
        raise SpecError(f"--runs {root}: {'not a folder' if root.exists() else 'no such folder'}")
    table = Table(title=Text(f"runs in {root}"))
    for col in ("run", "finished", "best search score", "winner"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for folder in sorted(p for p in root.iterdir() if (p / "spec.yaml").exists()):
        run = RunFolder(folder)
        try:
            budget = run.budget()
            trials = run.trials()
            summary = run.read_summary()
        except SpecError as err:
            table.add_row(Text(folder.name), Text(f"unreadable: {err}", style="red"), "-", "-")
            continue
        full = [t.values[0] for t in trials if counted(t) and t.user_attrs.get(Attr.FIDELITY) == "full"]
        table.add_row(Text(folder.name), f"{sum(counted(t) for t in trials)}/{budget}",
                      f"{max(full):.4f}" if full else "-", f"trial {summary['winner_trial']}" if summary else "-")
    return table
