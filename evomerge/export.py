"""Exporting a search's winner (or any trial) with the streaming merge engine, plus a model card."""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import SpecError
from evomerge.merge import merge_to_folder
from evomerge.search import RunFolder, load_run, summary_table_markdown
from evomerge.spec import Recipe


def trial_recipe(run: RunFolder, trial: int | None, storage: str | None = None) -> tuple[int, Recipe, dict]:
    """The chosen trial's number, recipe and recorded scores (default: the validated winner)."""
    summary = run.read_summary()
    if trial is None:
        if summary is None:
            raise SpecError(f"{run.root} has no summary.json yet (search not finished); pass --trial N")
        trial = summary["winner_trial"]
    trials = {t.number: t for t in run.load_study(storage).get_trials(deepcopy=False)}
    chosen = trials.get(trial)
    if chosen is None or "recipe" not in chosen.user_attrs or "scores" not in chosen.user_attrs:
        raise SpecError(f"trial {trial} of {run.root} has no evaluated recipe")
    scores = {"search": chosen.user_attrs["scores"], "fidelity": chosen.user_attrs.get("fidelity")}
    if summary and summary["winner_trial"] == trial:
        scores["summary"] = summary["table"]
    return trial, Recipe.model_validate(chosen.user_attrs["recipe"]), scores


def model_card(run: RunFolder, trial: int, recipe: Recipe, scores: dict) -> str:
    lines = [f"# Merged with evomerge (run `{run.root.name}`, trial {trial})", "",
             "## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", "", "## Scores", "",
             f"Search split ({scores['fidelity']} fidelity): " +
             ", ".join(f"{k} {v:.4f}" for k, v in scores["search"].items()), ""]
    if "summary" in scores:
        lines += summary_table_markdown(scores["summary"])
    lines += ["", "`mergekit_config.yml` reproduces this merge with `mergekit-yaml`.", ""]
    return "\n".join(lines)


def export_trial(run_dir: Path, out: Path, trial: int | None = None, force: bool = False) -> tuple[int, Path]:
    run = RunFolder(run_dir)
    load_run(run)
    number, recipe, scores = trial_recipe(run, trial)
    merge_to_folder(recipe, out, force=force, extra_files={"README.md": model_card(run, number, recipe, scores)})
    return number, out
