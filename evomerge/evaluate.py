"""lm-eval on a live model: tasks built once, then per candidate only the documents asked for.

The model is wrapped once in lm-eval's ``HFLM``; in-place weight changes are seen by the next call
because nothing caches model outputs. Each task is loaded once per split role (search / validation /
test) from its own YAML with that split as its ``test_split``; per call ``lm_eval.evaluator.evaluate``
runs on the chosen doc ids with ``log_samples`` so every example's score comes back (for pruning).
"""

from __future__ import annotations

import logging
import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from evomerge.errors import SpecError

ROLES = ("search", "validation", "test")
SPLIT_PATTERN = re.compile(r"^(?P<split>[\w\-]+)(?:\[(?P<start>\d*):(?P<stop>\d*)\])?$")


@dataclass(frozen=True)
class TaskRef:
    """One benchmark task: lm-eval name, the metric read from it, its weight in the score, and for each
    role the dataset split it reads, optionally a doc-id range of it (``"test[0:500]"``)."""

    name: str
    metric: str = "acc"
    weight: float = 1.0
    splits: dict[str, str] = field(default_factory=lambda: {r: r for r in ROLES})


@dataclass
class EvalResult:
    """Scores of one candidate: per task, the weighted mean, and per example (keyed by doc id)."""

    scores: dict[str, float]
    examples: dict[str, dict[int, float]]
    weights: dict[str, float]

    @property
    def score(self) -> float:
        total = sum(self.weights.values())
        return sum(self.weights[t] * s for t, s in self.scores.items()) / total


def parse_split(value: str) -> tuple[str, slice]:
    match = SPLIT_PATTERN.match(value)
    if not match:
        raise SpecError(f"split {value!r} is not NAME or NAME[start:stop]")
    start, stop = match.group("start"), match.group("stop")
    return match.group("split"), slice(int(start) if start else None, int(stop) if stop else None)


def _quiet_lm_eval() -> None:
    """No logs or progress bars from lm-eval per candidate: the search draws its own progress."""
    import functools

    import lm_eval.api.task
    from tqdm import tqdm

    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    lm_eval.api.task.tqdm = functools.partial(tqdm, disable=True)


class DocIds(list):
    """Sorted doc ids with O(1) membership: lm-eval tests ``i in samples`` for every document of the split
    and maps results back by position, which is only right for ascending ids."""

    def __init__(self, ids: Sequence[int]) -> None:
        super().__init__(sorted(set(ids)))
        self._members = frozenset(self)

    def __contains__(self, item: object) -> bool:
        return item in self._members


def _materialize_docs(task) -> None:
    """Hold the evaluated split as a list of dicts (processed once): iterating an Arrow dataset row by row
    on every call costs more than the tiny models' forward passes."""
    split = task.config.test_split
    docs = task.test_docs()
    task.dataset = {**task.dataset, split: list(docs)}
    task.config.process_docs = None


def _cache_requests(task) -> None:
    """Build the task's lm-eval requests now, once for every document of its split, and from then on hand
    out the chosen documents' requests (emptied of the last candidate's answers) on each call. A prompt
    depends on its document only, so rebuilding it per candidate is wasted work; and a few-shot prompt is
    drawn once per document, so every candidate is scored on the same prompts instead of fresh draws.
    The requests are built with lm-eval's defaults (no system prompt or chat template), which is how
    ``Evaluator.evaluate`` calls it."""
    task.build_all_requests()
    by_doc: dict[int, list] = {}
    for instance in task.instances:
        by_doc.setdefault(instance.doc_id, []).append(instance)

    def build_chosen(*, samples: Sequence[int] | None = None, limit: int | None = None, **_defaults) -> None:
        chosen = samples if samples is not None else range(len(by_doc))[:limit]
        instances = []
        for position, doc_id in enumerate(chosen):  # lm-eval numbers the chosen documents by position
            for instance in by_doc[doc_id]:
                instance.doc_id, instance.resps, instance.filtered_resps = position, [], {}
                instances.append(instance)
        task._instances = instances

    task.build_all_requests = build_chosen


