"""Recipes, specs and the task files a spec names, refused before any compute where they would pass silently, crash
or block: a key given twice (in a recipe, a spec, a task YAML or a template it includes), a task or group name
defined by two files, YAML nested too deeply, task data that ``datasets`` or Jinja cannot load (lines that are no
JSON objects, fields a document lacks, templates that do not parse or render), a malformed task YAML (no longer
"not found"), seeds outside numpy's range, and files that are not regular files (a FIFO blocks its reader, a
device never ends). Each refusal is one line, exit code 2, and nothing is written; the valid neighbours of each
class still pass.

The search tests use the demo models (tiny) and a task folder of 12-document splits, so every check here is the
pre-flight one: no candidate is ever scored."""

import json
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest
import yaml
from helpers import snapshot

from evomerge.cli import main
from evomerge.demo import TASKS_DIR
from evomerge.evaluate import check_tasks
from evomerge.spec import SearchSpec, TaskSpec
from evomerge.yaml_io import MAX_DEPTH, load_yaml


@pytest.fixture(autouse=True)
def no_hang():
    """A watchdog, not a timing condition: a read that blocks (a FIFO) fails the test instead of hanging the run."""
    def hung(*_):
        raise TimeoutError("blocked: a FIFO or device was read")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def refused(args: list[str], root: Path, capsys, *needles: str) -> str:
    """``evomerge ARGS`` exits 2 with one line holding every needle and changes nothing under ``root``."""
    before = snapshot(root)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert snapshot(root) == before
    return err


# ------------------------------------------------------------------------ a task folder and a spec that uses it

def tiny_task(folder: Path, name: str = "tiny", **changes) -> dict:
    """Task ``name`` in ``folder``: the demo's add task on 12 documents per split (``data/``), with ``changes``."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("search", "validation", "test"):
        lines = (TASKS_DIR / "data" / f"add_{split}.jsonl").read_text().splitlines()[:12]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        files[split] = f"data/{split}.jsonl"
    config = {**yaml.safe_load((TASKS_DIR / "demo_add.yaml").read_text()), "task": name,
              "dataset_kwargs": {"data_files": files}, **changes}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def spec_doc(include_paths: list[str], **changes) -> dict:
    return {"base_model": "demo:base", "models": ["demo:add", "demo:sort"], "device": "cpu", "sampler": "random",
            "space": {"granularity": "global"},
            "evaluation": {"include_paths": include_paths, "tasks": [{"name": "tiny"}], "search_examples": 10,
                           "screen_examples": None, "top_k": 1}, **changes}


@pytest.fixture
def tasks(tmp_path) -> Path:
    folder = tmp_path / "tasks"
    tiny_task(folder)
    return folder


def search_refused(tmp_path: Path, capsys, doc: dict | str, *needles: str) -> str:
    """``evomerge search SPEC --budget 1 --run RUN`` is refused (``refused``) and RUN never appears."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    err = refused(["search", str(spec), "--budget", "1", "--run", str(tmp_path / "run")], tmp_path, capsys, *needles)
    assert not (tmp_path / "run").exists()
    return err


def test_the_task_folder_and_spec_are_valid(tasks):
    """The neighbour of every refusal below: this spec and task folder pass every check."""
    spec = SearchSpec.model_validate(spec_doc([str(tasks)]))
    check_tasks(spec.evaluation.tasks, spec.evaluation.include_paths)


# ------------------------------------------------------------------------ 1. keys given twice

# (YAML text with a key twice, the key named in the message)
TWICE = {
    "top level": ("merge_method: linear\nmerge_method: ties\n", "merge_method"),
    "nested block mapping": ("parameters:\n  weight: 1\n  weight: 2\n", "weight"),
    "flow mapping": ("parameters: {weight: 1, weight: 2}\n", "weight"),
    "quoted and plain spelling": ("dtype: float32\n'dtype': float16\n", "dtype"),
    "inside a list entry": ("models:\n  - model: a\n    model: b\n", "model"),
}


