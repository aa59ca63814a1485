"""Models and the files they are read from or written to, hardened (issue 25): every class of bad input below fails
before any compute, for ``merge`` and for ``search``'s pre-flight alike (they open models the same way), in one line
with exit code 2, leaving every file and link under the test's folder as it was; the valid neighbour of each class
still succeeds. Only a full disk happens mid-write: one line, exit 2, and nothing left behind.

- a config whose block count is not the tensors' (more, fewer, a gap, not a count), or configs that disagree;
- two un-indexed ``*.safetensors`` defining the same tensor;
- any file a model reference reads (weights, shard, index, config, tokenizer and other copied files, adapter files)
  that is a FIFO, a socket, a device, a folder, a symlink loop or unreadable (never a hang, never a traceback);
- a model reference or ``--out`` through a symlink loop, with a name too long, or an unreadable folder; a valid
  250-character ``--out`` is written;
- a tensor in a dtype evomerge does not merge (FP8 and others): "unsupported dtype", not "not a readable file";
- a base config transformers cannot build, a missing or corrupt tokenizer (never "install sentencepiece").
"""

import errno
import json
import os
import shutil
import socket
import struct
from pathlib import Path

import pytest
import yaml
from helpers import snapshot
from safetensors.torch import load_file, save_file

from evomerge import checkpoint
from evomerge.checkpoint import Checkpoint, TensorInfo
from evomerge.cli import main
from evomerge.errors import SpecError
from evomerge.models import check_compatible, check_loadable, open_checkpoint

# a root-owned file that root cannot read either (write-only sysctl): what an unreadable file is for root
UNREADABLE = Path("/proc/sys/vm/compact_memory")


def refused(args: list[str], root: Path, capsys) -> str:
    """``evomerge ARGS`` exits 2 with one line, no traceback, and changes nothing under ``root``: that line."""
    before = snapshot(root)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert snapshot(root) == before
    return err


@pytest.fixture
def zoo(llama_zoo, tmp_path, monkeypatch) -> dict[str, Path]:
    """Copies of the 3-block Llama base and one fine-tune under ``tmp_path`` (the current folder)."""
    monkeypatch.chdir(tmp_path)
    for name in ("base", "a"):
        shutil.copytree(llama_zoo[name], tmp_path / name)
    return {"base": tmp_path / "base", "a": tmp_path / "a"}


def recipe_file(tmp_path: Path, base, *models, **extra) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
                                    "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models],
                                    **extra}))
    return path


def spec_file(tmp_path: Path, base, *models) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "base_model": str(base), "models": [str(m) for m in models], "device": "cpu",
        "space": {"methods": ["task_arithmetic"], "granularity": "global"}, "sampler": "random",
        "evaluation": {"include_paths": ["demo"], "tasks": [{"name": "demo_add"}]}}))
    return path


def merge_args(tmp_path: Path, base, *models) -> list[str]:
    return ["merge", str(recipe_file(tmp_path, base, *models)), "--out", str(tmp_path / "out")]


def search_args(tmp_path: Path, base, *models) -> list[str]:
    return ["search", str(spec_file(tmp_path, base, *models)), "--budget", "1", "--run", str(tmp_path / "run")]


COMMANDS = {"merge": merge_args, "search": search_args}


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is DROP]:
        del config[key]
    (folder / "config.json").write_text(json.dumps(config))


DROP = object()


# ------------------------------------------------------------------ block counts


def drop_block(folder: Path, block: int) -> None:
    tensors = load_file(folder / "model.safetensors")
    kept = {n: t for n, t in tensors.items() if f".layers.{block}." not in n}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})