def _long_tensor(rows: Sequence[Sequence[int]], width: int, pad: int, device: torch.device) -> torch.Tensor:
    """Right-padded int64 matrix from token lists (via one flat buffer: ``torch.tensor`` on nested lists
    costs more than the small demo model's forward pass)."""
    flat = array("q")
    for row in rows:
        flat.extend(row)
        flat.extend([pad] * (width - len(row)))
    return torch.frombuffer(flat, dtype=torch.long).view(len(rows), width).to(device)


@torch.no_grad()
def score_continuations(model: torch.nn.Module, requests: Sequence[tuple[list[int], list[int]]], max_length: int,
                        batch_size: int, pad_id: int) -> list[tuple[float, bool]]:
    """(sum of continuation log-probs, every continuation token is the argmax) per (context, continuation)
    token pair: right-padded batches, longest first, one gather per batch instead of a loop per request.
    Only the continuation positions' logits are kept, so a large vocabulary costs no copy."""
    inputs, continuations = [], []
    for context, continuation in requests:
        whole = (context + continuation)[-(max_length + 1):]
        inputs.append(whole[:-1])
        continuations.append(whole[1:][-len(continuation):])  # at most what the kept input can predict
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    device = next(model.parameters()).device
    n_cont = max(len(c) for c in continuations)
    offsets = torch.arange(n_cont, device=device)
    targets = _long_tensor([continuations[i] for i in order], n_cont, 0, device)
    lengths = torch.tensor([len(continuations[i]) for i in order], device=device)
    first = torch.tensor([len(inputs[i]) - len(continuations[i]) for i in order], device=device)
    logprobs, hits = [], []
    for start in range(0, len(order), batch_size):
        batch = slice(start, start + batch_size)
        width = len(inputs[order[start]])
        ids = _long_tensor([inputs[i] for i in order[batch]], width, pad_id, device)
        positions = (first[batch].unsqueeze(1) + offsets).clamp(max=width - 1)
        logits = model(ids, use_cache=False).logits
        picked = logits[torch.arange(len(ids), device=device).unsqueeze(1), positions].float()  # (b, n_cont, vocab)
        target = targets[batch].unsqueeze(-1)
        logprobs.append((picked.gather(-1, target) - picked.logsumexp(-1, keepdim=True)).squeeze(-1))
        hits.append(picked.argmax(-1) == targets[batch])
    valid = offsets < lengths.unsqueeze(1)
    sums = (torch.cat(logprobs) * valid).sum(dim=1).tolist()
    greedy = (torch.cat(hits) | ~valid).all(dim=1).tolist()
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for j, i in enumerate(order):
        out[i] = (sums[j], greedy[j])
    return out


def _fast_hflm():
    """lm-eval's HFLM made cheap per call: no progress bars, tokenization cached (prompts and answers are the
    same text every candidate; weights change, strings do not) and causal scoring vectorized per batch."""
    from lm_eval.models.huggingface import HFLM

    class FastHFLM(HFLM):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._token_cache: dict[tuple, tuple[int, ...]] = {}
            self._probed: tuple[int, int] | None = None  # (longest request probed, batch size found)

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            key = (string, add_special_tokens, tuple(sorted(kwargs.items())))
            cached = self._token_cache.get(key)
            if cached is None:
                cached = self._token_cache[key] = tuple(super().tok_encode(string, add_special_tokens, **kwargs))
            return list(cached)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            if self.backend != "causal":
                return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            size = override_bs or self.batch_size
            if size == "auto":
                size = self._auto_batch_size(requests)
            return score_continuations(self.model, [(ctx, cont) for _, ctx, cont in requests], self.max_length,
                                       size, self.tokenizer.pad_token_id or 0)

        def _auto_batch_size(self, requests) -> int:
            """lm-eval's out-of-memory probe (halving from ``max_batch_size``) on the longest request, run
            again only when a longer request than any probed before comes, not on every candidate."""
            lengths = [len(context) + len(continuation) for _, context, continuation in requests]
            longest = max(range(len(lengths)), key=lengths.__getitem__)
            if self._probed is None or lengths[longest] > self._probed[0]:
                self._probed = (lengths[longest], self._detect_batch_size(requests, longest))
            return self._probed[1]

        def loglikelihood(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = True):
            return super().generate_until(requests, disable_tqdm=True)

    return FastHFLM