@pytest.mark.parametrize("case", TWICE)
def test_a_recipe_key_given_twice(case, tmp_path, capsys):
    text, key = TWICE[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    refused(["merge", str(recipe), "--out", str(tmp_path / "out")], tmp_path, capsys,
            str(recipe), f"key '{key}' is given twice")


@pytest.mark.parametrize("case", TWICE)
def test_a_spec_key_given_twice(case, tmp_path, capsys):
    text, key = TWICE[case]
    search_refused(tmp_path, capsys, text, "spec.yaml", f"key '{key}' is given twice")


def test_a_merge_key_may_be_overridden():
    """``<<: *defaults`` followed by an explicit key is YAML's override, not a key given twice."""
    doc = load_yaml("d: &d {weight: 1, density: 0.5}\nm:\n  <<: *d\n  weight: 2\n", "x.yaml")
    assert doc["m"] == {"weight": 2, "density": 0.5}


# a task YAML's text with a key twice (lm-eval would keep the last)
TASK_TWICE = {
    "top level": "task: tiny\ntask: other\n",
    "nested": "task: tiny\nmetric_list:\n  - metric: acc\n    metric: f1\n",
    "flow": "task: tiny\ngeneration_kwargs: {until: ['.'], until: [',']}\n",
    "beside a !function tag": "task: tiny\nprocess_docs: !function utils.a\nprocess_docs: !function utils.b\n",
}


@pytest.mark.parametrize("case", TASK_TWICE)
def test_a_task_yaml_key_given_twice(case, tasks, tmp_path, capsys):
    (tasks / "twice.yaml").write_text(TASK_TWICE[case])
    search_refused(tmp_path, capsys, spec_doc([str(tasks)]), f"{tasks / 'twice.yaml'}: invalid YAML at line",
                   "is given twice")


def test_a_key_twice_in_an_included_template(tasks, tmp_path, capsys):
    """A template lm-eval's index does not list (no .yaml suffix), reached through ``include``."""
    (tasks / "_template_yaml").write_text("output_type: loglikelihood\noutput_type: generate_until\n")
    config = yaml.safe_load((tasks / "tiny.yaml").read_text())
    (tasks / "tiny.yaml").write_text(yaml.safe_dump({"include": "_template_yaml", **config}))
    search_refused(tmp_path, capsys, spec_doc([str(tasks)]), "_template_yaml: invalid YAML at line 2",
                   "key 'output_type' is given twice")


def test_task_yaml_functions_includes_and_merge_keys_still_load(tasks):
    """lm-eval's ``!function`` tag, an included template and a YAML merge key: a valid task YAML, loaded and
    rendered by the pre-flight check."""
    (tasks / "utils.py").write_text("def keep(dataset):\n    return dataset\n")
    (tasks / "_base_yaml").write_text("output_type: loglikelihood\ntarget_delimiter: ''\n")
    config = yaml.safe_load((tasks / "tiny.yaml").read_text())
    del config["output_type"], config["target_delimiter"], config["metadata"]
    body = yaml.safe_dump({**config, "task": "tiny_fn"}, sort_keys=False)
    (tasks / "tiny_fn.yaml").write_text(f"include: _base_yaml\nprocess_docs: !function utils.keep\n{body}"
                                        "metadata:\n  old: &m {version: 1, note: x}\n  new:\n    <<: *m\n"
                                        "    version: 2\n")
    check_tasks([TaskSpec(name="tiny_fn")], [tasks])


# ------------------------------------------------------------------------ 2. a task name defined twice

def _second_folder(tmp_path: Path) -> list[Path]:
    other = tmp_path / "more"
    tiny_task(other)
    return [other / "tiny.yaml"]


def _same_folder(tmp_path: Path) -> list[Path]:
    copy = tmp_path / "tasks" / "sub" / "copy.yaml"
    copy.parent.mkdir()
    shutil.copy(tmp_path / "tasks" / "tiny.yaml", copy)
    return [copy]


def _group_of_that_name(tmp_path: Path) -> list[Path]:
    group = tmp_path / "tasks" / "group.yaml"
    group.write_text(yaml.safe_dump({"group": "tiny", "task": ["demo_add"]}))
    return [group]


def _through_a_shared_template(tmp_path: Path) -> list[Path]:
    """Two files that include a template naming the task, neither renaming it."""
    folder = tmp_path / "tasks"
    config = yaml.safe_load((folder / "tiny.yaml").read_text())
    (folder / "_tiny_yaml").write_text(yaml.safe_dump(config))
    (folder / "tiny.yaml").unlink()
    paths = [folder / "a.yaml", folder / "b.yaml"]
    for path in paths:
        path.write_text("include: _tiny_yaml\n")
    return paths


TWO_DEFINITIONS = {"in a second include path": _second_folder, "twice in one folder": _same_folder,
                   "a group of the same name": _group_of_that_name,
                   "through a shared template": _through_a_shared_template}


@pytest.mark.parametrize("case", TWO_DEFINITIONS)
def test_a_task_name_defined_twice(case, tasks, tmp_path, capsys):
    (tmp_path / "more").mkdir()
    files = TWO_DEFINITIONS[case](tmp_path)
    err = search_refused(tmp_path, capsys, spec_doc([str(tasks), str(tmp_path / "more")]),
                         "task tiny is defined twice")
    named = [str(p) for p in [*files, tasks / "tiny.yaml"] if str(p) in err]
    assert len(named) == 2, err


@pytest.mark.parametrize("paths", [["tasks", "tasks"], ["tasks", "tasks/sub"]], ids=["twice", "and a subfolder"])
def test_a_folder_reached_twice_is_one_definition(paths, tasks, tmp_path):
    (tasks / "sub").mkdir()
    tiny_task(tasks / "sub", "tiny_sub")
    check_tasks([TaskSpec(name="tiny"), TaskSpec(name="tiny_sub")], [tmp_path / p for p in paths])


# ------------------------------------------------------------------------ 3. nesting too deep

def deep(kind: str, depth: int) -> str:
    """``models:`` holding ``depth`` levels of nesting written as ``kind``."""
    if kind == "flow lists":
        return "models: " + "[" * depth + "]" * depth + "\n"
    if kind == "flow mappings":
        return "models: " + "{a: " * depth + "1" + "}" * depth + "\n"
    return "models:\n" + "".join("  " * (i + 1) + "a:\n" for i in range(depth))


NESTING = ["flow lists", "flow mappings", "block mappings"]


@pytest.mark.parametrize("kind", NESTING)
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5000])
def test_a_recipe_or_spec_nested_too_deeply(kind, depth, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("merge_method: linear\n" + deep(kind, depth))
    refused(["merge", str(recipe), "--out", str(tmp_path / "out")], tmp_path, capsys,
            f"{recipe}: invalid YAML at line", f"nested deeper than {MAX_DEPTH} levels")
    search_refused(tmp_path, capsys, "base_model: demo:base\n" + deep(kind, depth),
                   "spec.yaml: invalid YAML at line", f"nested deeper than {MAX_DEPTH} levels")


@pytest.mark.parametrize("kind", NESTING)
def test_nesting_within_the_limit_is_read(kind):
    assert load_yaml(deep(kind, MAX_DEPTH - 1), "x.yaml")["models"]


def test_a_task_yaml_nested_too_deeply(tasks, tmp_path, capsys):
    (tasks / "deep.yaml").write_text("task: deep\n" + deep("flow lists", 3000).replace("models", "metadata"))
    search_refused(tmp_path, capsys, spec_doc([str(tasks)]), "deep.yaml: invalid YAML", "nested deeper")


# ------------------------------------------------------------------------ 4. task data and templates

def _append(line: bytes):
    def change(folder: Path) -> None:
        with open(folder / "data" / "test.jsonl", "ab") as data:
            data.write(line + b"\n")
    return change


def _set(**changes):
    def change(folder: Path) -> None:
        path = folder / "tiny.yaml"
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **changes}, sort_keys=False))
    return change


