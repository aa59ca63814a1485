"""The search spec (models, the space searched, the evaluation, the sampler), checked before any tensor is
read. The recipes a search proposes are ``evomerge.recipes``'s."""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from evomerge.errors import SpecError
from evomerge.params import Scalar
from evomerge.recipes import (
    MAX_PATH_LENGTH,
    DType,
    Placement,
    Seed,
    check_tokenizer_source,
    check_value,
)
from evomerge.registry import get_method
from evomerge.scores import task_shares
from evomerge.yaml_io import STRICT, describe_error, load_yaml_model


class Range(BaseModel):
    """Closed interval a searched parameter is drawn from (``log`` for scale-free ones)."""

    model_config = STRICT
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"range low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


@dataclass(frozen=True)
class Granularity:
    """How finely coefficients vary over layers: ``kind`` and, for groups:N and gradient:K, ``count``."""

    kind: Literal["global", "layer", "layer_module", "groups", "gradient"]
    count: int = 0

    @classmethod
    def parse(cls, text: str) -> Granularity:
        match = re.fullmatch(r"(global|layer|layer_module)|(groups|gradient):([1-9]\d*)", text)
        if not match or (match.group(2) == "gradient" and int(match.group(3)) < 2):
            raise ValueError(f"space.granularity {text!r} is not global, layer, layer_module, groups:N or "
                             "gradient:K (K >= 2)")
        return cls(match.group(1)) if match.group(1) else cls(match.group(2), int(match.group(3)))


class SpaceSpec(BaseModel):
    """What the sampler chooses: method(s), how finely coefficients vary over layers, and their ranges."""

    model_config = STRICT
    methods: list[str] = Field(["linear"], min_length=1)
    granularity: str = "layer"
    modules: list[str] = ["self_attn", "mlp"]
    parameters: dict[str, Range] = {"weight": Range(low=0.0, high=1.0)}
    fixed: dict[str, Scalar] = {}
    shared: list[str] = []  # searched once for the whole model (once per method group) instead of per slot
    method_granularity: str = "global"  # or groups:N: each range of blocks picks its own method
    # kind dataflow: the layer path instead (PathRecipe over `models`, outer `base_model`): r x M x L candidate
    # steps (r repeats of every model's blocks, interleaved by depth), each used or skipped, each scaled
    kind: Literal["weights", "dataflow"] = "weights"
    repeats: int = Field(2, ge=1, le=16)
    max_length: int | None = Field(None, ge=1, le=MAX_PATH_LENGTH)
    scale: Range | None = None  # None: every step at scale 1
    outer: str | None = None  # the model whose embeddings, final norm and head the path uses (None: base_model)

    WEIGHT_FIELDS: ClassVar[tuple[str, ...]] = ("methods", "granularity", "modules", "parameters", "fixed", "shared",
                                                "method_granularity")
    DATAFLOW_FIELDS: ClassVar[tuple[str, ...]] = ("repeats", "max_length", "scale", "outer")

    @functools.cached_property
    def grain(self) -> Granularity:
        """The granularity, parsed once (the string is what the YAML and the spec hash hold)."""
        return Granularity.parse(self.granularity)

    @functools.cached_property
    def method_groups(self) -> int | None:
        """How many layer groups choose their own method (None: one method for the whole model)."""
        grain = Granularity.parse(self.method_granularity)
        return grain.count if grain.kind == "groups" else None

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, value: str) -> str:
        Granularity.parse(value)
        return value

    @field_validator("method_granularity")
    @classmethod
    def _method_granularity(cls, value: str) -> str:
        if not re.fullmatch(r"global|groups:[1-9]\d*", value):
            raise ValueError(f"space.method_granularity {value!r} is not global or groups:N")
        return value

    @model_validator(mode="after")
    def _check(self) -> SpaceSpec:
        other = self.WEIGHT_FIELDS if self.kind == "dataflow" else self.DATAFLOW_FIELDS
        meaningless = [f for f in other if getattr(self, f) != SpaceSpec.model_fields[f].default]
        if meaningless:
            raise ValueError(f"space.{meaningless[0]} does not apply to space.kind {self.kind}")
        if self.scale is not None and not (self.scale.low > 0 and self.scale.high <= 4):
            raise ValueError(f"space.scale [{self.scale.low}, {self.scale.high}] must lie in (0, 4]")
        for name in self.methods:
            takes = get_method(name).parameters
            for param, rng in self.parameters.items():
                if param in takes:
                    for value in (rng.low, rng.high):
                        check_value(takes[param], param, value, f"space.parameters.{param}")
            for param, value in self.fixed.items():
                if param in takes:
                    check_value(takes[param], param, value, f"space.fixed.{param}")
        every = set().union(*[get_method(m).parameters for m in self.methods])
        unknown = [p for p in [*self.parameters, *self.fixed] if p not in every]
        if unknown:
            raise ValueError(f"space: no chosen method takes parameter {unknown[0]!r}")
        if self.method_groups is not None and len(self.methods) < 2:
            raise ValueError(f"space.method_granularity {self.method_granularity} needs at least two space.methods "
                             "to choose from")
        if self.method_groups is not None and self.grain.kind == "gradient":
            raise ValueError(f"space.granularity {self.granularity} spans the whole model, so with method_granularity "
                             f"{self.method_granularity} each group would search control points outside its blocks; "
                             "use layer, layer_module or groups:N")
        missing = [s for s in self.shared if s not in self.parameters]
        if missing:
            raise ValueError(f"space.shared names {missing[0]!r}, which is not in space.parameters")
        return self


