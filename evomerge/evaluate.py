"""lm-eval on a live model: tasks built once, then per candidate only the documents asked for.

The model is wrapped once in lm-eval's ``HFLM``; in-place weight changes are seen by the next call
because nothing caches model outputs. Each task is loaded once per split role (search / validation /
test) from its own YAML with that split as its ``test_split``; per call ``lm_eval.evaluator.evaluate``
runs on the chosen doc ids with ``log_samples`` so every example's score comes back (for pruning).
Everything that reaches into lm-eval beyond its public API sits in one section at the end of this file.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from evomerge.errors import SpecError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager
from evomerge.scores import weighted_mean
from evomerge.spec import TaskSpec, parse_split

ROLES = ("search", "validation", "test")
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed (simple_evaluate and its CLI)


@dataclass
class EvalResult:
    """Scores of one candidate: per task, the weighted mean, and per example (keyed by doc id)."""

    scores: dict[str, float]
    examples: dict[str, dict[int, float]]
    weights: dict[str, float]

    @property
    def score(self) -> float:
        return weighted_mean(self.scores, self.weights)


def _split_of(task: TaskSpec, role: str) -> str:
    """The split (or doc range) a task reads in a role; a role the spec leaves out reads the split of its name."""
    return task.splits.get(role, role)


def check_tasks(tasks: Sequence[TaskSpec], include_paths: Sequence[str | Path] = (),
                tokenizer: str | Path | None = None) -> None:
    """Every task problem that the YAML files show, found before any model or dataset is loaded: an unknown
    task, metric or split, a missing local data file, an empty doc range or (local JSONL) one past the end,
    duplicate tasks, task options the task cannot take. With ``tokenizer`` (a model folder or Hub id), also a
    chat template asked of a tokenizer without one (only the tokenizer is loaded). A SpecError of one line
    names the first."""
    manager = find_tasks([t.name for t in tasks], include_paths)
    _check_configs(tasks, {t.name: _task_config(manager, t.name) for t in tasks})
    if tokenizer is not None and any(t.apply_chat_template for t in tasks):
        from transformers import AutoTokenizer

        try:
            loaded = AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as err:
            raise SpecError(f"the tokenizer of {tokenizer} cannot be loaded for apply_chat_template: "
                            f"{str(err).splitlines()[0]}") from None
        _check_chat_template(tasks, loaded)


def _check_chat_template(tasks: Sequence[TaskSpec], tokenizer) -> None:
    """apply_chat_template needs a tokenizer with a chat template (HFLM would fail on the first prompt)."""
    chat = [t.name for t in tasks if t.apply_chat_template]
    if chat and not getattr(tokenizer, "chat_template", None):
        raise SpecError(f"task {chat[0]} sets apply_chat_template, but the model's tokenizer has no chat template")


def find_tasks(names: Sequence[str], include_paths: Sequence[str | Path] = ()) -> TaskManager:
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


def _check_configs(tasks: Sequence[TaskSpec], configs: dict[str, dict]) -> None:
    """The checks of ``check_tasks`` on the tasks' YAML configs."""
    names = [t.name for t in tasks]
    twice = [n for n in names if names.count(n) > 1]
    if twice:
        raise SpecError(f"task {twice[0]} is listed twice in evaluation.tasks")
    for task in tasks:
        config = configs[task.name]
        _result_key(task, _result_keys(_config_metrics(config), config.get("filter_list")))
        _check_options(task, config)
        files = _data_files(config)  # None: a dataset from the Hub, whose splits and sizes show once downloaded
        missing = [p for paths in (files or {}).values() for p in paths if _is_local(p) and not Path(p).exists()]
        if missing:
            raise SpecError(f"task {task.name}: data file not found: {missing[0]}")
        for role in ROLES:
            split = parse_split(_split_of(task, role))[0]
            if files is not None and split not in files:
                raise SpecError(f"task {task.name} has no split {split!r} (splits.{role}); it has: {', '.join(files)}")
            _check_range(task, role, None if files is None else _count_docs(files[split], config))
            shots = _fewshot_split(task, config, split)
            if shots is not None and files is not None and shots not in files:
                raise SpecError(f"task {task.name} draws few-shot examples from split {shots!r}, which it lacks; "
                                f"it has: {', '.join(files)}")