def _as_json_file(folder: Path) -> None:
    """The test split as a ``.json`` file (read by ``datasets``' JSON reader only) with a garbage line."""
    data = folder / "data"
    (data / "test.json").write_text((data / "test.jsonl").read_text() + "not json at all\n")
    _set(dataset_kwargs={"data_files": {"search": "data/search.jsonl", "validation": "data/validation.jsonl",
                                        "test": "data/test.json"}})(folder)


def _csv(folder: Path) -> None:
    """The splits as CSV files, the test one with a row of too many fields."""
    files = {}
    for split in ("search", "validation", "test"):
        rows = [json.loads(line) for line in (folder / "data" / f"{split}.jsonl").read_text().splitlines()]
        text = "prompt,target\n" + "".join(f"{r['prompt']},{r['target']}\n" for r in rows)
        (folder / "data" / f"{split}.csv").write_text(text + ("1,2,3,4,5\n" if split == "test" else ""))
        files[split] = f"data/{split}.csv"
    _set(dataset_path="csv", dataset_kwargs={"data_files": files})(folder)


def _last_document_lacks(folder: Path) -> None:
    _set(doc_to_text="{{prompt}} = {{answer}}")(folder)
    for split in ("search", "validation", "test"):
        path = folder / "data" / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows = [{**r, "answer": r["target"]} for r in rows[:-1]] + rows[-1:]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# (change to the task folder, what the line must say besides the task's name)