SPLIT_PATTERN = re.compile(r"^(?P<split>[\w\-]+)(?:\[(?P<start>\d*):(?P<stop>\d*)\])?$")


def parse_split(value: str) -> tuple[str, slice]:
    """A split reference ``NAME`` or ``NAME[start:stop]``: the split's name and the doc-id slice."""
    match = SPLIT_PATTERN.match(value)
    if not match:
        raise SpecError(f"split {value!r} is not NAME or NAME[start:stop]")
    start, stop = match.group("start"), match.group("stop")
    return match.group("split"), slice(int(start) if start else None, int(stop) if stop else None)


class TaskSpec(BaseModel):
    """A benchmark task: lm-eval name, metric, weight, and the split (or doc range) of each role."""

    model_config = STRICT
    name: str
    metric: str = "acc"
    weight: float = Field(1.0, ge=0)
    splits: dict[Literal["search", "validation", "test"], str] = {
        "search": "search", "validation": "validation", "test": "test"}
    # lm-eval's task options, applied as lm-eval's ``simple_evaluate`` applies them; None: lm-eval's default
    OPTIONS: ClassVar[tuple[str, ...]] = ("num_fewshot", "apply_chat_template", "fewshot_as_multiturn",
                                          "system_instruction", "gen_kwargs")
    num_fewshot: int | None = Field(None, ge=0, strict=True)  # refused where the YAML fixes num_fewshot: 0
    apply_chat_template: bool | None = Field(None, strict=True)  # the tokenizer's chat template (it must have one)
    fewshot_as_multiturn: bool | None = Field(None, strict=True)  # None: lm-eval's default, apply_chat_template
    system_instruction: str | None = Field(None, min_length=1)
    gen_kwargs: dict[str, str | int | float | bool] | None = Field(None, min_length=1)  # generate_until tasks only

    @property
    def multiturn(self) -> bool:
        """Whether few-shot examples are separate chat turns (lm-eval's default: with a chat template)."""
        return bool(self.apply_chat_template) if self.fewshot_as_multiturn is None else self.fewshot_as_multiturn

    @model_validator(mode="after")
    def _options(self) -> TaskSpec:
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("fewshot_as_multiturn needs apply_chat_template: true (without a chat template it "
                             "would do nothing)")
        return self

    @field_validator("splits")
    @classmethod
    def _splits(cls, splits: dict[str, str]) -> dict[str, str]:
        for role, value in splits.items():
            try:
                _, rows = parse_split(value)
            except SpecError as err:
                raise ValueError(f"{role}: {err}") from None
            if rows.start is not None and rows.stop is not None and rows.start >= rows.stop:
                raise ValueError(f"{role}: split {value!r} is empty (start must be below stop)")
        return splits


