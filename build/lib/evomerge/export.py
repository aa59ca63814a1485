"""Exporting a search's winner (or any trial) with the streaming merge engine, plus a model card."""

from __future__ import annotations

import json
from pathlib import Path

import optuna

from evomerge.errors import SpecError
from evomerge.merge import merge_to_folder
from evomerge.search import STUDY_NAME, RunFolder, load_run
from evomerge.spec import Recipe


def trial_recipe(run: RunFolder, trial: int | None, storage: str | None = None) -> tuple[int, Recipe, dict]:
    """The chosen trial's number, recipe and recorded scores (default: the validated winner)."""
    summary = json.loads(run.summary.read_text()) if run.summary.exists() else None
    if trial is None:
        if summary is None:
            raise SpecError(f"{run.root} has no summary.json yet (search not finished); pass --trial N")
        trial = summary["winner_trial"]
    study = optuna.load_study(study_name=STUDY_NAME, storage=run.storage_url(storage))
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
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
        lines += ["| model | validation | test |", "|---|---|---|"]
        lines += [f"| {label} | {row['validation']:.4f} | {row['test']:.4f} |"
                  for label, row in scores["summary"].items()]
    lines += ["", "`mergekit_config.yml` reproduces this merge with `mergekit-yaml`.", ""]
    return "\n".join(lines)


def export_trial(run_dir: Path, out: Path, trial: int | None = None, force: bool = False) -> tuple[int, Path]:
    run = RunFolder(run_dir)
    load_run(run)
    number, recipe, scores = trial_recipe(run, trial)
    merge_to_folder(recipe, out, force=force, extra_files={"README.md": model_card(run, number, recipe, scores)})
    return number, out