BAD_DATA = {
    "a line of text": (_append(b"not json"), "data/test.jsonl line 13 is not a JSON line"),
    "a truncated object": (_append(b'{"prompt": "1+'), "data/test.jsonl line 13 is not a JSON line"),
    "a JSON list": (_append(b"[1, 2]"), "data/test.jsonl line 13 is a JSON list, not an object"),
    "a JSON number": (_append(b"7"), "data/test.jsonl line 13 is a JSON int, not an object"),
    "bytes that are not UTF-8": (_append(b'{"prompt": "\xff\xfe"}'), "data/test.jsonl line 13 is not a JSON line"),
    "garbage in a .json file": (_as_json_file, "data/test.json"),
    "a CSV row of too many fields": (_csv, "data/test.csv"),
    "a document without the target field": (_append(b'{"prompt": "1+1="}'), "document 12 of split 'test'",
                                            "doc_to_target gives nothing"),
    "a key lm-eval does not know": (_set(doc_to_txt="prompt"), "'doc_to_txt' is not a key of an lm-eval task YAML"),
    "a template field no document has": (_set(doc_to_text="{{question}}"), "'question' is undefined"),
    "a template field the last document lacks": (_last_document_lacks,
                                                 "document 11 of split 'search'", "doc_to_text uses field 'answer'"),
    "an unclosed expression": (_set(doc_to_text="{{prompt"), "doc_to_text is not a valid Jinja template"),
    "an unclosed block": (_set(doc_to_target="{% if target %}{{target}}"),
                          "doc_to_target is not a valid Jinja template"),
    "an unknown filter": (_set(doc_to_text="{{prompt | no_such_filter}}"), "no_such_filter"),
    "choices that are no list": (_set(output_type="multiple_choice", doc_to_choice="{{prompt}}", doc_to_target=0),
                                 "tiny"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_task_data_or_template_that_cannot_load(case, tasks, tmp_path, capsys):
    change, *messages = BAD_DATA[case]
    change(tasks)
    search_refused(tmp_path, capsys, spec_doc([str(tasks)]), "task tiny", *messages)


def test_data_that_datasets_reads_passes(tasks):
    """A byte-order mark, Windows line ends and blank lines: JSON lines that ``datasets`` reads, so not refused."""
    path = tasks / "data" / "test.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n\n"))
    check_tasks([TaskSpec(name="tiny")], [tasks])


# a task YAML lm-eval's index would skip, so that its task was "not found"
MALFORMED = {
    "unclosed flow list": ("task: tiny\nmetric_list: [\n", "tiny.yaml: invalid YAML at line"),
    "bad indentation": ("task: tiny\n  output_type: x\n y: 1\n", "tiny.yaml: invalid YAML at line"),
    "an unknown tag": ("task: tiny\nprocess_docs: !python/name:os.system\n", "tiny.yaml: invalid YAML"),
    "a tab for indentation": ("task: tiny\nmetadata:\n\tversion: 1\n", "tiny.yaml: invalid YAML at line 3"),
    "not UTF-8": (b"task: tiny\x00\xff\n", "tiny.yaml: not a text file"),
    "a missing include": ("include: _gone_yaml\ntask: tiny\n", "tiny.yaml: include _gone_yaml: file not found"),
    "an include cycle": ("include: tiny.yaml\ntask: tiny\n", "tiny.yaml: include tiny.yaml leads back to itself"),
    "a cycle through a template": ("include: _loop_yaml\ntask: tiny\n",
                                   "_loop_yaml: include tiny.yaml leads back to itself"),
    "an include that is no mapping": ("include: _list_yaml\ntask: tiny\n", "include _list_yaml is not a YAML mapping"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_task_yaml_is_named(case, tasks, tmp_path, capsys):
    text, message = MALFORMED[case]
    (tasks / "_list_yaml").write_text("- 1\n- 2\n")
    (tasks / "_loop_yaml").write_text("include: tiny.yaml\n")
    path = tasks / "tiny.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    err = search_refused(tmp_path, capsys, spec_doc([str(tasks)]), message)
    assert "task 'tiny' not found" not in err, err


def test_a_yaml_that_is_no_task_is_passed_over(tasks):
    """What lm-eval's index passes over on purpose (no task or group key, not a mapping) is not refused."""
    (tasks / "notes.yaml").write_text("title: my notes\n")
    (tasks / "empty.yaml").write_text("")
    (tasks / "list.yaml").write_text("- a\n- b\n")
    check_tasks([TaskSpec(name="tiny")], [tasks])


# ------------------------------------------------------------------------ 5. seeds

SEEDS = {"negative": -1, "2^32": 2**32, "2^64": 2**64, "huge": 10**30, "a boolean": True, "a fraction": 1.5,
         "a string": "7"}


@pytest.mark.parametrize("case", SEEDS)
def test_a_spec_seed_outside_numpys_range(case, tasks, tmp_path, capsys):
    search_refused(tmp_path, capsys, spec_doc([str(tasks)], seed=SEEDS[case]), "spec.yaml: seed:")


@pytest.mark.parametrize("form", ["single", "layer-wise"])
@pytest.mark.parametrize("case", SEEDS)
def test_a_recipe_seed_outside_numpys_range(case, form, llama_zoo, tmp_path, capsys):
    models = [{"model": str(llama_zoo[m]), "parameters": {"weight": 0.5, "density": 0.5}} for m in ("a", "b")]
    body = {"merge_method": "dare_ties", "models": models}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base_model": str(llama_zoo["base"]), "seed": SEEDS[case],
                                      **({"groups": [{"layers": [0, 3], **body}]} if form == "layer-wise" else body)}))
    refused(["merge", str(recipe), "--out", str(tmp_path / "out")], tmp_path, capsys, "recipe.yaml: seed:")