class EvaluationSpec(BaseModel):
    model_config = STRICT
    tasks: list[TaskSpec] = Field(min_length=1)
    include_paths: list[str] = []  # task folders; "demo" is the built-in demo tasks
    search_examples: int | None = Field(500, ge=1)  # per task and candidate (None: the whole search split)
    # first-fidelity subset per task; a list races over several nested subsets (rungs, e.g. [25, 100]), the
    # paired test at each; None disables multi-fidelity
    screen_examples: Annotated[int, Field(ge=1)] | list[int] | None = 100
    # which search documents: the first ones, or an informative subset drawn from strata of the reference
    # models' answers on a pool of the first ``subset_pool`` search documents (None: all; evomerge.subsets)
    subset: Literal["first", "answers"] = "first"
    subset_pool: int | None = Field(None, ge=1)
    objective: Literal["weighted", "pareto"] = "weighted"
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = 64
    top_k: int = Field(5, ge=1)  # re-scored on validation at the end

    @property
    def weights(self) -> dict[str, float]:
        """Each task's weight by name (the weighted task mean's weights)."""
        return {t.name: t.weight for t in self.tasks}

    @property
    def rungs(self) -> list[int]:
        """The screening subsets' sizes per task, smallest first (empty: no screening)."""
        if self.screen_examples is None:
            return []
        return [self.screen_examples] if isinstance(self.screen_examples, int) else list(self.screen_examples)

    @model_validator(mode="after")
    def _check(self) -> EvaluationSpec:
        try:
            task_shares(self.weights)
        except SpecError as err:
            raise ValueError(f"evaluation.tasks: {err}") from None
        rungs = self.rungs
        if isinstance(self.screen_examples, list) and (not rungs or min(rungs) < 1):
            raise ValueError(f"evaluation.screen_examples {rungs}: a race needs one or more rungs of 1 example or more")
        if any(a >= b for a, b in itertools.pairwise(rungs)):
            raise ValueError(f"evaluation.screen_examples {rungs} must grow from one rung to the next")
        if rungs and self.search_examples is not None and rungs[-1] >= self.search_examples:
            raise ValueError("evaluation.screen_examples must be below search_examples")
        if self.subset == "first" and self.subset_pool is not None:
            raise ValueError("evaluation.subset_pool is read only with subset: answers")
        if self.subset == "answers" and self.search_examples is None:
            raise ValueError("evaluation.subset: answers needs search_examples (the subset's size per task)")
        if self.subset_pool is not None and self.search_examples is not None \
                and self.subset_pool <= self.search_examples:
            raise ValueError(f"evaluation.subset_pool ({self.subset_pool}) must exceed search_examples "
                             f"({self.search_examples}): the subset is drawn from the pool")
        return self


class ThenSpec(BaseModel):
    """A second stage after a parameter-space search (Sakana's PS then DFS): a data-flow search over the same
    models plus the first stage's winner, in the run folder's ``dataflow/``, with the same budget."""

    model_config = STRICT
    space: SpaceSpec
    sampler: Literal["cmaes", "cmaes-generations", "tpe", "random"] | None = None

    @model_validator(mode="after")
    def _check(self) -> ThenSpec:
        if self.space.kind != "dataflow":
            raise ValueError("then.space.kind must be dataflow (the stage after a parameter-space search)")
        return self


