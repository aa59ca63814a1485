"""Bad input fails before any compute: one line naming what and where, exit code 2, nothing written or
removed (the input folders' checksums and the output's parent listing are the same before and after)."""

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import yaml
from helpers import checksums
from safetensors.torch import load_file, save_file

from evomerge.checkpoint import shard_bytes
from evomerge.cli import main
from evomerge.errors import SpecError
from evomerge.files import check_output_folder
from evomerge.merge import merge_to_folder
from evomerge.recipes import Recipe


def write_safetensors(path, header, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)




@pytest.fixture
def broken(llama_zoo, tmp_path):
    """Copies of the base model, each damaged in one way."""
    def copy(name):
        dst = tmp_path / name
        shutil.copytree(llama_zoo["base"], dst)
        return dst

    renamed = copy("renamed")
    tensors = load_file(renamed / "model.safetensors")
    tensors["model.layers.0.mlp.gate_proj.weight_renamed"] = tensors.pop("model.layers.0.mlp.gate_proj.weight")
    save_file(tensors, renamed / "model.safetensors", metadata={"format": "pt"})

    reshaped = copy("reshaped")
    tensors = load_file(reshaped / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(tensors, reshaped / "model.safetensors", metadata={"format": "pt"})

    vocab = copy("vocab")
    config = json.loads((vocab / "config.json").read_text())
    config["vocab_size"] = 50
    (vocab / "config.json").write_text(json.dumps(config))

    corrupt = copy("corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")

    damaged = {"renamed": renamed, "reshaped": reshaped, "vocab": vocab, "corrupt": corrupt, "empty": empty}
    f32 = {"dtype": "F32", "shape": [2]}
    headers = {
        "list_header": ([f32], bytes(8)),
        "offsets_size": ({"x": {**f32, "data_offsets": [0, 12]}}, bytes(12)),
        "offsets_overlap": ({"x": {**f32, "data_offsets": [0, 8]}, "y": {**f32, "data_offsets": [4, 12]}}, bytes(12)),
        "offsets_gap": ({"x": {**f32, "data_offsets": [0, 8]}, "y": {**f32, "data_offsets": [12, 20]}}, bytes(20)),
        "negative_shape": ({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)),
    }
    for name, (header, data) in headers.items():
        damaged[name] = copy(name)
        write_safetensors(damaged[name] / "model.safetensors", header, data)

    damaged["config_list"] = copy("config_list")
    (damaged["config_list"] / "config.json").write_text("[1, 2]")
    damaged["no_config"] = copy("no_config")
    (damaged["no_config"] / "config.json").unlink()

    tensors = load_file(llama_zoo["base"] / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-1.safetensors": names[: len(names) // 2], "model-2.safetensors": names[len(names) // 2 :]}
    for case, weight_map in {
        "index_list": list(names),
        "index_values": dict.fromkeys(names, 3),
        "index_wrong_shard": {n: "model-1.safetensors" for n in names},
        "index_path": {n: "../model-1.safetensors" for n in names},
    }.items():
        damaged[case] = copy(case)
        (damaged[case] / "model.safetensors").unlink()
        for file, members in shards.items():
            save_file({n: tensors[n] for n in members}, damaged[case] / file, metadata={"format": "pt"})
        (damaged[case] / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return damaged


def ties(base, *models, **params):
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 1.0, **params}} for m in models]}


