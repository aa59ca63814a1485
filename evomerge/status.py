"""`evomerge status`: a run's trials as a table, best first, with the budget and the winner if chosen;
without a run, one line per run folder."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from evomerge.search import RunFolder, counted, load_run


def run_table(run_dir: Path, limit: int = 20) -> Table:
    run = RunFolder(run_dir)
    _, budget = load_run(run)
    trials = run.load_study().get_trials(deepcopy=False)
    finished = [t for t in trials if counted(t)]
    summary = run.read_summary()
    winner = summary["winner_trial"] if summary else None
    table = Table(title=f"{run_dir}: {len(finished)}/{budget} finished, "
                        f"{sum(t.state.name == 'FAIL' for t in trials)} failed"
                        + (f", winner: trial {winner}" if winner is not None else ""))
    for col in ("trial", "fidelity", "score", "method", "note"):
        table.add_column(col, justify="right" if col in ("trial", "score") else "left")
    ranked = sorted(finished, key=lambda t: (t.user_attrs.get("fidelity") == "full", t.values[0]), reverse=True)
    for t in ranked[:limit]:
        note = t.user_attrs.get("baseline") or ("winner" if t.number == winner else "")
        method = t.user_attrs.get("recipe", {}).get("merge_method", "")
        table.add_row(str(t.number), t.user_attrs.get("fidelity", ""), " ".join(f"{v:.4f}" for v in t.values),
                      method, note)
    return table


def runs_table(root: Path) -> Table:
    """Every run folder under ``root``: finished of budget, best full-fidelity search score, winner."""
    table = Table(title=f"runs in {root}")
    for col in ("run", "finished", "best search score", "winner"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for folder in sorted(p for p in root.iterdir() if (p / "spec.yaml").exists()) if root.is_dir() else []:
        run = RunFolder(folder)
        _, budget = load_run(run)
        trials = run.load_study().get_trials(deepcopy=False)
        full = [t.values[0] for t in trials if counted(t) and t.user_attrs.get("fidelity") == "full"]
        summary = run.read_summary()
        table.add_row(folder.name, f"{sum(counted(t) for t in trials)}/{budget}", f"{max(full):.4f}" if full else "-",
                      f"trial {summary['winner_trial']}" if summary else "-")
    return table
