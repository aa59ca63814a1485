"""Exporting a search's winner (or any trial) with the streaming merge engine, plus a model card."""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import SpecError
from evomerge.merge import merge_to_folder
from evomerge.run import Attr, RunFolder, summary_table_markdown
from evomerge.spec import Recipe


def trial_recipe(run: RunFolder, trial: int | None) -> tuple[int, Recipe, dict]:
    """The chosen trial's number, recipe and recorded scores (default: the validated winner). Reads only."""
    summary = run.read_summary()
    if trial is None:
        if summary is None:
            raise SpecError(f"{run.root} has no summary.json yet (search not finished); pass --trial N")
        trial = summary["winner_trial"]
    chosen = next((t for t in run.trials() if t.number == trial), None)
    if chosen is None or Attr.RECIPE not in chosen.user_attrs or Attr.SCORES not in chosen.user_attrs:
        raise SpecError(f"trial {trial} of {run.root} has no evaluated recipe")
    scores = {"search": chosen.user_attrs[Attr.SCORES], "fidelity": chosen.user_attrs.get(Attr.FIDELITY)}
    if summary and summary["winner_trial"] == trial:
        scores["summary"] = summary["table"]
    return trial, Recipe.model_validate(chosen.user_attrs[Attr.RECIPE]), scores


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
    run.load()
    number, recipe, scores = trial_recipe(run, trial)
    merge_to_folder(recipe, out, force=force, extra_files={"README.md": model_card(run, number, recipe, scores)},
                    protected=[run.root])
    return number, out
