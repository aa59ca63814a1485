"""Models whose vocabularies differ (fine-tunes that appended tokens), merged with mergekit's ``tokenizer_source``:
the streamed merge against ``mergekit-yaml`` on the config we write, the live merge against the streamed one, and
the refusals."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import checksums, weights
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from evomerge.cli import main
from evomerge.errors import SpecError
from evomerge.merge import LiveMerger, merge_to_folder
from evomerge.recipes import Recipe

WORDS = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(17))]  # 20 tokens
CHAT = ["<|im_start|>", "<|im_end|>"]


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline (nothing downloaded)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def fine_tune(base, folder, seed: int, added: list[str] = (), tokenizer=None):
    """A 'fine-tune' of ``base``: the base's tokenizer (or ``tokenizer``) with special tokens appended and the
    embeddings resized to fit, every weight perturbed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(base)
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": list(added)})
        model.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return save(model, tokenizer, folder)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A 2-layer Llama (untied head) with a 20-token vocabulary and its fine-tunes: ``a`` appends the two chat
    tokens, ``b`` those and ``<tool>``, ``c`` keeps the vocabulary, ``d`` has ``z16`` where the base has ``w16``.
    Any order of a, b, c gives the same union, so mergekit's (which follows a set's order) is reproducible."""
    root = tmp_path_factory.mktemp("vocab")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    base = save(LlamaForCausalLM(config), word_tokenizer(WORDS), root / "base")
    renamed = [w if w != "w16" else "z16" for w in WORDS]
    return {"base": base, "a": fine_tune(base, root / "a", 1, CHAT),
            "b": fine_tune(base, root / "b", 2, [*CHAT, "<tool>"]), "c": fine_tune(base, root / "c", 3),
            "d": fine_tune(base, root / "d", 4, tokenizer=word_tokenizer(renamed))}


@pytest.fixture(scope="module")
def gpt2_zoo(tmp_path_factory):
    """A tied GPT-2 (its ``wte`` is also the head) and a fine-tune that appends the chat tokens."""
    root = tmp_path_factory.mktemp("vocab-gpt2")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(WORDS), n_embd=16, n_layer=2, n_head=2, n_positions=32)
    base = save(GPT2LMHeadModel(config), word_tokenizer(WORDS), root / "base")
    return {"base": base, "a": fine_tune(base, root / "a", 1, CHAT)}


def recipe(method, zoo, names, source, base=True, **params):
    entries = [{"model": str(zoo[n]), "parameters": {"weight": 0.3 + 0.2 * i, **params}} for i, n in enumerate(names)]
    doc = {"merge_method": method, "models": entries, "tokenizer_source": source}
    if base:
        doc["base_model"] = str(zoo["base"])
    return Recipe.model_validate(doc)


def run_mergekit(mergekit, config, out):
    """``mergekit-yaml`` on a config we wrote."""
    done = mergekit.run("mergekit-yaml", config, out)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


CASES = {  # name: (method, models, tokenizer_source, merge params, base_model given)
    # base: fine-tunes cut back to the base's tokens; linear reads no base, so the config names it by path
    "base linear": ("linear", ["a", "b"], "base", {}, True),
    "base ties": ("ties", ["a", "b"], "base", {"density": 0.6}, True),
    # union: the chat tokens are the mean of a's and b's rows for c; <tool> is b's row for everyone
    "union linear": ("linear", ["a", "b", "c"], "union", {}, False),
    "union ties": ("ties", ["a", "b"], "union", {"density": 0.6}, True),
    # d lacks w16 (the base's row fills it) and alone has z16 (d's row for everyone)
    "union task_arithmetic": ("task_arithmetic", ["a", "d"], "union", {}, True),
    # a model's vocabulary, b's: <tool> is in no merged model (zeros) when b is not merged
    "model linear": ("linear", ["a", "b", "c"], "b", {}, False),
    "model task_arithmetic": ("task_arithmetic", ["a", "c"], "b", {}, True),
}

@pytest.mark.skipif(shutil.which("mergekit-yaml") is None, reason="mergekit is not installed")
@pytest.mark.parametrize("case", list(CASES))
def test_matches_mergekit(case, zoo, tmp_path, mergekit):
    method, names, source, params, base = CASES[case]
    if source in zoo:
        source = str(zoo[source])
    ours = merge_to_folder(recipe(method, zoo, names, source, base, **params), tmp_path / "ours")
    written = yaml.safe_load((ours / "mergekit_config.yml").read_text())["tokenizer_source"]
    if source == "base" and method == "linear":  # mergekit's base without a base_model is any model
        source = str(zoo["base"])
    assert written == (source if source in ("base", "union") else str(Path(source).resolve()))
    theirs = run_mergekit(mergekit, ours / "mergekit_config.yml", tmp_path / "theirs")
    got, want = weights(ours), weights(theirs)
    assert set(got) == set(want)
    for name in got:
        assert got[name].shape == want[name].shape, name
        assert (got[name] - want[name]).abs().max().item() <= 1e-5, name
    ours_tok, theirs_tok = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(theirs)
    assert ours_tok.get_vocab() == theirs_tok.get_vocab()
    assert {i: (t.content, t.special) for i, t in ours_tok.added_tokens_decoder.items()} == \
           {i: (t.content, t.special) for i, t in theirs_tok.added_tokens_decoder.items()}
    rows = len(ours_tok.get_vocab())
    model = AutoModelForCausalLM.from_pretrained(ours)
    assert model.config.vocab_size == rows
    assert got["model.embed_tokens.weight"].shape[0] == got["lm_head.weight"].shape[0] == rows
    assert model(torch.tensor([[1, rows - 1]])).logits.shape == (1, 2, rows)


def test_rows_a_model_lacks(zoo, tmp_path):
    """The rule by hand (task arithmetic of a and d over the base, union vocabulary): a token only one model has
    is that model's row for every model, so the merge gives that row; a token the base has and d lacks takes the
    base's row for d (no task vector there)."""
    out = merge_to_folder(recipe("task_arithmetic", zoo, ["a", "d"], "union"), tmp_path / "out")
    ids = AutoTokenizer.from_pretrained(out).get_vocab()
    got = weights(out)
    own = {n: weights(zoo[n]) for n in ("base", "a", "d")}
    vocab = {n: AutoTokenizer.from_pretrained(zoo[n]).get_vocab() for n in ("base", "a", "d")}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        for token, donor in (("z16", "d"), ("<|im_start|>", "a"), ("<|im_end|>", "a")):
            assert torch.equal(got[name][ids[token]], own[donor][name][vocab[donor][token]]), (name, token)
        base_row, a_row = own["base"][name][vocab["base"]["w16"]], own["a"][name][vocab["a"]["w16"]]
        torch.testing.assert_close(got[name][ids["w16"]], base_row + 0.3 * (a_row - base_row))


