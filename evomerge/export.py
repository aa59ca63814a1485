"""Exporting a search's winner (or any trial) with the streaming merge engine, plus a model card."""

from __future__ import annotations

from pathlib import Path

from evomerge.dataflow import write_recipe_folder
from evomerge.errors import SpecError
from evomerge.layout import LayerLayout
from evomerge.recipes import RecipeForm
from evomerge.refs import hub_id_of, named_models
from evomerge.run import Attr, RunFolder, stored_recipe, summary_table_markdown


def trial_recipe(run: RunFolder, trial: int | None) -> tuple[int, RecipeForm, dict]:
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
    return trial, stored_recipe(chosen.user_attrs[Attr.RECIPE], f"trial {trial} of {run.root}"), scores


CARD_TAGS = ["merge", "mergekit", "evomerge"]


def card_metadata(recipe: RecipeForm) -> str:
    """The model card's Hugging Face metadata header (YAML front matter between ``---`` lines, as the Hub reads
    it), written by huggingface_hub's ``ModelCardData``: the Hub models the recipe reads as ``base_model``
    (the Hub links only repository ids, so local folders and demo models are left out),
    ``library_name: transformers`` and the merge tags."""
    from huggingface_hub import ModelCardData

    refs = [part for ref in recipe.model_refs for part in named_models(ref)]  # a LoRA's base and adapter
    hub_models = [hub_id[0] for hub_id in map(hub_id_of, refs) if hub_id is not None]
    data = ModelCardData(base_model=list(dict.fromkeys(hub_models)) or None, library_name="transformers",
                         tags=list(CARD_TAGS))
    return f"---\n{data.to_yaml().rstrip()}\n---\n"


def model_card(run_name: str, trial: int, recipe: RecipeForm, scores: dict, layout: LayerLayout | None) -> str:
    """README.md of an export: the metadata header, then the recipe (its YAML, then block by block over the base's
    ``layout``), its scores and the mergekit command."""
    lines = [f"# Merged with evomerge (run `{run_name}`, trial {trial})", "",
             "## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", "", *recipe.describe(layout),
             "## Scores", "",
             f"Search split ({scores['fidelity']} fidelity): " +
             ", ".join(f"{k} {v:.4f}" for k, v in scores["search"].items()), ""]
    if "summary" in scores:
        lines += summary_table_markdown(scores["summary"])
    lines += ["", f"`{recipe.mergekit_file}` reproduces this merge with mergekit: `{recipe.mergekit_command}`.", ""]
    return card_metadata(recipe) + "\n".join(lines)


def export_trial(run_dir: Path, out: Path, trial: int | None = None, force: bool = False) -> tuple[int, Path]:
    run = RunFolder(run_dir)
    run.load()
    number, recipe, scores = trial_recipe(run, trial)
    write_recipe_folder(recipe, out, force=force, extra_files={
        "README.md": model_card(run.root.name, number, recipe, scores, run.read_layout())},
                        protected=[run.root])
    return number, out
