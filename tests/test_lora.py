"""LoRA adapters as merge inputs (mergekit's ``BASE+ADAPTER`` reference): adapters made here with ``peft`` on
tiny models, merged by evomerge without writing the fine-tune, checked against PEFT's own
``merge_and_unload()`` of the same saved adapter; bad adapters stop before compute with one line."""

import hashlib
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from evomerge.cli import main  # noqa: E402
from evomerge.errors import SpecError  # noqa: E402
from evomerge.lora import AdaptedCheckpoint  # noqa: E402
from evomerge.merge import LiveMerger, merge_to_folder  # noqa: E402
from evomerge.models import open_checkpoint  # noqa: E402
from evomerge.recipes import Recipe
from evomerge.refs import hub_id_of, model_folders, resolve_model_path, split_adapter_ref  # noqa: E402  # noqa: E402

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(base: Path, out: Path, seed: int, dtype: torch.dtype | None = None, **lora) -> Path:
    """A PEFT LoRA adapter of ``base`` with every trainable tensor (LoRA factors, modules_to_save copies,
    trained biases) moved off its initial value (PEFT starts B at zero: a no-op adapter), saved as PEFT saves."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen).to(param.dtype))
    peft_model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """PEFT's reference: the adapter loaded onto the base (PEFT's defaults) and merged with merge_and_unload()."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {n: t.detach().clone() for n, t in merged.state_dict().items()}