def _task_config(manager, name: str) -> dict:
    """A task's YAML config as a dict, with relative local data files made absolute."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index[name]
    if entry.yaml_path is None:
        raise SpecError(f"task {name!r} is defined in Python, not YAML; evomerge needs a YAML task")
    config = dict(load_yaml(entry.yaml_path, resolve_func=True))
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        folder = Path(entry.yaml_path).parent
        config["dataset_kwargs"]["data_files"] = {
            k: str(folder / v) if not Path(v).is_absolute() and (folder / v).exists() else v
            for k, v in files.items()}
    return config


def find_tasks(names: Sequence[str], include_paths: Sequence[str | Path] = ()):
    """A TaskManager that knows every named task: the include paths alone when they suffice (fast),
    else with lm-eval's bundled registry; SpecError naming the first task found nowhere."""
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    paths = [str(p) for p in include_paths]
    missing = [p for p in paths if not Path(p).is_dir()]
    if missing:
        raise SpecError(f"task folder not found: {missing[0]}")
    manager = TaskManager(include_path=paths or None, include_defaults=False)
    if any(n not in manager.task_index for n in names):
        manager = TaskManager(include_path=paths or None, include_defaults=True)
    unknown = [n for n in names if n not in manager.task_index]
    if unknown:
        raise SpecError(f"task {unknown[0]!r} not found (is its folder in include_paths?)")
    return manager


class Evaluator:
    """Scores the current weights of one live model on named tasks; built once per worker."""

    def __init__(self, model: torch.nn.Module, tokenizer, tasks: Sequence[TaskRef],
                 include_paths: Sequence[str | Path] = (), batch_size: int | str = 64) -> None:
        self.tasks = {t.name: t for t in tasks}
        manager = find_tasks(list(self.tasks), include_paths)
        max_length = getattr(model.config, "max_position_embeddings", None)
        self.lm = _fast_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        self._loaded: dict[str, dict] = {}
        self._doc_ids: dict[tuple[str, str], list[int]] = {}
        configs = {t.name: _task_config(manager, t.name) for t in tasks}
        for role in ROLES:
            parsed = {t.name: parse_split(t.splits[role]) for t in tasks}
            specs = [{**configs[name], "task": self.task_key(name, role), "test_split": split,
                      "validation_split": None, "training_split": None, "fewshot_split": None}
                     for name, (split, _) in parsed.items()]
            self._loaded[role] = manager.load(specs)
            for name, (_, id_range) in parsed.items():
                built = self._loaded[role]["tasks"][self.task_key(name, role)]
                _materialize_docs(built)
                _cache_requests(built)
                self._doc_ids[(name, role)] = list(range(len(built.test_docs())))[id_range]

    @staticmethod
    def task_key(name: str, role: str) -> str:
        return f"{name}@{role}"

    def doc_ids(self, task: str, role: str) -> list[int]:
        """All doc ids a role may use for a task."""
        return self._doc_ids[(task, role)]

    @torch.no_grad()
    def evaluate(self, role: str, doc_ids: dict[str, Sequence[int]] | None = None) -> EvalResult:
        """Score the model as it is now on ``role``'s documents (all of them, or ``doc_ids`` per task)."""
        from lm_eval.evaluator import evaluate

        ids = {self.task_key(t, role): DocIds(doc_ids[t] if doc_ids and t in doc_ids else self.doc_ids(t, role))
               for t in self.tasks}
        out = evaluate(self.lm, self._loaded[role], samples=ids, log_samples=True, bootstrap_iters=0)
        scores, examples = {}, {}
        for name, task in self.tasks.items():
            key = self.task_key(name, role)
            scores[name] = float(out["results"][key][f"{task.metric},none"])
            examples[name] = {int(s["doc_id"]): float(s[task.metric]) for s in out["samples"][key]}
        return EvalResult(scores, examples, {n: t.weight for n, t in self.tasks.items()})