def test_the_largest_seed_is_valid(llama_zoo, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "dare_ties", "base_model": str(llama_zoo["base"]), "seed": 2**32 - 1,
        "models": [{"model": str(llama_zoo[m]), "parameters": {"weight": 0.5, "density": 0.5}} for m in ("a", "b")]}))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 0
    assert SearchSpec.model_validate(spec_doc(["demo"], seed=2**32 - 1)).seed == 2**32 - 1


# ------------------------------------------------------------------------ 6. files that are not regular files

def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def unix_socket(path: Path) -> Path:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()
    return path


def link_to_fifo(path: Path) -> Path:
    path.symlink_to(fifo(path.with_name(path.name + ".fifo")))
    return path


def folder(path: Path) -> Path:
    path.mkdir()
    return path


SPECIAL = {"a FIFO": fifo, "a socket": unix_socket, "a link to a FIFO": link_to_fifo, "a folder": folder,
           "/dev/zero": lambda path: Path("/dev/zero"), "/dev/null": lambda path: Path("/dev/null")}


@pytest.mark.parametrize("case", SPECIAL)
def test_a_recipe_or_spec_that_is_not_a_regular_file(case, tmp_path, capsys):
    for command in ("merge", "search"):
        path = SPECIAL[case](tmp_path / f"{command}.yaml")
        args = ["--out", str(tmp_path / "out")] if command == "merge" else ["--budget", "1", "--run",
                                                                             str(tmp_path / "run")]
        refused([command, str(path), *args], tmp_path, capsys, str(path))
        assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["a FIFO", "a socket", "a link to a FIFO"])
def test_a_task_yaml_that_is_not_a_regular_file(case, tasks, tmp_path, capsys):
    SPECIAL[case](tasks / "other.yaml")
    search_refused(tmp_path, capsys, spec_doc([str(tasks)]), str(tasks / "other.yaml"))


@pytest.mark.parametrize("case", ["a FIFO", "a socket", "a link to a FIFO"])
def test_an_include_that_is_not_a_regular_file(case, tasks, tmp_path, capsys):
    SPECIAL[case](tasks / "_included")
    config = yaml.safe_load((tasks / "tiny.yaml").read_text())
    (tasks / "tiny.yaml").write_text(yaml.safe_dump({"include": "_included", **config}))
    search_refused(tmp_path, capsys, spec_doc([str(tasks)]), "_included", "not a regular file")


@pytest.mark.parametrize("case", ["a FIFO", "a socket", "a link to a FIFO", "a folder", "/dev/zero"])
def test_a_data_file_that_is_not_a_regular_file(case, tasks, tmp_path, capsys):
    target = tasks / "data" / "test.jsonl"
    target.unlink()
    if case == "a folder":
        target.mkdir()
    elif case == "/dev/zero":
        target.symlink_to("/dev/zero")
    else:
        SPECIAL[case](target)
    search_refused(tmp_path, capsys, spec_doc([str(tasks)]), "task tiny: data file", "is not a regular file")
