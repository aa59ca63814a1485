"""Bad input fails before any compute: one line naming what and where, exit code 2, nothing written."""

import json
import shutil

import pytest
import yaml
from safetensors.torch import load_file, save_file

from evomerge.cli import main


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
    return {"renamed": renamed, "reshaped": reshaped, "vocab": vocab, "corrupt": corrupt, "empty": empty}


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
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_recipe_fails_fast(case, llama_zoo, broken, tmp_path, capsys):
    make, expected = CASES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make(llama_zoo, broken)))
    before = set(tmp_path.iterdir())
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expected in err
    assert set(tmp_path.iterdir()) == before  # no output folder, no temp folder left behind


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


def test_invalid_yaml_and_missing_recipe(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [unclosed")
    assert main(["merge", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "file not found" in capsys.readouterr().err