def weights(path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(str(path))
    return {n: ckpt.read(n) for n in ckpt.tensors}


def write_recipe(path: Path, doc: dict) -> str:
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def checksums(*folders) -> dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest()
            for folder in folders for f in sorted(Path(folder).rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def bf16_base(llama_zoo, tmp_path_factory) -> Path:
    """The zoo's Llama base stored in bfloat16."""
    out = tmp_path_factory.mktemp("bf16") / "base"
    AutoModelForCausalLM.from_pretrained(llama_zoo["base"], dtype=torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(llama_zoo, gpt2_zoo, bf16_base, tmp_path_factory) -> dict[str, tuple[Path, Path, torch.dtype | None]]:
    """name -> (base folder, adapter folder, dtype PEFT loads the base in)."""
    root = tmp_path_factory.mktemp("adapters")
    base, gpt2 = llama_zoo["base"], gpt2_zoo["base"]
    made = {
        # every Llama projection, the embedding (saved with its base layer), lm_head as modules_to_save,
        # a rank and an alpha per module pattern
        "llama": (base, save_adapter(base, root / "llama", 1, r=4, lora_alpha=8,
                                     target_modules=[*LLAMA_ALL, "embed_tokens"], modules_to_save=["lm_head"],
                                     rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3}),
                  None),
        "rslora": (base, save_adapter(base, root / "rslora", 2, r=4, lora_alpha=8, use_rslora=True,
                                      target_modules=["q_proj", "v_proj", "down_proj"]), None),
        # a bfloat16 base: PEFT upcasts the adapter to float32 and rounds base + delta once into bfloat16
        "bf16": (bf16_base, save_adapter(bf16_base, root / "bf16", 3, dtype=torch.bfloat16, r=4, lora_alpha=8,
                                         target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"]),
                 torch.bfloat16),
        # GPT-2's Conv1D layers (weights stored in x out): fan_in_fan_out, which PEFT turns on for them; also a
        # LoRA bias (lora_bias) and trained biases of the adapted layers (bias: lora_only)
        "gpt2": (gpt2, save_adapter(gpt2, root / "gpt2", 4, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj",
                                                                                               "c_fc"],
                                    bias="lora_only", lora_bias=True), None),
        "second": (base, save_adapter(base, root / "second", 5, r=4, lora_alpha=16,
                                      target_modules=["q_proj", "k_proj", "up_proj"], modules_to_save=["lm_head"]),
                   None),
    }
    # fan_in_fan_out set on a Llama adapter: PEFT ignores it for nn.Linear modules (q_proj is square here, so
    # only the other modules' shapes tell the orientation)
    flag = root / "fan_in_fan_out"
    shutil.copytree(made["rslora"][1], flag)
    config = json.loads((flag / "adapter_config.json").read_text())
    (flag / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    made["fan_in_fan_out"] = (base, flag, None)
    # the same flag on an adapter of square modules only: no shape tells the orientation, the layer type does
    square = save_adapter(base, root / "square", 6, r=4, lora_alpha=8, target_modules=["q_proj"])
    config = json.loads((square / "adapter_config.json").read_text())
    (square / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    made["square_flag"] = (base, square, None)
    return made


@pytest.mark.parametrize("case", ["llama", "rslora", "bf16", "gpt2", "fan_in_fan_out", "square_flag"])
def test_linear_merge_of_base_plus_adapter_is_peft_merge_and_unload_bit_for_bit(adapters, case, tmp_path):
    base, adapter, dtype = adapters[case]
    recipe = write_recipe(tmp_path / "recipe.yaml", {"merge_method": "linear",
                                                     "models": [{"model": f"{base}+{adapter}",
                                                                 "parameters": {"weight": 1.0}}]})
    out = tmp_path / "out"
    assert main(["merge", recipe, "--out", str(out)]) == 0
    got, expected, plain = load_file(out / "model.safetensors"), peft_merged(base, adapter, dtype), weights(base)
    assert set(got) == set(plain)
    changed = 0
    for name, tensor in got.items():
        assert tensor.dtype == plain[name].dtype == expected[name].dtype, name
        assert torch.equal(tensor, expected[name]), name
        changed += not torch.equal(tensor, plain[name])
    targeted = {"llama": 3 * 7 + 2, "rslora": 9, "bf16": 3 * 3 + 1, "gpt2": 2 * 4 * 2, "fan_in_fan_out": 9,
                "square_flag": 3}[case]
    assert changed == targeted  # every adapted tensor (and only those) moved
    assert json.loads((out / "config.json").read_text())["model_type"] == json.loads(
        (base / "config.json").read_text())["model_type"]
    assert not list(tmp_path.glob("**/adapter_model.safetensors"))  # nothing of an adapter copied
    AutoModelForCausalLM.from_pretrained(out)


def test_adapted_checkpoint_presents_the_base(adapters):
    base, adapter, _ = adapters["llama"]
    ckpt, plain = open_checkpoint(f"{base}+{adapter}"), open_checkpoint(str(base))
    assert isinstance(ckpt, AdaptedCheckpoint)
    assert ckpt.path == plain.path and ckpt.config == plain.config
    assert {n: (i.shape, i.dtype) for n, i in ckpt.tensors.items()} == {
        n: (i.shape, i.dtype) for n, i in plain.tensors.items()}
    assert (ckpt.num_layers, ckpt.vocab_size, ckpt.layer_prefix) == (plain.num_layers, plain.vocab_size,
                                                                     plain.layer_prefix)
    untouched = "model.layers.0.input_layernorm.weight"
    assert torch.equal(ckpt.read(untouched), plain.read(untouched))


def two_adapter_recipe(base: Path, first: Path, second: Path) -> Recipe:
    return Recipe(merge_method="task_arithmetic", base_model=str(base),
                  models=[{"model": f"{base}+{first}", "parameters": {"weight": 0.7}},
                          {"model": f"{base}+{second}", "parameters": {"weight": -0.4}}])


def test_task_arithmetic_of_two_adapters_and_the_live_worker(adapters, tmp_path):
    base, first, _ = adapters["llama"]
    _, second, _ = adapters["second"]
    recipe = two_adapter_recipe(base, first, second)
    out = tmp_path / "out"
    merge_to_folder(recipe, out)
    streamed, plain = weights(out), weights(base)
    one, two = peft_merged(base, first), peft_merged(base, second)
    for name, b in plain.items():
        expected = b + 0.7 * (one[name] - b) - 0.4 * (two[name] - b)
        torch.testing.assert_close(streamed[name], expected, rtol=0, atol=1e-6)
    assert not torch.equal(streamed["lm_head.weight"], plain["lm_head.weight"])

    # the live worker: LiveMerger reads the same references through open_checkpoint
    model = AutoModelForCausalLM.from_pretrained(base)
    merger = LiveMerger(model, str(base), [m.model for m in recipe.models])
    merger.apply(recipe)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), streamed[name]), name


@pytest.mark.skipif(shutil.which("mergekit-yaml") is None, reason="mergekit is not installed")
def test_written_mergekit_config_keeps_the_adapters(adapters, tmp_path, mergekit):
    """mergekit_config.yml names each input as BASE+ADAPTER; mergekit applies the LoRAs itself and agrees."""
    base, first, _ = adapters["llama"]
    _, second, _ = adapters["second"]
    out = merge_to_folder(two_adapter_recipe(base, first, second), tmp_path / "ours")
    config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert [m["model"] for m in config["models"]][:2] == [f"{base.resolve()}+{first.resolve()}",
                                                        f"{base.resolve()}+{second.resolve()}"]
    done = mergekit.run("mergekit-yaml", out / "mergekit_config.yml", tmp_path / "theirs", "--lora-merge-cache",
                        tmp_path / "lora-cache")
    assert done.returncode == 0, done.stderr[-2000:]
    ours, theirs = weights(out), weights(tmp_path / "theirs")
    assert set(ours) == set(theirs)
    worst = max((ours[n] - theirs[n]).abs().max().item() for n in ours)
    assert worst <= 1e-5, worst


def test_an_adapted_base_in_the_live_worker(adapters, tmp_path):
    """BASE+ADAPTER as the base itself (the worker loads the base folder's model, the merger its adapted tensors)."""
    base, first, _ = adapters["llama"]
    _, second, _ = adapters["second"]
    adapted = f"{base}+{first}"
    recipe = Recipe(merge_method="task_arithmetic", base_model=adapted,
                    models=[{"model": f"{base}+{second}", "parameters": {"weight": 0.5}}])
    merge_to_folder(recipe, tmp_path / "out")
    streamed = weights(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(adapted))
    LiveMerger(model, adapted, [f"{base}+{second}"]).apply(recipe)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), streamed[name]), name