@pytest.mark.skipif(shutil.which("mergekit-yaml") is None, reason="mergekit is not installed")
def test_tied_gpt2_matches_mergekit(gpt2_zoo, tmp_path, mergekit):
    """GPT-2's ``wte`` (also its head) laid out in the union vocabulary."""
    ours = merge_to_folder(recipe("ties", gpt2_zoo, ["a"], "union", density=0.7), tmp_path / "ours")
    theirs = run_mergekit(mergekit, ours / "mergekit_config.yml", tmp_path / "theirs")
    got, want = weights(ours), weights(theirs)
    assert got["transformer.wte.weight"].shape == (len(WORDS) + 2, 16) and "lm_head.weight" not in got
    assert max((got[n] - want[n]).abs().max().item() for n in got) <= 1e-5
    assert AutoTokenizer.from_pretrained(ours).get_vocab() == AutoTokenizer.from_pretrained(theirs).get_vocab()


@pytest.mark.parametrize(("method", "names", "source"), [("ties", ["a", "b"], "union"),
                                                         ("linear", ["a", "b", "c"], "b"),
                                                         ("task_arithmetic", ["a", "d"], "union")])
def test_live_merge_equals_streamed(zoo, tmp_path, method, names, source):
    """The search worker's in-place merge: the live model resized to the output vocabulary, bit for bit the
    streamed folder."""
    source = str(zoo[source]) if source in zoo else source
    chosen = recipe(method, zoo, names, source, **({"density": 0.6} if method == "ties" else {}))
    streamed = weights(merge_to_folder(chosen, tmp_path / "out"))
    model = AutoModelForCausalLM.from_pretrained(zoo["base"])
    merger = LiveMerger(model, str(zoo["base"]), [str(zoo[n]) for n in names], tokenizer_source=source)
    merger.apply(chosen)
    assert merger.vocab.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), streamed[name]), name
    with pytest.raises(SpecError, match="tokenizer_source"):
        merger.apply(recipe(method, zoo, names, "base"))
    if source == "union":  # a union over other models may give other tokens or ids
        with pytest.raises(SpecError, match="another output vocabulary"):
            merger.apply(recipe("linear", zoo, names[:1], "union"))