class SearchSpec(BaseModel):
    """A whole search: the models, the space, the evaluation and the sampler."""

    model_config = STRICT
    base_model: str
    models: list[str] = Field(min_length=1)
    space: SpaceSpec = SpaceSpec()
    evaluation: EvaluationSpec
    sampler: Literal["cmaes", "cmaes-generations", "tpe", "nsga2", "random"] | None = None  # None: from the space
    seed: Seed = 0
    dtype: DType = "float32"
    device: str = "auto"
    inputs_on: Placement = "auto"  # where, not what: left out of the spec's identity (search.spec_hash)
    then: ThenSpec | None = None
    tokenizer_source: str | None = None  # as in a recipe: models whose vocabularies differ (evomerge.vocab)

    @model_validator(mode="after")
    def _check(self) -> SearchSpec:
        check_tokenizer_source(self.tokenizer_source, self.base_model)
        if self.tokenizer_source is not None and (self.space.kind == "dataflow" or self.then is not None
                                                  or self.space.method_granularity != "global"):
            raise ValueError("tokenizer_source works with one method for the whole network (layer-wise recipes and "
                             "layer paths have none)")
        if self.then is not None:
            if self.space.kind != "weights":
                raise ValueError("then follows a parameter-space search: space.kind must be weights")
            try:  # the second stage's spec, checked now (its pool's first model is the winner to come)
                self.dataflow_stage("first-stage-winner")
            except ValidationError as err:
                raise ValueError(f"then: {describe_error(err)}") from None
        for name in self.space.methods:
            try:
                get_method(name).check_model_count(len(self.models))
            except SpecError as err:
                raise ValueError(f"space.methods: {err}") from None
        if self.sampler in ("cmaes", "cmaes-generations") and len(self.space.methods) > 1:
            raise ValueError(f"sampler {self.sampler} cannot choose among methods (categorical); use tpe or random")
        if self.space.outer is not None and self.space.outer not in [self.base_model, *self.models]:
            raise ValueError(f"space.outer {self.space.outer!r} is neither base_model nor one of models")
        if self.evaluation.objective == "pareto" and self.sampler in ("cmaes", "cmaes-generations"):
            raise ValueError("a pareto objective needs sampler nsga2, tpe or random")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpec:
        return load_yaml_model(cls, path)

    def dataflow_stage(self, winner: str) -> SearchSpec:
        """The ``then`` stage's own spec: ``winner`` (the first stage's exported winner) joins the models and,
        unless ``then.space.outer`` names another, gives the path its embeddings, final norm and head."""
        if self.then is None:
            raise SpecError("this spec has no then stage")
        stage = self.model_dump(mode="json", exclude_unset=True, exclude={"then", "space", "sampler"})
        space = self.then.space.model_dump(mode="json", exclude_unset=True)
        if space.get("outer") is None:  # so the winner's own blocks, a baseline, are the winner itself
            space["outer"] = winner
        return SearchSpec.model_validate({**stage, "models": [winner, *self.models], "space": space,
                                          "sampler": self.then.sampler})


def spec_hash(spec: SearchSpec) -> str:
    """The spec's identity in its run folder. Fields added later are left out while they hold the value that
    means "as before" (one method everywhere, no task options), so older run folders keep their hash; where the
    inputs live (``inputs_on``) changes no result and is never part of it."""
    unchanged: dict[str, Any] = {"inputs_on": True, "evaluation": {"tasks": {
        i: {o for o in TaskSpec.OPTIONS if getattr(task, o) is None} for i, task in enumerate(spec.evaluation.tasks)}}}
    if spec.evaluation.subset == "first":
        unchanged["evaluation"].update({"subset": True, "subset_pool": True})
    if spec.space.method_granularity == "global":
        unchanged["space"] = {"method_granularity"}
    if spec.space.kind == "weights":
        unchanged.setdefault("space", set()).update({"kind", *SpaceSpec.DATAFLOW_FIELDS})
    if spec.then is None:
        unchanged["then"] = True
    if spec.tokenizer_source is None:
        unchanged["tokenizer_source"] = True
    return hashlib.sha256(spec.model_dump_json(exclude=unchanged).encode()).hexdigest()[:16]