CASES = {
    "missing folder": (lambda z, b: ties(z["base"], z["a"], "/nonexistent/model"),
                       "model folder not found: /nonexistent/model"),
    "no weights": (lambda z, b: ties(z["base"], z["a"], b["empty"]), "no safetensors weights in"),
    "tensor names": (lambda z, b: ties(z["base"], z["a"], b["renamed"]), "tensor model.layers.0.mlp.gate_proj.weight"),
    "tensor shapes": (lambda z, b: ties(z["base"], z["a"], b["reshaped"]),
                      "tensor model.layers.1.mlp.up_proj.weight has shape [64, 32]"),
    "vocabulary": (lambda z, b: ties(z["base"], b["vocab"]), "vocabulary sizes differ"),
    "corrupt file": (lambda z, b: ties(z["base"], b["corrupt"]), "not a readable safetensors file"),
    "unknown method": (lambda z, b: {**ties(z["base"], z["a"]), "merge_method": "tiez"}, "unknown merge method 'tiez'"),
    "density range": (lambda z, b: ties(z["base"], z["a"], density=1.5), "density=1.5 is outside [0.0, 1.0]"),
    "gradient range": (lambda z, b: ties(z["base"], z["a"], density=[0.5, -0.1]), "density=-0.1 is outside"),
    "slerp needs two": (lambda z, b: {"merge_method": "slerp", "base_model": str(z["base"]),
                                      "models": [{"model": str(z["a"])}, {"model": str(z["b"])}]},
                        "method slerp needs 1 model(s) besides the base, got 2"),
    "unknown parameter": (lambda z, b: ties(z["base"], z["a"], gamma=0.1), "ties has no parameter 'gamma'"),
    "della limits": (lambda z, b: {**ties(z["base"], z["a"], density=0.9, epsilon=0.2), "merge_method": "della"},
                     "density 0.9 +/- epsilon 0.2 must stay inside (0, 1)"),
    "missing base": (lambda z, b: {k: v for k, v in ties(z["base"], z["a"]).items() if k != "base_model"},
                     "method ties needs a base_model"),
    "unsupported key": (lambda z, b: {**ties(z["base"], z["a"]), "slices": []}, "slices: Extra inputs"),
    # parameters: finite, inside declared ranges, no empty lists
    "nan density": (lambda z, b: ties(z["base"], z["a"], density=float("nan")),
                    "models.0.parameters.density: Input should be a finite number"),
    "inf weight": (lambda z, b: {**ties(z["base"], z["a"]), "models": [
        {"model": str(z["a"]), "parameters": {"weight": [1.0, float("inf")]}}]},
        "models.0.parameters.weight.1: Input should be a finite number"),
    "nan in filter": (lambda z, b: ties(z["base"], z["a"], density=[{"filter": "mlp", "value": float("nan")}]),
                      "models.0.parameters.density.0.value: Input should be a finite number"),
    "weight range": (lambda z, b: {**ties(z["base"], z["a"]), "models": [
        {"model": str(z["a"]), "parameters": {"weight": 20}}]}, "weight=20.0 is outside [-10.0, 10.0]"),
    "lambda range": (lambda z, b: {**ties(z["base"], z["a"]), "parameters": {"lambda": -11}},
                     "lambda=-11.0 is outside [-10.0, 10.0]"),
    "empty gradient": (lambda z, b: ties(z["base"], z["a"], density=[]),
                       "models.0.parameters.density: List should have at least 1 item"),
    "empty filtered value": (lambda z, b: ties(z["base"], z["a"], density=[{"filter": "mlp", "value": []}]),
                             "models.0.parameters.density.0.value: List should have at least 1 item"),
    # input folders
    "no config": (lambda z, b: ties(z["base"], b["no_config"]), "no config.json in"),
    "config not an object": (lambda z, b: ties(z["base"], b["config_list"]),
                             "config.json: expected a JSON object, got list"),
    "header is a list": (lambda z, b: ties(z["base"], b["list_header"]), "header is not a JSON object"),
    "offsets vs shape": (lambda z, b: ties(z["base"], b["offsets_size"]),
                         "tensor x: data_offsets [0, 12] do not match shape [2] of F32"),
    "overlapping offsets": (lambda z, b: ties(z["base"], b["offsets_overlap"]),
                            "tensor y: data_offsets [4, 12] overlap or leave a gap (previous data ends at 8)"),
    "gap in offsets": (lambda z, b: ties(z["base"], b["offsets_gap"]), "tensor y: data_offsets [12, 20] overlap"),
    "negative shape": (lambda z, b: ties(z["base"], b["negative_shape"]), "tensor x has a bad shape"),
    "index not a map": (lambda z, b: ties(z["base"], b["index_list"]), "weight_map must map tensor names"),
    "index values": (lambda z, b: ties(z["base"], b["index_values"]), "weight_map must map tensor names"),
    "index escapes folder": (lambda z, b: ties(z["base"], b["index_path"]), "weight_map must map tensor names"),
    "index wrong shard": (lambda z, b: ties(z["base"], b["index_wrong_shard"]), "is not in its shard model-1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_recipe_fails_fast(case, llama_zoo, broken, tmp_path, capsys):
    make, expected = CASES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make(llama_zoo, broken)))
    before = set(tmp_path.iterdir()), checksums(tmp_path, *llama_zoo.values())
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err
    assert (set(tmp_path.iterdir()), checksums(tmp_path, *llama_zoo.values())) == before  # nothing written


@pytest.fixture
def own_zoo(llama_zoo, tmp_path):
    """Copies of the zoo (so that a failure here cannot spoil the session's models) under tmp/models."""
    for name in ("base", "a"):
        shutil.copytree(llama_zoo[name], tmp_path / "models" / name)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(ties(tmp_path / "models" / "base", tmp_path / "models" / "a")))
    return recipe


@pytest.mark.parametrize(("out", "relation"), [("models/base", "is"), ("models/a", "is"), ("models", "contains"),
                                               (".", "contains"), ("models/base/merged", "lies inside")])