def test_differing_vocabularies_need_a_tokenizer_source(zoo, tmp_path, capsys):
    doc = recipe("ties", zoo, ["a", "c"], "union", density=0.5).model_dump(mode="json", exclude_none=True)
    del doc["tokenizer_source"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vocabulary sizes differ" in err and "with tokenizer_source" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SpecError, match="with tokenizer_source"):
        LiveMerger(AutoModelForCausalLM.from_pretrained(zoo["base"]), str(zoo["base"]), [str(zoo["a"])])


BAD = {
    "model: prefix": ("model:nonexistent", "name the model itself, as mergekit does ('nonexistent', without 'model:')"),
    "missing model": ("/nonexistent/model", "tokenizer_source: model folder not found: /nonexistent/model"),
    "empty": ("", "tokenizer_source must be base, union or a model"),
    "no tokenizer": ("NO_TOKENIZER", "no tokenizer to build the output vocabulary from"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tokenizer_source_fails_up_front(case, zoo, tmp_path, capsys):
    source, expected = BAD[case]
    if source == "NO_TOKENIZER":
        source = str(tmp_path / "bare")
        shutil.copytree(zoo["c"], source, ignore=shutil.ignore_patterns("tokenizer*"))
    doc = recipe("ties", zoo, ["a", "b"], "union", density=0.5).model_dump(mode="json", exclude_none=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**doc, "tokenizer_source": source}))
    before = sorted(tmp_path.iterdir()), checksums(*zoo.values())
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and expected in err, err
    assert (sorted(tmp_path.iterdir()), checksums(*zoo.values())) == before  # nothing written


def test_base_needs_a_base_model(zoo):
    with pytest.raises(ValueError, match="tokenizer_source base needs a base_model"):
        recipe("linear", zoo, ["a", "b"], "base", base=False)


def test_tokenizer_model_is_protected(zoo, tmp_path):
    """The model whose tokenizer is read is an input: never the output, ``--force`` or not."""
    source = tmp_path / "source"
    shutil.copytree(zoo["b"], source)
    with pytest.raises(SpecError, match="must stay untouched"):
        merge_to_folder(recipe("ties", zoo, ["a", "c"], str(source), density=0.5), source, force=True)


@pytest.fixture(scope="module")
def chat_zoo(tmp_path_factory):
    """The demo's ``add`` expert with the two chat tokens appended (its embeddings and head grown by two rows)."""
    from evomerge.demo import model_path

    root = tmp_path_factory.mktemp("chat-zoo")
    model = AutoModelForCausalLM.from_pretrained(model_path("add"))
    tokenizer = AutoTokenizer.from_pretrained(model_path("add"))
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT})
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return save(model, tokenizer, root / "add-chat")


def chat_spec(chat_zoo, **changes) -> dict:
    from helpers import SMALL

    return {**SMALL, "models": [str(chat_zoo), "demo:reverse"], "tokenizer_source": "union", **changes}