def _check_options(task: TaskSpec, config: dict) -> None:
    """lm-eval task options that the task's YAML rules out."""
    output_type = config.get("output_type", "generate_until")
    if task.gen_kwargs is not None and output_type != "generate_until":
        raise SpecError(f"task {task.name}: gen_kwargs apply to generate_until tasks only; it is {output_type}")
    if task.num_fewshot is not None and config.get("num_fewshot") == 0:
        raise SpecError(f"task {task.name} fixes num_fewshot: 0 in its YAML; lm-eval ignores a num_fewshot for it")


def _num_fewshot(task: TaskSpec, config: dict) -> int:
    """The few-shot examples per prompt as lm-eval's ``simple_evaluate`` settles them: the spec's number, else
    the YAML's, else 0 (a YAML's 0 is never overridden)."""
    if task.num_fewshot is not None and config.get("num_fewshot") != 0:
        return task.num_fewshot
    return config.get("num_fewshot") or 0


def _fewshot_split(task: TaskSpec, config: dict, split: str) -> str | None:
    """Where a role reading ``split`` draws few-shot examples (None: none, or the YAML's own hard-coded
    ``fewshot_config.samples``, which a split would override in lm-eval): lm-eval's order, the YAML's
    fewshot_config split, fewshot_split, training_split, validation_split, else the evaluated split itself
    (each document then left out of its own examples, as lm-eval does)."""
    if _num_fewshot(task, config) == 0:
        return None
    fewshot = config.get("fewshot_config") or {}
    explicit = fewshot.get("split") or config.get("fewshot_split") or config.get("training_split") \
        or config.get("validation_split")
    if explicit is None and fewshot.get("samples") is not None:
        return None
    return explicit or split


def _check_range(task: TaskSpec, role: str, size: int | None) -> None:
    """A doc range must select documents, and (where the split's size is known) lie within the split."""
    split, ids = parse_split(_split_of(task, role))
    where = f"task {task.name} splits.{role} {_split_of(task, role)!r}"
    if ids.stop is not None and (ids.start or 0) >= ids.stop:
        raise SpecError(f"{where} selects no documents")
    if size is not None and ids.stop is not None and ids.stop > size:
        raise SpecError(f"{where} reaches past the end of split {split!r} ({size} documents)")
    if size is not None and not range(size)[ids]:
        raise SpecError(f"{where} selects no documents (split {split!r} has {size})")


def _result_key(task: TaskSpec, keys: Sequence[str]) -> tuple[str, str]:
    """(metric, filter) of lm-eval's results key ``metric,filter`` that a task's ``metric`` names: either that
    key, or a metric name alone when the task has it under one filter only (``none`` without a filter_list)."""
    if "," in task.metric:
        chosen = [task.metric] if task.metric in keys else []
    else:
        chosen = [k for k in keys if k.partition(",")[0] == task.metric]
    if len(chosen) == 1:
        metric, _, filter_name = chosen[0].partition(",")
        return metric, filter_name
    if chosen:
        raise SpecError(f"task {task.name} has metric {task.metric!r} under several filters; name one of: "
                        f"{', '.join(chosen)}")
    offered = ", ".join(k.removesuffix(",none") for k in keys)
    raise SpecError(f"task {task.name} has no metric {task.metric!r}; it has: {offered}")


def _result_keys(metrics: Iterable[str], filter_list: Sequence[dict] | None) -> list[str]:
    """A task's results keys as lm-eval writes them: ``metric,filter`` for every metric under every filter."""
    filters = [f["name"] for f in filter_list or ()] or ["none"]
    return [f"{metric},{name}" for name in filters for metric in dict.fromkeys(metrics)]


def _data_files(config: dict) -> dict[str, list[str]] | None:
    """A task's local data files per split (a single file or list is the split ``train``, as in ``datasets``);
    None for a dataset without ``data_files``."""
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return None
    if not isinstance(files, dict):
        files = {"train": files}
    return {split: [paths] if isinstance(paths, str) else list(paths) for split, paths in files.items()}


def _is_local(path: str) -> bool:
    """A plain local path (not a URL or a glob pattern)."""
    return "://" not in path and not any(c in path for c in "*?[")