BLOCK_COUNTS = {  # (config changes, a damage to the tensors, what the line says)
    "more than the tensors": ({"num_hidden_layers": 4}, None, "num_hidden_layers is 4 but its tensors hold 3 blocks"),
    "fewer than the tensors": ({"num_hidden_layers": 2}, None, "num_hidden_layers is 2 but its tensors hold 3 blocks"),
    "zero": ({"num_hidden_layers": 0}, None, "num_hidden_layers is 0 but its tensors hold 3 blocks"),
    "a block missing in the tensors": ({}, 1, "num_hidden_layers is 3 but its tensors hold 2 blocks (0, 2)"),
    "the last block missing": ({}, 2, "num_hidden_layers is 3 but its tensors hold 2 blocks (0-1)"),
    "a string": ({"num_hidden_layers": "3"}, None, "num_hidden_layers must be a whole number of blocks, got '3'"),
    "a fraction": ({"num_hidden_layers": 3.5}, None, "num_hidden_layers must be a whole number of blocks, got 3.5"),
    "a boolean": ({"num_hidden_layers": True}, None, "num_hidden_layers must be a whole number of blocks, got True"),
    "negative": ({"num_hidden_layers": -3}, None, "num_hidden_layers must be a whole number of blocks, got -3"),
    "null": ({"num_hidden_layers": None}, None, "num_hidden_layers must be a whole number of blocks, got None"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", BLOCK_COUNTS)
def test_a_block_count_that_is_not_the_tensors_is_refused(case, command, zoo, tmp_path, capsys):
    changes, block, expected = BLOCK_COUNTS[case]
    edit_config(zoo["a"], **changes)
    if block is not None:
        drop_block(zoo["a"], block)
    err = refused(COMMANDS[command](tmp_path, zoo["base"], zoo["a"]), tmp_path, capsys)
    assert f"{zoo['a'] / 'config.json'}: {expected}" in err


def test_a_config_without_a_block_count_takes_the_tensors(zoo, tmp_path):
    edit_config(zoo["a"], num_hidden_layers=DROP)
    assert open_checkpoint(str(zoo["a"])).num_layers == 3


def test_gpt2s_n_layer_is_checked_too(gpt2_zoo, tmp_path, capsys):
    for name in ("base", "a"):
        shutil.copytree(gpt2_zoo[name], tmp_path / name)
    edit_config(tmp_path / "a", n_layer=5)
    err = refused(merge_args(tmp_path, tmp_path / "base", tmp_path / "a"), tmp_path, capsys)
    assert "n_layer is 5 but its tensors hold 2 blocks (0-1) under transformer.h." in err


@pytest.mark.parametrize(("counts", "config"), [((2, 3), "num_hidden_layers"), ((3, 1), "n_layer"),
                                                ((4, 4, 0), "num_layers")])
def test_configs_that_disagree_on_the_block_count_are_refused(counts, config, tmp_path):
    """Models whose tensors name no block (so nothing checks a config against them) still agree or are refused."""
    info = TensorInfo((2,), checkpoint.torch.float32, tmp_path / "x.safetensors", 8)
    ckpts = [Checkpoint(tmp_path / f"m{i}", {config: n}, {"w": info}) for i, n in enumerate(counts)]
    odd = next(i for i, n in enumerate(counts) if n != counts[0])
    with pytest.raises(SpecError, match=rf"block counts differ: {tmp_path / 'm0'} has {counts[0]}, "
                                        rf"{tmp_path / f'm{odd}'} has {counts[odd]}"):
        check_compatible(ckpts)


# ------------------------------------------------------------------ un-indexed files defining a tensor twice


def split(folder: Path, parts: dict[str, slice], extra: dict[str, list[int]]) -> None:
    """Replace ``model.safetensors`` by files holding the slices of the sorted tensor names ``parts`` give, plus
    (``extra``) the tensors at those positions copied into another file."""
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    (folder / "model.safetensors").unlink()
    for file, part in parts.items():
        chosen = names[part] + [names[i] for i in extra.get(file, [])]
        save_file({n: tensors[n] for n in chosen}, folder / file, metadata={"format": "pt"})


DUPLICATES = {
    "a full second copy": ({"model-a.safetensors": slice(None), "model-b.safetensors": slice(None)}, {}),
    "one tensor in both halves": ({"model-a.safetensors": slice(0, 8), "model-b.safetensors": slice(8, None)},
                                  {"model-b.safetensors": [3]}),
    "the last of three files": ({"x-1.safetensors": slice(0, 5), "x-2.safetensors": slice(5, 10),
                                 "x-3.safetensors": slice(10, None)}, {"x-3.safetensors": [6]}),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", DUPLICATES)
def test_unindexed_files_defining_a_tensor_twice_are_refused(case, command, zoo, tmp_path, capsys):
    split(zoo["a"], *DUPLICATES[case])
    err = refused(COMMANDS[command](tmp_path, zoo["base"], zoo["a"]), tmp_path, capsys)
    assert f"{zoo['a']}: tensor " in err and " is in both " in err and "model.safetensors.index.json" in err


def test_unindexed_files_that_split_the_tensors_merge(zoo, tmp_path):
    split(zoo["a"], {"model-a.safetensors": slice(0, 8), "model-b.safetensors": slice(8, None)}, {})
    assert main(merge_args(tmp_path, zoo["base"], zoo["a"])) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ------------------------------------------------------------------ files that are not regular files


def fifo(path: Path) -> None:
    os.mkfifo(path)


def unix_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))


def device(path: Path) -> None:
    path.symlink_to("/dev/zero")  # reading it never ends


def folder(path: Path) -> None:
    path.mkdir()


def loop(path: Path) -> None:
    path.symlink_to(path.name)


def unreadable(path: Path) -> None:
    path.symlink_to(UNREADABLE)


NOT_REGULAR = {  # how a file is replaced, what the line says
    "a FIFO": (fifo, "not a regular file (a FIFO)"),
    "a socket": (unix_socket, "not a regular file (a socket)"),
    "a device": (device, "not a regular file (a device)"),
    "a folder": (folder, "not a regular file (a folder)"),
    "a symlink loop": (loop, "cannot read it (a symlink loop)"),
    "unreadable": (unreadable, "cannot read it (permission denied)"),
}


def lora_adapter(tmp_path: Path, base: Path) -> Path:
    """A rank-2 LoRA adapter on block 0's q_proj of ``base``, written as PEFT saves one."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    q = load_file(base / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": q[:2].clone(), f"{prefix}.lora_B.weight": q[:, :2].clone() * 0.1},
              folder / "adapter_model.safetensors")
    return folder


def shard(zoo: dict[str, Path]) -> None:
    """Model a as two shards and an index."""
    split(zoo["a"], {"model-00001-of-00002.safetensors": slice(0, 8),
                     "model-00002-of-00002.safetensors": slice(8, None)}, {})
    names = sorted(load_file(zoo["a"] / "model-00001-of-00002.safetensors"))
    rest = sorted(load_file(zoo["a"] / "model-00002-of-00002.safetensors"))
    weight_map = {**dict.fromkeys(names, "model-00001-of-00002.safetensors"),
                  **dict.fromkeys(rest, "model-00002-of-00002.safetensors")}
    (zoo["a"] / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


READ_FILES = {  # the file a merge reads: (folder, file name, how the layout is prepared)
    "weights": ("a", "model.safetensors", None),
    "a shard": ("a", "model-00002-of-00002.safetensors", shard),
    "the index": ("a", "model.safetensors.index.json", shard),
    "config.json": ("a", "config.json", None),
    "tokenizer.json (copied last)": ("base", "tokenizer.json", None),
    "tokenizer_config.json (copied last)": ("base", "tokenizer_config.json", None),
    "adapter config": ("adapter", "adapter_config.json", None),
    "adapter weights": ("adapter", "adapter_model.safetensors", None),
}


# a subfolder named like a side file is no file the merge copies: every other pair of a file and a kind
FILE_KINDS = [(where, kind) for where in READ_FILES for kind in NOT_REGULAR
              if not (kind == "a folder" and "copied last" in where)]


@pytest.mark.parametrize(("where", "kind"), FILE_KINDS, ids=[f"{w}-{k}" for w, k in FILE_KINDS])
def test_every_file_a_merge_reads_must_be_a_readable_regular_file(where, kind, zoo, tmp_path, capsys):
    owner, name, prepare = READ_FILES[where]
    make, expected = NOT_REGULAR[kind]
    if prepare:
        prepare(zoo)
    adapter = lora_adapter(tmp_path, zoo["base"])
    target = {**zoo, "adapter": adapter}[owner] / name
    target.unlink()
    make(target)
    err = refused(merge_args(tmp_path, zoo["base"], f"{zoo['a']}+{adapter}"), tmp_path, capsys)
    assert f"{target}: {expected}" in err


@pytest.mark.parametrize("kind", [k for k in NOT_REGULAR if k != "a folder"])
def test_a_layer_paths_copied_files_are_checked_before_compute(kind, zoo, tmp_path, capsys, monkeypatch):
    """A data-flow recipe copies its outer model's tokenizer files last, as a merge does: checked up front."""
    import evomerge.dataflow

    make, expected = NOT_REGULAR[kind]
    path = tmp_path / "path.yaml"
    path.write_text(yaml.safe_dump({"outer": str(zoo["base"]), "dtype": "float32",
                                    "path": [{"model": str(zoo["a"]), "layer": i} for i in range(3)]}))
    assert main(["merge", str(path), "--out", str(tmp_path / "sound")]) == 0
    capsys.readouterr()

    def compute(out):
        raise AssertionError(f"the merge into {out} began before its inputs were checked")

    monkeypatch.setattr(evomerge.dataflow, "atomic_folder", compute)
    target = zoo["base"] / "tokenizer_config.json"
    target.unlink()
    make(target)
    err = refused(["merge", str(path), "--out", str(tmp_path / "out")], tmp_path, capsys)
    assert f"{target}: {expected}" in err


def test_the_adapter_and_layouts_above_merge_when_their_files_are_sound(zoo, tmp_path):
    shard(zoo)
    adapter = lora_adapter(tmp_path, zoo["base"])
    assert main(merge_args(tmp_path, zoo["base"], f"{zoo['a']}+{adapter}")) == 0


# ------------------------------------------------------------------ model references and --out that cannot be followed


def looping_folder(tmp_path: Path, zoo) -> str:
    (tmp_path / "loop").symlink_to("loop")
    return str(tmp_path / "loop")


def under_a_loop(tmp_path: Path, zoo) -> str:
    (tmp_path / "loop").symlink_to("loop")
    return str(tmp_path / "loop" / "a")


def long_name(tmp_path: Path, zoo) -> str:
    return str(tmp_path / ("m" * 300))


def long_middle(tmp_path: Path, zoo) -> str:
    return str(tmp_path / ("m" * 256) / "a")


def unreadable_folder(tmp_path: Path, zoo) -> str:
    return str(zoo["a"])  # os.listdir refuses it (see the test: root reads any folder whose mode forbids it)


def a_file(tmp_path: Path, zoo) -> str:
    return str(zoo["a"] / "config.json")


BAD_REFERENCES = {
    "a symlink loop": (looping_folder, "a symlink loop"),
    "under a symlink loop": (under_a_loop, "a symlink loop"),
    "a name too long": (long_name, "a name too long for the file system"),
    "a folder name too long": (long_middle, "a name too long for the file system"),
    "an unreadable folder": (unreadable_folder, "cannot read it (permission denied)"),
    "a file": (a_file, "is not a folder"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", BAD_REFERENCES)
def test_a_model_reference_that_cannot_be_read_is_one_line(case, command, zoo, tmp_path, capsys, monkeypatch):
    make, expected = BAD_REFERENCES[case]
    ref = make(tmp_path, zoo)
    listdir = os.listdir

    def refusing(path="."):
        if case == "an unreadable folder" and Path(path) == zoo["a"]:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return listdir(path)

    monkeypatch.setattr(os, "listdir", refusing)
    err = refused(COMMANDS[command](tmp_path, zoo["base"], ref), tmp_path, capsys)
    assert ref in err and expected in err


BAD_OUTS = {
    "a symlink loop": (lambda t: (t / "loop").symlink_to("loop") or t / "loop", "its path cannot be followed "
                                                                               "(a symlink loop)"),
    "under a symlink loop": (lambda t: (t / "loop").symlink_to("loop") or t / "loop" / "out",
                             "its path cannot be followed (a symlink loop)"),
    "a name too long": (lambda t: t / ("o" * 256), "is longer than the 255 bytes the file system allows"),
    "a parent name too long": (lambda t: t / ("o" * 300) / "out", "is longer than the 255 bytes"),
    "a path too long": (lambda t: t.joinpath(*["p" * 200] * 25), "the path is longer than the"),
}


@pytest.mark.parametrize("case", BAD_OUTS)
def test_an_out_that_cannot_be_written_is_refused_up_front(case, zoo, tmp_path, capsys):
    make, expected = BAD_OUTS[case]
    out = make(tmp_path)
    args = ["merge", str(recipe_file(tmp_path, zoo["base"], zoo["a"])), "--out", str(out), "--force"]
    err = refused(args, tmp_path, capsys)
    assert f"output folder {out}" in err and expected in err


@pytest.mark.parametrize("length", [224, 240, 250, 255])
def test_a_long_valid_out_name_is_written(length, zoo, tmp_path):
    """Its temporary sibling's name, longer still, is shortened to fit; a second merge replaces the first."""
    out = tmp_path / ("é" * 4 + "o" * (length - 8))  # multi-byte characters: bytes count, not characters
    assert len(os.fsencode(out.name)) == length
    args = ["merge", str(recipe_file(tmp_path, zoo["base"], zoo["a"])), "--out", str(out), "--force"]
    assert main(args) == 0 and main(args) == 0
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base", "a", "recipe.yaml", out.name])


# ------------------------------------------------------------------ a full disk while writing


def full(err: int):
    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err))
    return fail


def text_writes_fail(err: int, monkeypatch) -> None:
    """The small files (recipe, mergekit config) hit the full disk: their writes fail."""
    fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(fdopen(fd, *a, **k)))