@pytest.mark.slow
def test_search_over_differing_vocabularies(chat_zoo, tmp_path):
    """A search whose experts' vocabularies differ runs with ``tokenizer_source`` (candidates, the hold-out
    check's parents and average alike) and exports the union vocabulary; the export equals ``evomerge merge`` of
    the winner's recipe and carries ``tokenizer_source`` in its mergekit config."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(chat_spec(chat_zoo)))
    run = tmp_path / "run"
    assert main(["search", str(spec), "--budget", "4", "--run", str(run)]) == 0
    summary = yaml.safe_load((run / "summary.json").read_text())
    assert summary["winner_recipe"]["tokenizer_source"] == "union"
    assert {"parent demo:reverse", "uniform average"} <= set(summary["table"])
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 0
    recipe_file = tmp_path / "winner.yaml"
    recipe_file.write_text((tmp_path / "out" / "evomerge_recipe.yaml").read_text())
    assert main(["merge", str(recipe_file), "--out", str(tmp_path / "merged")]) == 0
    assert weights(tmp_path / "out").keys() == weights(tmp_path / "merged").keys()
    for name, tensor in weights(tmp_path / "out").items():
        assert torch.equal(tensor, weights(tmp_path / "merged")[name]), name
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    base_vocab = len(AutoTokenizer.from_pretrained(chat_zoo)) - len(CHAT)
    assert all(t in tokenizer.get_vocab() for t in CHAT) and len(tokenizer) == base_vocab + len(CHAT)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == len(tokenizer) == model.get_input_embeddings().weight.shape[0]
    assert yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())["tokenizer_source"] == "union"


@pytest.mark.parametrize(("changes", "expected"), [
    ({"tokenizer_source": None}, "merges them with tokenizer_source"),
    ({"space": {"kind": "dataflow"}}, "tokenizer_source works with one method"),
    ({"space": {"methods": ["ties", "linear"], "method_granularity": "groups:2"}}, "tokenizer_source works with one"),
    ({"tokenizer_source": "model:demo:base"}, "name the model itself"),
])
def test_search_with_differing_vocabularies_checked_up_front(chat_zoo, tmp_path, capsys, changes, expected):
    from helpers import search_refused

    search_refused({k: v for k, v in chat_spec(chat_zoo, **changes).items() if v is not None}, tmp_path, capsys,
                   expected)


def test_union_search_with_a_baseless_method_checked_up_front(zoo, tmp_path, capsys):
    """linear merges without the base, so its union starts from models[0]; where that numbers the tokens
    otherwise than the base-first union of the searched models (d renames a base token: the base-first union
    puts d's z16 before a's appended tokens, a's own tokenizer after them), the search stops before compute;
    where both agree (a appends, c keeps the base's vocabulary) the check passes."""
    from helpers import SMALL, search_refused

    from evomerge.launch import check_spec
    from evomerge.spec import SearchSpec

    doc = {**SMALL, "base_model": str(zoo["base"]), "models": [str(zoo["d"]), str(zoo["a"])],
           "tokenizer_source": "union", "space": {"methods": ["linear"]}}
    search_refused(doc, tmp_path, capsys, "linear merges without the base")
    check_spec(SearchSpec.model_validate({**doc, "models": [str(zoo["a"]), str(zoo["c"])]}))


def test_recipe_identity_unchanged_by_the_tokenizer_source_field():
    """Recipes without a tokenizer_source hash as before the field existed (a resumed older run still knows
    which recipes it scored): the value computed by the code before it."""
    recipe = Recipe.model_validate({"merge_method": "ties", "base_model": "demo:base", "models": [
        {"model": "demo:add", "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": "demo:reverse", "parameters": {"weight": 0.7, "density": 0.3}}]})
    assert recipe.identity() == "cb4c0585b01b3386"
    assert recipe.model_copy(update={"tokenizer_source": "union"}).identity() != "cb4c0585b01b3386"
