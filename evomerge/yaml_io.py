"""YAML as evomerge reads it (recipes, specs, a run's spec.yaml, task YAMLs): stricter than ``yaml.safe_load``
where that would pass silently, crash or block. A key given twice is refused (PyYAML keeps the last one),
nesting deeper than any of our files needs is one line (not a RecursionError), and a file that is not a regular
file (a FIFO, a device) is refused before a byte is read from it. A mapping read from YAML is validated into its
pydantic model with one error line naming file and field (``describe_error``)."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from evomerge.errors import SpecError

# every configuration model's strictness: unknown keys, NaN and infinities are errors
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)

MAX_DEPTH = 64  # nested mappings and lists; ours need a handful, and far below the interpreter's recursion limit


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a mapping that names a key twice and nesting deeper than MAX_DEPTH."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        opens = isinstance(event, yaml.CollectionStartEvent)  # a mapping or list inside this one
        self._depth += opens
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= opens

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *defaults``: explicit keys may override it
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                twice = key in seen
            except TypeError:  # an unhashable key: the base loader says so
                break
            if twice:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class _TaskLoader(_UniqueKeyLoader):
    """The same for lm-eval task YAMLs, which name Python functions with ``!function module.name``: read as its
    text, as lm-eval's task index reads it."""


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def load_yaml(text: str, where: str, *, functions: bool = False) -> Any:
    """The YAML document in ``text``; a SpecError naming ``where`` and the line when it is not valid YAML.
    ``functions``: lm-eval's ``!function`` tag is allowed (task YAMLs)."""
    try:
        return yaml.load(text, Loader=_TaskLoader if functions else _UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{where}: invalid YAML{at} ({problem})") from None


def read_text_file(path: Path) -> str:
    """A regular file's UTF-8 text. Anything else is refused in one line before it is read: a folder, a FIFO
    (reading one blocks until someone writes), a device (``/dev/zero`` never ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO does not wait for a writer
    except FileNotFoundError:
        raise SpecError(f"file not found: {path}") from None
    except OSError as err:
        if err.errno == errno.ENXIO:  # a socket
            raise _not_regular(path) from None
        raise SpecError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise SpecError(f"{path} is a folder, not a YAML file")
        if not stat.S_ISREG(mode):
            raise _not_regular(path)
        with open(fd, "rb", closefd=False) as file:
            data = file.read()
    except OSError as err:
        raise SpecError(f"{path}: cannot be read ({err.strerror})") from None
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file (not UTF-8)") from None


def _not_regular(path: Path) -> SpecError:
    return SpecError(f"{path} is not a regular file (a FIFO, device or socket); give a YAML file")


def read_yaml_file(path: Path, *, functions: bool = False) -> Any:
    """The YAML document of a file, every problem one SpecError line naming the file (see ``load_yaml``)."""
    return load_yaml(read_text_file(path), str(path), functions=functions)


M = TypeVar("M", bound=BaseModel)


def load_yaml_model(cls: type[M], path: str | Path) -> M:
    """Parse and validate a YAML file; any problem becomes one SpecError line naming file and field."""
    return validate_mapping(cls, read_yaml_mapping(Path(path)), Path(path))


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A recipe's or spec's top-level mapping (``read_yaml_file``: a regular file, no key twice)."""
    data = read_yaml_file(path)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    return data


def validate_mapping(cls: type[M], data: dict[str, Any], path: Path) -> M:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{path}: {describe_error(err)}") from None
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None


# Errors that only say "this union member does not fit": when a value may be a number, a list or a
# filter list, the telling error is the one about the member it was meant to be.
_MISMATCH = {"bool_type", "bool_parsing", "float_type", "float_parsing", "int_type", "int_parsing", "list_type",
             "string_type", "dict_type", "model_type", "model_attributes_type", "literal_error", "none_required"}


_UNION_TAG = re.compile(r"^(bool|float|int|str|constrained-.*|function-.*|.*\[.*\])$")


def describe_error(err: ValidationError) -> str:
    """One line for a validation error: the most telling entry, where it is and what is wrong (for a
    value that fits no member of a union: what each member wants)."""
    errors = [(".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p))), e)
              for e in err.errors()]
    telling = [(loc, e) for loc, e in errors if e["type"] not in _MISMATCH]
    loc, first = (telling or errors)[0]
    msgs = [first["msg"]] if telling else list(dict.fromkeys(e["msg"] for at, e in errors if at == loc))
    msg = " or ".join(msgs).removeprefix("Value error, ")
    return f"{loc + ': ' if loc else ''}{msg}"

