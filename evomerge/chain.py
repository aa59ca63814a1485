"""The ``then:`` chain: a weight search, then a data-flow search over the models and its winner. The second
stage lives in its own run folder inside the first's and reads the first stage's winner from a folder there."""

from __future__ import annotations

from evomerge.merge import merge_to_folder
from evomerge.recipes import recipe_from_yaml
from evomerge.run import RunFolder, stored_recipe
from evomerge.spec import SearchSpec

STAGE_WINNER = "ps-winner"  # the first stage's winner, exported into the run folder for the then stage


STAGE_FOLDER = "dataflow"  # the then stage's run folder, inside the first stage's


def dataflow_stage(spec: SearchSpec, run: RunFolder) -> tuple[SearchSpec, RunFolder]:
    """The ``then`` stage of ``spec``'s run: its spec (the first stage's winner folder among the models) and
    its run folder. Reads nothing."""
    return spec.dataflow_stage(str((run.root / STAGE_WINNER).resolve())), RunFolder(run.root / STAGE_FOLDER)


def export_stage_winner(run: RunFolder, fixed: bool) -> None:
    """Write the first stage's winner into the run folder, where the then stage's pool reads it. Once the
    then stage has begun (``fixed``) the folder is kept as it is; before, a winner that changed (the first
    stage resumed with a larger budget) replaces it."""

    folder = run.root / STAGE_WINNER
    winner = stored_recipe(run.read_summary()["winner_recipe"], f"{run.summary}: winner_recipe")
    written = folder / "evomerge_recipe.yaml"
    if folder.exists() and (fixed or (written.is_file() and recipe_from_yaml(written) == winner)):
        return
    merge_to_folder(winner, folder, force=True)
