"""`evomerge report RUN`: what a run found, as ``report.md`` and ``report.png`` in the run folder.

The page says how the budget was spent (full vs screened trials, failures, duplicates, time), how the
best search score grew, the winner's validation/test table when the search was finalized, and the
winner's method and parameters per layer (each layer's mean over its tensors, as the merge resolves them).
It reads the run folder only (the base's block layout is recorded there): no torch, no model folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from evomerge.errors import SpecError
from evomerge.files import atomic_write_text
from evomerge.layout import LayerLayout
from evomerge.recipes import RecipeForm
from evomerge.run import (
    Attr,
    RunFolder,
    counted,
    describe_margin,
    examples_scored,
    stored_recipe,
    summary_table_markdown,
)
from evomerge.scores import weighted_mean
from evomerge.spec import SearchSpec


@dataclass(frozen=True)
class TrialPoint:
    """One finished, non-duplicate trial in the order it was told."""

    number: int
    fidelity: str
    score: float


def trial_points(spec: SearchSpec, trials: list[optuna.trial.FrozenTrial]) -> list[TrialPoint]:
    return [TrialPoint(t.number, t.user_attrs.get(Attr.FIDELITY, "full"),
                       weighted_mean(t.user_attrs[Attr.SCORES], spec.evaluation.weights))
            for t in trials if counted(t) and Attr.SCORES in t.user_attrs]


def best_so_far(points: list[TrialPoint]) -> list[float | None]:
    """After each finished trial, the best weighted search score among full-fidelity trials so far."""
    out: list[float | None] = []
    best = None
    for p in points:
        if p.fidelity == "full" and (best is None or p.score > best):
            best = p.score
        out.append(best)
    return out


def _markdown(run: RunFolder, spec: SearchSpec, budget: int, trials: list[optuna.trial.FrozenTrial], examples: int,
              points: list[TrialPoint], curve: list[float | None], chosen: tuple[str, RecipeForm] | None,
              layout: LayerLayout | None, summary: dict | None, png: Path) -> str:
    full = sum(p.fidelity == "full" for p in points)
    failed = sum(t.state == TrialState.FAIL for t in trials)
    duplicates = sum(Attr.DUPLICATE_OF in t.user_attrs for t in trials)
    seconds = sum(row.get("seconds", 0.0) for row in run.log_rows())
    lines = [f"# evomerge run `{run.root.name}`", "",
             f"- models: {', '.join(spec.models)} (base {spec.base_model})",
             f"- space: methods {', '.join(spec.space.methods)} (chosen per {spec.space.method_granularity}), "
             f"granularity {spec.space.granularity}; "
             f"sampler {spec.sampler or 'default'}, seed {spec.seed}",
             f"- budget {budget}: {len(points)} finished ({full} full, {len(points) - full} screened), "
             f"{failed} failed, {duplicates} duplicates; {examples} examples scored, {seconds:.0f} s in candidate "
             "evaluations",
             *([f"- {run.layout_file.name} is missing, as in run folders written before evomerge recorded the base's "
                "block layout: no per-layer tables (resuming the search records it)"] if layout is None else []), ""]
    if points:
        lines += ["## Best search score so far", "", "| finished trials | best search score |", "|---|---|"]
        step = max(1, len(points) // 10)
        marks = sorted({*range(step, len(points) + 1, step), len(points)})
        lines += [f"| {k} | {'-' if curve[k - 1] is None else f'{curve[k - 1]:.4f}'} |" for k in marks]
        lines.append("")
    if summary:
        lines += [f"## Winner: trial {summary['winner_trial']} (chosen on validation)", "",
                  *summary_table_markdown(summary["table"]), "",
                  describe_margin(summary["margin_vs_uniform_average"]) + ".", ""]
    elif chosen is not None:
        lines += [f"## {chosen[0]} (not finalized: no validation re-check yet)", ""]
    if chosen is not None:
        lines += ["Recipe:", "", "```yaml", chosen[1].to_yaml().rstrip(), "```", ""]
        lines += chosen[1].describe(layout)
    lines += [f"![search]({png.name})", ""]
    return "\n".join(lines)


def _plot(points: list[TrialPoint], curve: list[float | None], label: str,
          per_layer: dict[str, dict[str, list[float | None]]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if per_layer else 1, figsize=(11 if per_layer else 6, 4), squeeze=False)
    ax = axes[0][0]
    for fidelity, marker in (("full", "o"), ("screen", "x")):
        shown = [(i, p.score) for i, p in enumerate(points, start=1) if p.fidelity == fidelity]
        if shown:
            ax.scatter(*zip(*shown, strict=True), marker=marker, s=14, label=f"{fidelity} trials", alpha=0.6)
    ax.step(range(1, len(points) + 1), [float("nan") if c is None else c for c in curve], where="post",
            color="black", label="best so far")
    ax.set_xlabel("finished trials")
    ax.set_ylabel("weighted search score")
    ax.legend(fontsize=8)
    if per_layer:
        param, by_model = next(iter(per_layer.items()))
        ax = axes[0][1]
        for model, values in by_model.items():
            ax.plot(range(len(values)), [float("nan") if v is None else v for v in values], marker="o", label=model)
        ax.set_xticks(range(len(values)))
        ax.set_xlabel("layer")
        ax.set_ylabel(param)
        ax.set_title(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(png)


def write_report(run_dir: Path) -> Path:
    """Write ``report.md`` and ``report.png`` into the run folder; returns the Markdown path."""
    run = RunFolder(run_dir)
    spec, budget = run.load()
    study = run.load_study()
    trials = study.get_trials(deepcopy=False)
    points = trial_points(spec, trials)
    curve = best_so_far(points)
    summary = run.read_summary()
    full = [p for p in points if p.fidelity == "full"]
    chosen = None
    if summary:
        chosen = (f"winner: trial {summary['winner_trial']}", stored_recipe(summary["winner_recipe"], "summary"))
    elif full:
        best = max(full, key=lambda p: p.score)
        recipe = stored_recipe(trials[best.number].user_attrs.get(Attr.RECIPE), f"trial {best.number}'s recipe")
        chosen = (f"best trial so far: {best.number}", recipe)
    layout = run.read_layout()
    per_layer = {} if chosen is None or layout is None else chosen[1].per_layer(layout)
    png, out = run.root / "report.png", run.root / "report.md"
    if not os.access(run.root, os.W_OK | os.X_OK):  # a read-only file system
        raise SpecError(f"cannot write the report into {run.root}: not a writable folder")
    for path in (png, out):
        if path.exists() and not path.is_file():
            raise SpecError(f"{path} is in the way: not a file")
    text = _markdown(run, spec, budget, trials, examples_scored(study), points, curve, chosen, layout, summary,
                     png)  # every input read (and the trial log checked) before either file is written
    _plot(points, curve, chosen[0] if chosen is not None else "", per_layer, png)
    atomic_write_text(out, text)
    return out