def test_force_never_touches_an_input(own_zoo, tmp_path, out, relation, capsys):
    out = tmp_path / out
    parent = out.parent
    before = sorted(parent.iterdir()), checksums(tmp_path)
    assert main(["merge", str(own_zoo), "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"output folder {out} {relation} " in err and "must stay untouched" in err
    assert (sorted(parent.iterdir()), checksums(tmp_path)) == before


def test_input_reached_through_a_symlink_is_protected(own_zoo, tmp_path, capsys):
    (tmp_path / "link").symlink_to(tmp_path / "models" / "a")
    assert main(["merge", str(own_zoo), "--out", str(tmp_path / "link"), "--force"]) == 2
    assert "must stay untouched" in capsys.readouterr().err
    assert (tmp_path / "models" / "a" / "model.safetensors").exists()


def test_protected_folder_for_export(tmp_path):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    for out in (run, tmp_path / "runs", run / "merged"):
        with pytest.raises(SpecError, match="must stay untouched"):
            check_output_folder(out, True, protected=[run])
    check_output_folder(tmp_path / "runs" / "r2", True, protected=[run])  # a sibling is fine


def test_merge_protects_extra_folders(own_zoo, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "study.db").write_text("keep")
    with pytest.raises(SpecError, match=f"output folder {run} is {run}, which must stay untouched"):
        merge_to_folder(Recipe.from_yaml(own_zoo), run, force=True, protected=[run])
    assert (run / "study.db").read_text() == "keep"


def test_unwritable_location_fails_up_front(own_zoo, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["merge", str(own_zoo), "--out", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a writable folder" in err
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.slow
def test_read_only_parent_fails_up_front(own_zoo, tmp_path):
    """An --out on a file system mounted read-only (a bind mount in the mount namespace of a child process: root
    cannot write through it either) is refused before compute."""
    locked = tmp_path / "locked"
    locked.mkdir()
    ns = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    mount = f"mount --bind {locked} {locked} && mount -o remount,ro,bind {locked} && exec \"$@\""
    out = subprocess.run([*ns, "sh", "-c", mount, "sh", sys.executable, "-m", "evomerge.cli", "merge", str(own_zoo),
                          "--out", str(locked / "out")], capture_output=True, text=True, timeout=300)
    err = out.stderr.strip()
    assert out.returncode == 2 and len(err.splitlines()) == 1 and "is not a writable folder" in err, err
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("size", ["nan", "inf", "-inf", "0", "-1"])
def test_shard_size_must_be_positive(size):
    with pytest.raises(SpecError, match="--shard-size must be a positive number of GiB"):
        shard_bytes(float(size))


def test_merge_refuses_empty_shards(own_zoo, tmp_path):
    with pytest.raises(SpecError, match="shard size must be at least one byte"):
        merge_to_folder(Recipe.from_yaml(own_zoo), tmp_path / "out", max_shard_bytes=0)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_killed_merge_leftovers_are_removed_and_modes_are_normal(own_zoo, tmp_path):
    out = tmp_path / "out"
    kill = ("import os, sys; from pathlib import Path; from evomerge.files import atomic_folder\n"
            "with atomic_folder(Path(sys.argv[1])) as tmp:\n    (tmp / 'half').write_text('x'); os._exit(9)")
    assert subprocess.run([sys.executable, "-c", kill, str(out)]).returncode == 9
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(stale) == 1 and (stale[0] / "half").exists()  # what a killed writer leaves
    ours = tmp_path / f".out.tmp-{os.getpid()}-0123abcd"  # a live writer's: not ours to remove
    others = [tmp_path / ".other.tmp-1-0123abcd", tmp_path / ".out.tmp-x", tmp_path / "out.tmp-1-0123abcd"]
    for folder in [ours, *others]:
        folder.mkdir()
    old = os.umask(0o027)
    try:
        assert main(["merge", str(own_zoo), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert not stale[0].exists() and ours.exists() and all(p.exists() for p in others)
    assert out.stat().st_mode & 0o777 == 0o750
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir() if f.suffix in (".yml", ".yaml", ".safetensors")} \
        == dict.fromkeys(["model.safetensors", "evomerge_recipe.yaml", "mergekit_config.yml"], 0o640)


def test_existing_output_needs_force(llama_zoo, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(ties(llama_zoo["base"], llama_zoo["a"])))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["merge", str(recipe), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    assert main(["merge", str(recipe), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_recipe_that_is_a_folder_or_binary(tmp_path, capsys):
    binary = tmp_path / "recipe.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    for path, expected in ((tmp_path, "is a folder, not a YAML file"), (binary, "not a text file")):
        for argv in (["merge", str(path), "--out", str(tmp_path / "o")], ["search", str(path), "--budget", "2"]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "o").exists()


def test_invalid_yaml_and_missing_recipe(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [unclosed")
    assert main(["merge", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "file not found" in capsys.readouterr().err
