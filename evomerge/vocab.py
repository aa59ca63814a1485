"""Merging models whose vocabularies differ (fine-tunes that appended tokens), as mergekit's ``tokenizer_source``.

The output vocabulary is one tokenizer's: the base's (``base``), a named model's (a model reference), or the
union of the merged models' tokenizers as mergekit builds it (``union``: the first model's tokenizer, the base's
when the merge reads one, then the normal tokens the others add, then their added tokens). Every
vocabulary-indexed tensor (embeddings, GPT-2's ``wte``, an untied head) of every merged model is laid out in the
output vocabulary before the merge, as mergekit's ``PermutedVocabulary`` does it:

- a model's own row where its tokenizer has the token;
- where it lacks the token, a default row, the same for every model lacking it: the row of the only model that
  has it; else the base's row (when the merge reads the base and the base has it); else the mean of the rows of
  the models that have it (summed in mergekit's model order, then divided); zeros when no model has it.

A model that lacks a token is not left out of that row's merge: it takes part with the default row (so with a
base, its task vector there is the default row minus the base's row, zero when the default is the base's).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from evomerge.checkpoint import Checkpoint, folder_names
from evomerge.errors import SpecError
from evomerge.files import regular_file
from evomerge.refs import resolve_model_path

if TYPE_CHECKING:
    from evomerge.recipes import Recipe

# names (after a dot, or whole) of the tensors whose rows are tokens: mergekit's ``vocabulary_axis: 0`` tensors
# of decoder-only architectures
VOCAB_TENSORS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight",
                 "embed_in.weight", "embed_out.weight", "lm_head.weight", "lm_head.bias")
# files that describe a tokenizer, copied with the reference model's other files and replaced by the output's
TOKENIZER_FILE = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt"
                            r"|chat_template\.(jinja|json)|.*\.(model|tiktoken))$")
BUILD = "to build the output vocabulary from"  # what plan_vocab loads tokenizers for
# the tokenizer files that hold a vocabulary: without one, transformers has nothing to build a tokenizer from
VOCAB_FILE = re.compile(r"^(tokenizer\.json|vocab\.(json|txt)|.*\.(model|tiktoken))$")


def is_vocab_tensor(name: str) -> bool:
    """Whether a tensor has one row per token (and so is laid out in the output vocabulary)."""
    return any(name == suffix or name.endswith("." + suffix) for suffix in VOCAB_TENSORS)


def source_model(source: str, base_model: str | None) -> str | None:
    """The model whose tokenizer ``tokenizer_source`` names (the base for ``base``); None for ``union``."""
    if source == "union":
        return None
    return base_model if source == "base" else source


@dataclass(frozen=True)
class VocabPlan:
    """The output tokenizer and, per model reference, which of its rows feeds each output row (-1: it lacks
    that token)."""

    tokenizer: Any  # a transformers tokenizer
    size: int
    rows: dict[str, torch.Tensor]


def plan_vocab(source: str, models: dict[str, Checkpoint], base_model: str | None) -> VocabPlan:
    """The output vocabulary of a merge of ``models`` (the union starts with the first one's tokenizer) and every
    model's rows for it, from the tokenizers alone. SpecError, before any compute, when a tokenizer is missing or
    names a row its model does not have (mergekit would fail there, or drop the token)."""
    tokenizers = {ref: load_tokenizer(ref, BUILD) for ref in models}
    for ref, ckpt in models.items():
        _check_rows(ref, ckpt, tokenizers[ref])
    named = source_model(source, base_model)
    if named is None:
        tokenizer = _union(list(tokenizers.values()))
    else:
        tokenizer = tokenizers[named] if named in tokenizers else _named_tokenizer(named)
    vocab = tokenizer.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise SpecError(f"tokenizer_source {source}: its token ids are not 0 to {len(vocab) - 1}")
    rows = {}
    for ref, own in tokenizers.items():
        own_vocab = own.get_vocab()
        index = torch.full((len(vocab),), -1, dtype=torch.long)
        for token, i in vocab.items():
            index[i] = own_vocab.get(token, -1)
        rows[ref] = index
    return VocabPlan(tokenizer, len(vocab), rows)


def _named_tokenizer(ref: str) -> Any:
    """The tokenizer of the model ``tokenizer_source`` names (not one of the merged models, so not opened yet)."""
    try:
        return load_tokenizer(ref, BUILD)
    except SpecError as err:
        raise SpecError(f"tokenizer_source: {err}") from None


def load_tokenizer(ref: str, purpose: str) -> Any:
    """The tokenizer of a model reference (a folder, Hub id or ``demo:`` model), wanted for ``purpose`` (words for
    the error line). SpecError of one line, before transformers is asked (whose messages mislead: a missing
    tokenizer.json reads "install sentencepiece"), when the folder holds no vocabulary file or a tokenizer file that
    is not a readable regular file; and when transformers cannot build it from them (a corrupt file)."""
    from transformers import AutoTokenizer

    folder = resolve_model_path(ref)
    files = [regular_file(folder / name) for name in folder_names(folder, ref) if TOKENIZER_FILE.match(name)]
    if not any(VOCAB_FILE.match(file.name) for file in files):
        raise SpecError(f"{ref}: no tokenizer {purpose} in {folder} (it has no tokenizer.json, vocab.json, "
                        f"vocab.txt, .model or .tiktoken file)")
    try:
        return AutoTokenizer.from_pretrained(folder, use_fast=True)
    except Exception as err:  # noqa: BLE001 — transformers raises many kinds for a broken tokenizer
        reason = (str(err).strip().splitlines() or [""])[0]
        raise SpecError(f"{ref}: its tokenizer in {folder}, wanted {purpose}, cannot be loaded "
                        f"({type(err).__name__}: {reason})") from None


def _check_rows(ref: str, ckpt: Checkpoint, tokenizer: Any) -> None:
    """Every vocabulary tensor has one row per token id the tokenizer may give."""
    counts = {ckpt.tensors[n].shape[0] for n in ckpt.tensors if is_vocab_tensor(n)}
    if len(counts) != 1:
        raise SpecError(f"{ref}: expected embedding tensors (names ending in {', '.join(VOCAB_TENSORS)}) with one "
                        f"row count, found row counts {sorted(counts)}")
    rows = counts.pop()
    token, top = max(tokenizer.get_vocab().items(), key=lambda item: item[1])
    if top >= rows:
        raise SpecError(f"{ref}: its tokenizer gives id {top} ({token!r}) but its embeddings have {rows} rows")


def _union(tokenizers: list[Any]) -> Any:
    """mergekit's ``build_union_tokenizer``: the first tokenizer (a reloaded copy), then every normal token of the
    others it lacks, then every added token (the first settings seen win). Normal tokens come in id order, where
    mergekit takes the tokenizer library's hash order."""
    from transformers import AutoTokenizer

    normal: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tokenizer in tokenizers:
        vocab = tokenizer.get_vocab()
        normal.update(dict.fromkeys(sorted(vocab, key=vocab.__getitem__)))
        for info in tokenizer.added_tokens_decoder.values():
            added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as folder:
        tokenizers[0].save_pretrained(folder)
        union = AutoTokenizer.from_pretrained(folder, use_fast=True)
    first = tokenizers[0].get_vocab()
    for token in normal:
        if token not in added and token not in first:
            union.add_tokens(token)
    for info in added.values():
        union.add_tokens(info)
    return union


def align_inputs(plan: VocabPlan, part: Recipe, base: torch.Tensor | None,
                 inputs: list[torch.Tensor]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """One vocabulary tensor of a merge (the base's copy when it is read, then one per ``part.inputs``) laid out in
    the output vocabulary by the rule of the module docstring, in float32 (float64 stays float64)."""
    tensors = dict(zip((m.model for m in part.inputs), inputs, strict=True))
    if base is not None:
        tensors[part.base_model] = base
    order = dict.fromkeys([*(m.model for m in part.models if m.model in tensors), *tensors])  # mergekit's order
    aligned = _align(plan, {ref: tensors[ref] for ref in order}, part.base_model if base is not None else None)
    return (aligned[part.base_model] if base is not None else None), [aligned[m.model] for m in part.inputs]


def _align(plan: VocabPlan, tensors: dict[str, torch.Tensor], base: str | None) -> dict[str, torch.Tensor]:
    first = next(iter(tensors.values()))
    work = torch.float64 if first.dtype == torch.float64 else torch.float32
    refs = list(tensors)
    index = torch.stack([plan.rows[ref] for ref in refs]).to(first.device)
    has = index >= 0
    out = {}
    for ref, rows, own in zip(refs, index, has, strict=True):
        tensor = tensors[ref]
        out[ref] = torch.zeros((plan.size, *tensor.shape[1:]), dtype=work, device=tensor.device)
        out[ref][own] = tensor[rows[own]].to(work)
    lacking = (~has).any(0).nonzero().flatten()  # output rows some model lacks
    if not len(lacking):
        return out
    # the mean of the rows present (one row: that row exactly; none: zeros), the base's row where it has one
    default = torch.zeros((len(lacking), *first.shape[1:]), dtype=work, device=first.device)
    for ref, present in zip(refs, has[:, lacking], strict=True):
        default[present] += out[ref][lacking[present]]
    count = has[:, lacking].sum(0).clamp(min=1).to(work)
    default /= count.view(-1, *[1] * (default.dim() - 1))
    if base is not None:
        from_base = has[refs.index(base), lacking]
        default[from_base] = out[base][lacking[from_base]]
    for ref, present in zip(refs, has[:, lacking], strict=True):
        out[ref][lacking[~present]] = default[~present]
    return out


def write_vocab(plan: VocabPlan, folder: Path) -> None:
    """Put the output tokenizer in place of the tokenizer files copied from the reference model, and make
    config.json's vocab_size the number of rows written."""
    for item in folder.iterdir():
        if item.is_file() and TOKENIZER_FILE.match(item.name):
            item.unlink()
    plan.tokenizer.save_pretrained(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config.get("text_config", config)["vocab_size"] = plan.size
    config_file.write_text(json.dumps(config, indent=2) + "\n")