def _count_docs(paths: Sequence[str], config: dict) -> int | None:
    """Documents in a split when cheap to know: local JSONL files read as they are (one document a line)."""
    plain = not config.get("process_docs") and "field" not in (config.get("dataset_kwargs") or {})
    if not plain or not all(_is_local(p) and p.endswith(".jsonl") for p in paths):
        return None
    with_docs = 0
    for path in paths:
        with open(path, "rb") as lines:
            with_docs += sum(1 for line in lines if line.strip())
    return with_docs


class Evaluator:
    """Scores the current weights of one live model on named tasks; built once per worker."""

    def __init__(self, model: torch.nn.Module, tokenizer, tasks: Sequence[TaskSpec],
                 include_paths: Sequence[str | Path] = (), batch_size: int | str = 64) -> None:
        self.tasks = {t.name: t for t in tasks}
        manager = find_tasks([t.name for t in tasks], include_paths)
        configs = {t.name: _task_config(manager, t.name) for t in tasks}
        _check_configs(tasks, configs)
        _check_chat_template(tasks, tokenizer)
        max_length = getattr(model.config, "max_position_embeddings", None)
        self.lm = _fast_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        self._loaded: dict[str, dict] = {}
        self._doc_ids: dict[tuple[str, str], list[int]] = {}
        self._keys: dict[str, tuple[str, str]] = {}
        with _quiet_datasets():
            self._load_roles(manager, tasks, configs)

    def _load_roles(self, manager: TaskManager, tasks: Sequence[TaskSpec], configs: dict[str, dict]) -> None:
        """Each role's tasks loaded with that role's split as their test split, lm-eval's task options set as
        ``simple_evaluate`` sets them, documents and requests built."""
        for role in ROLES:
            specs = []
            for t in tasks:
                split = parse_split(_split_of(t, role))[0]
                specs.append({**configs[t.name], "task": self.task_key(t.name, role), "test_split": split,
                              "validation_split": None, "training_split": None,
                              "fewshot_split": _fewshot_split(t, configs[t.name], split)})
            self._loaded[role] = _load_tasks(manager, specs, tasks, role)
            for task in tasks:
                built = self._loaded[role]["tasks"][self.task_key(task.name, role)]
                _set_options(built, task, configs[task.name])
                # the loaded task is the truth: a Python-built metric or a Hub dataset's size shows only here
                self._keys[task.name] = _result_key(task, _result_keys(built.aggregation(), built.config.filter_list))
                _materialize_docs(built)
                _cache_requests(built, system_instruction=task.system_instruction,
                                apply_chat_template=bool(task.apply_chat_template),
                                fewshot_as_multiturn=task.multiturn,
                                chat_template=self.lm.apply_chat_template if task.apply_chat_template else None)
                size = len(built.test_docs())
                _check_range(task, role, size)
                self._doc_ids[(task.name, role)] = list(range(size))[parse_split(_split_of(task, role))[1]]

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
        for name in self.tasks:
            key = self.task_key(name, role)
            metric, filter_name = self._keys[name]
            scores[name] = float(out["results"][key][f"{metric},{filter_name}"])
            examples[name] = {int(s["doc_id"]): float(s[metric]) for s in out["samples"][key]
                              if s["filter"] == filter_name}
        return EvalResult(scores, examples, {n: t.weight for n, t in self.tasks.items()})


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


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars from ``datasets`` and ``huggingface_hub`` while tasks load (lm-eval's ``load_dataset``
    draws "Generating search split", "Map", "Downloading data" bars per task and split) and no warnings from
    their loggers; errors still raise. The progress bars' state is restored afterwards (an environment
    variable that forces them on or off keeps priority)."""
    import logging
    import warnings

    import datasets
    from huggingface_hub import utils as hub_utils

    loggers = [logging.getLogger(name) for name in ("datasets", "huggingface_hub")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():  # "Cannot disable progress bars: HF_..._DISABLE_PROGRESS_BARS=0 is set"
        warnings.simplefilter("ignore")
        datasets_on = not datasets.are_progress_bars_disabled()
        hub_on = not hub_utils.are_progress_bars_disabled()
        if datasets_on:
            datasets.disable_progress_bars()
        if hub_on:
            hub_utils.disable_progress_bars()
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.ERROR))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if datasets_on:
                datasets.enable_progress_bars()
            if hub_on:
                hub_utils.enable_progress_bars()


# ----------------------------------------------------------------------------------------------------------
# lm-eval internals. Everything below reaches past lm-eval's public API (``TaskManager``, ``simple_evaluate``,
# ``evaluator.evaluate``, ``HFLM``'s public methods): the YAML loader of the TaskManager rewrite, the task
# index's entries, ``TaskManager.load`` of config dicts, a Task's request building and document storage, how
# ``evaluate`` iterates ``samples``, the default metrics per output type, and HFLM's private scoring and
# batch-size probe. Checked against lm-eval 0.4.12 (where the TaskManager rewrite, #3549, first shipped) and
# 0.4.13; 0.5.0.dev1 moves ``lm_eval/api/task.py`` and breaks them.
# ----------------------------------------------------------------------------------------------------------


def _quiet_lm_eval() -> None:
    """No logs or progress bars from lm-eval per candidate: the search draws its own progress."""
    import functools
    import logging

    import lm_eval.api.task
    from tqdm import tqdm

    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    lm_eval.api.task.tqdm = functools.partial(tqdm, disable=True)


def _task_config(manager, name: str) -> dict:
    """A task's YAML config as a dict (its includes merged), with relative local data files made absolute
    against the YAML's folder (plain lm-eval reads them against the working directory, which is kept where
    only it has the file)."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index[name]
    if entry.kind is not Kind.TASK:
        raise SpecError(f"task {name!r} is an lm-eval {entry.kind.name.lower()}, not a YAML task; "
                        "name single YAML tasks")
    config = dict(load_yaml(entry.yaml_path, resolve_func=True))
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        folder = Path(entry.yaml_path).parent

        def resolve(path: str) -> str:
            beside = folder / path
            return str(beside) if _is_local(path) and (beside.exists() or not Path(path).exists()) else path

        def resolve_all(paths: str | list[str]) -> str | list[str]:
            return resolve(paths) if isinstance(paths, str) else [resolve(p) for p in paths]

        resolved = {k: resolve_all(v) for k, v in files.items()} if isinstance(files, dict) else resolve_all(files)
        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": resolved}
    return config