FULL_AT = {  # where the disk fills up
    "a shard's data": lambda err, mp: mp.setattr(checkpoint.ShardedWriter, "write", full(err)),
    "a shard's header": lambda err, mp: mp.setattr(checkpoint.ShardedWriter, "_open_next_shard", full(err)),
    "the index": lambda err, mp: mp.setattr(checkpoint.ShardedWriter, "finish", full(err)),
    "the copied tokenizer": lambda err, mp: mp.setattr(shutil, "copy2", full(err)),
    "the recipe": text_writes_fail,
}


@pytest.mark.parametrize("existing", [False, True], ids=["new parents", "replacing with --force"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG], ids=errno.errorcode.get)
@pytest.mark.parametrize("where", FULL_AT)
def test_a_full_disk_is_one_line_and_leaves_nothing_behind(where, err, existing, zoo, tmp_path, capsys,
                                                            monkeypatch):
    out = tmp_path / "out" if existing else tmp_path / "new" / "deeper" / "out"
    recipe = recipe_file(tmp_path, zoo["base"], zoo["a"])
    if existing:
        assert main(["merge", str(recipe), "--out", str(out)]) == 0
        capsys.readouterr()
    FULL_AT[where](err, monkeypatch)
    err_line = refused(["merge", str(recipe), "--out", str(out), "--force"], tmp_path, capsys)
    assert f"cannot write output folder {out}: {os.strerror(err)}; nothing was written" in err_line