def test_references(adapters, tmp_path):
    base, adapter, _ = adapters["llama"]
    ref = f"{base}+{adapter}"
    assert split_adapter_ref(ref) == (str(base), str(adapter))
    assert split_adapter_ref(str(base)) is None
    assert resolve_model_path(ref) == base and hub_id_of(ref) is None
    assert model_folders(ref) == [base, adapter]
    assert split_adapter_ref("org/base@v1+org/adapter@v2") == ("org/base@v1", "org/adapter@v2")
    assert hub_id_of("org/base@v1+org/adapter") == ("org/base", "v1")
    # an existing folder whose name holds a '+' is a folder, as mergekit's form cannot be meant
    odd = tmp_path / "a+b"
    shutil.copytree(base, odd)
    assert split_adapter_ref(str(odd)) is None and resolve_model_path(str(odd)) == odd
    with pytest.raises(SpecError, match="expected BASE\\+ADAPTER"):
        resolve_model_path(f"{base}+{adapter}+{adapter}")


def cache_repo(hub: Path, repo_id: str, src: Path, commit: str) -> None:
    """``src``'s files as huggingface_hub's cache holds a download (blobs, snapshot symlinks, refs/main)."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in sorted(src.iterdir()):
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_base_and_hub_adapter(adapters, tmp_path, monkeypatch):
    from huggingface_hub import constants

    base, adapter, _ = adapters["rslora"]
    hub = tmp_path / "hub"
    cache_repo(hub, "org/base", base, "1" * 40)
    cache_repo(hub, "org/adapter", adapter, "2" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    ckpt = open_checkpoint("org/base+org/adapter")
    local = open_checkpoint(f"{base}+{adapter}")
    assert ckpt.adapter == hub / "models--org--adapter" / "snapshots" / ("2" * 40)
    for name in local.tensors:
        assert torch.equal(ckpt.read(name), local.read(name)), name
    assert hub_id_of("org/base+org/adapter") == ("org/base", None)
    with pytest.raises(SpecError, match="org/missing"):
        open_checkpoint("org/base+org/missing")


@pytest.fixture(scope="module")
def bad_adapters(llama_zoo, gpt2_zoo, adapters, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    other = root / "other_base"  # same architecture, other shapes
    LlamaForCausalLM(LlamaConfig(vocab_size=46, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=False)).save_pretrained(other)
    bad = {
        "other_shapes": save_adapter(other, root / "other_shapes", 6, r=4, lora_alpha=8, target_modules=["up_proj"]),
        "dora": save_adapter(llama_zoo["base"], root / "dora", 7, r=4, lora_alpha=8, use_dora=True,
                             target_modules=["q_proj", "v_proj"]),
        "other_architecture": adapters["gpt2"][1],
    }

    def edited(name: str, **changes) -> None:
        bad[name] = root / name
        shutil.copytree(adapters["rslora"][1], bad[name])
        config = json.loads((bad[name] / "adapter_config.json").read_text())
        (bad[name] / "adapter_config.json").write_text(json.dumps({**config, **changes}))

    edited("pissa", init_lora_weights="pissa")
    edited("rank", r=8)
    edited("unknown_field", use_sparkles=True)
    edited("not_lora", peft_type="IA3")
    edited("no_weights")
    (bad["no_weights"] / "adapter_model.safetensors").unlink()
    edited("config_list")
    (bad["config_list"] / "adapter_config.json").write_text("[1, 2]")
    edited("corrupt")
    data = (bad["corrupt"] / "adapter_model.safetensors").read_bytes()
    (bad["corrupt"] / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    bad["no_config"] = root / "no_config"
    bad["no_config"].mkdir()
    shutil.copy(adapters["rslora"][1] / "adapter_model.safetensors", bad["no_config"])
    return bad


BAD = {
    "missing adapter folder": (lambda base, bad: f"{base}+/nonexistent/adapter",
                               "LoRA adapter folder not found: /nonexistent/adapter"),
    "adapter of a differently shaped base": (lambda base, bad: f"{base}+{bad['other_shapes']}",
                                             "do not fit model.layers.0.mlp.up_proj.weight of shape [64, 32]"),
    "DoRA": (lambda base, bad: f"{base}+{bad['dora']}", "uses DoRA (use_dora: True), which evomerge does not merge"),
    "adapter of another architecture": (lambda base, bad: f"{base}+{bad['other_architecture']}",
                                        "targets transformer.h.0.attn.c_attn.bias, which the base"),
    "PiSSA initialisation": (lambda base, bad: f"{base}+{bad['pissa']}", "init_lora_weights is 'pissa'"),
    "rank differs from config": (lambda base, bad: f"{base}+{bad['rank']}", "do not have rank r=8"),
    "unknown config field": (lambda base, bad: f"{base}+{bad['unknown_field']}", "sets use_sparkles=True"),
    "not a LoRA": (lambda base, bad: f"{base}+{bad['not_lora']}", "peft_type is 'IA3'"),
    "no weights file": (lambda base, bad: f"{base}+{bad['no_weights']}", "no adapter_model.safetensors"),
    "config not an object": (lambda base, bad: f"{base}+{bad['config_list']}", "expected a JSON object, got list"),
    "corrupt weights": (lambda base, bad: f"{base}+{bad['corrupt']}", "not a readable safetensors file"),
    "no adapter config": (lambda base, bad: f"{base}+{bad['no_config']}", "no adapter_config.json"),
    "a model after the +": (lambda base, bad: f"{base}+{base}", "holds a full model (config.json), not an adapter"),
    "two adapters": (lambda base, bad: f"{base}+{bad['dora']}+{bad['rank']}", "expected BASE+ADAPTER"),
    "an adapter alone": (lambda base, bad: str(bad["rank"]), "it holds a LoRA adapter: name it with its base"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapters_stop_before_compute(case, llama_zoo, adapters, bad_adapters, tmp_path, capsys):
    make, expected = BAD[case]
    base = llama_zoo["base"]
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(llama_zoo["a"]), "parameters": {"weight": 0.5}},
                   {"model": make(base, bad_adapters), "parameters": {"weight": 0.5}}]})
    before = sorted(tmp_path.iterdir()), checksums(tmp_path, base, *bad_adapters.values())
    assert main(["merge", recipe, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err
    assert (sorted(tmp_path.iterdir()), checksums(tmp_path, base, *bad_adapters.values())) == before


def test_the_adapter_folder_is_protected_from_the_output(adapters, tmp_path, capsys):
    base, adapter, _ = adapters["rslora"]
    mine = tmp_path / "adapter"
    shutil.copytree(adapter, mine)
    recipe = write_recipe(tmp_path / "recipe.yaml", {"merge_method": "linear",
                                                     "models": [{"model": f"{base}+{mine}"}]})
    before = checksums(mine)
    code = main(["merge", recipe, "--out", str(mine), "--force"])
    assert checksums(mine) == before
    assert code == 2 and "must stay untouched" in capsys.readouterr().err


def test_an_unread_base_keeps_its_local_adapter_protected(adapters, tmp_path, capsys):
    """linear reads no base; a base named as a (not cached) Hub model plus a local adapter is not looked up,
    yet the adapter folder is still the user's input and no output may replace it."""
    base, adapter, _ = adapters["rslora"]
    mine = tmp_path / "adapter"
    shutil.copytree(adapter, mine)
    recipe = write_recipe(tmp_path / "recipe.yaml", {"merge_method": "linear", "base_model": f"someorg/base+{mine}",
                                                     "models": [{"model": str(base)}]})
    before = checksums(mine)
    assert main(["merge", recipe, "--out", str(mine), "--force"]) == 2
    assert checksums(mine) == before and "must stay untouched" in capsys.readouterr().err