def _load_tasks(manager, configs: list[dict], tasks: Sequence[TaskSpec], role: str) -> dict:
    """``TaskManager.load`` of one role's task configs; a split missing from a downloaded dataset (lm-eval
    raises a bare KeyError) is named as a SpecError."""
    try:
        return manager.load(configs)
    except KeyError as error:
        missing = [t for t in tasks if (parse_split(_split_of(t, role))[0],) == error.args]
        if not missing:
            raise
        raise SpecError(f"task {missing[0].name} has no split {error.args[0]!r} (splits.{role})") from error


def _config_metrics(config: dict) -> list[str]:
    """The metric names of a task's YAML: its ``metric_list``, else lm-eval's defaults for its output type."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    if config.get("metric_list") is None:
        return list(DEFAULT_METRIC_REGISTRY[config.get("output_type", "generate_until")])
    return [getattr(m["metric"], "__name__", m["metric"]) for m in config["metric_list"]]


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


def _set_options(task, spec: TaskSpec, config: dict) -> None:
    """The spec's task options on a loaded task, as ``simple_evaluate`` sets them: ``gen_kwargs`` merged into
    a generate_until task's generation_kwargs, ``num_fewshot`` set (a YAML's 0 kept; none at all is 0), and
    the few-shot sampler seeded with lm-eval's default seed (so every worker draws the same examples)."""
    if spec.gen_kwargs is not None and task.get_config("output_type") == "generate_until":
        task.set_config(key="generation_kwargs", value=dict(spec.gen_kwargs), update=True)
    task.set_config(key="num_fewshot", value=_num_fewshot(spec, config))
    task.set_fewshot_seed(seed=FEWSHOT_SEED)


def _cache_requests(task, **options) -> None:
    """Build the task's lm-eval requests now, once for every document of its split, and from then on hand
    out the chosen documents' requests (emptied of the last candidate's answers) on each call. A prompt
    depends on its document only, so rebuilding it per candidate is wasted work; and a few-shot prompt is
    drawn once per document, so every candidate is scored on the same prompts instead of fresh draws.
    ``options`` are ``build_all_requests``'s prompt options (system_instruction, apply_chat_template,
    fewshot_as_multiturn, chat_template), passed as ``lm_eval.evaluator.evaluate`` passes them; the per-call
    ``evaluate`` passes none, which the cached requests ignore."""
    task.build_all_requests(**options)
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