# ------------------------------------------------------------------ dtypes evomerge does not merge


def with_dtype(folder: Path, code: str) -> str:
    """Model ``folder`` with one more tensor stored in the safetensors dtype ``code`` (one byte per entry: the
    header is refused before any size check); the tensor's name."""
    tensors = load_file(folder / "model.safetensors")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    data = (folder / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    header["model.layers.0.mlp.down_proj.weight_scale"] = {"dtype": code, "shape": [4],
                                                          "data_offsets": [len(body), len(body) + 4]}
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + body + bytes(4))
    return "model.layers.0.mlp.down_proj.weight_scale"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("code", ["F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "U16", "C64", "Q4_K"])
def test_a_dtype_evomerge_does_not_merge_is_named(code, command, zoo, tmp_path, capsys):
    name = with_dtype(zoo["a"], code)
    err = refused(COMMANDS[command](tmp_path, zoo["base"], zoo["a"]), tmp_path, capsys)
    assert f"{zoo['a'] / 'model.safetensors'}: tensor {name} has unsupported dtype {code}" in err
    assert "not a readable" not in err


# ------------------------------------------------------------------ what transformers must build: config, tokenizer


def no_tokenizer_json(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()  # tokenizer_config.json alone: "install sentencepiece", says transformers


def no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()


def corrupt_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {garbage')


def tokenizer_not_an_object(folder: Path) -> None:
    (folder / "tokenizer.json").write_text("[1, 2, 3]")


def tokenizer_fifo(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer.json")


BAD_TOKENIZERS = {
    "no tokenizer.json": (no_tokenizer_json, "no tokenizer to evaluate with in"),
    "no tokenizer files": (no_tokenizer, "no tokenizer to evaluate with in"),
    "corrupt tokenizer.json": (corrupt_tokenizer, "cannot be loaded"),
    "tokenizer.json not an object": (tokenizer_not_an_object, "cannot be loaded"),
    "tokenizer.json a FIFO": (tokenizer_fifo, "not a regular file (a FIFO)"),
}
BAD_CONFIGS = {
    "unknown model_type": ({"model_type": "nonsense"}, "transformers cannot build this config"),
    "heads do not divide the width": ({"hidden_size": 30}, "transformers cannot build this config"),
    "a field of the wrong type": ({"num_attention_heads": "four"}, "transformers cannot build this config"),
    "not a causal language model": ({"model_type": "vit"}, "model_type 'vit' is not a causal language model"),
}


@pytest.mark.parametrize("case", BAD_TOKENIZERS)
def test_a_search_base_without_a_loadable_tokenizer_is_refused(case, zoo, tmp_path, capsys):
    damage, expected = BAD_TOKENIZERS[case]
    damage(zoo["base"])
    line = refused(search_args(tmp_path, zoo["base"], zoo["a"]), tmp_path, capsys)
    assert expected in line and str(zoo["base"]) in line and "sentencepiece" not in line


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_search_base_config_transformers_cannot_build_is_refused(case, zoo, tmp_path, capsys):
    changes, expected = BAD_CONFIGS[case]
    edit_config(zoo["base"], **changes)
    edit_config(zoo["a"], **changes)  # the models agree: only transformers can tell
    line = refused(search_args(tmp_path, zoo["base"], zoo["a"]), tmp_path, capsys)
    assert f"{zoo['base'] / 'config.json'}: {expected}" in line


def test_a_sound_base_is_loadable(zoo):
    check_loadable(str(zoo["base"]), open_checkpoint(str(zoo["base"])))


@pytest.mark.parametrize("case", [c for c in BAD_TOKENIZERS if c != "no tokenizer files"])
def test_a_broken_tokenizer_of_a_vocabulary_merge_is_one_line(case, zoo, tmp_path, capsys):
    damage, expected = BAD_TOKENIZERS[case]
    damage(zoo["a"])
    err = refused(["merge", str(recipe_file(tmp_path, zoo["base"], zoo["a"], tokenizer_source="union")),
                   "--out", str(tmp_path / "out")], tmp_path, capsys)
    assert str(zoo["a"]) in err and expected.replace("to evaluate with", "to build the output vocabulary from") in err
    assert "sentencepiece" not in err
