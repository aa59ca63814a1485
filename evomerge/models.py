"""Opening and checking the models a merge reads, whatever their reference: a folder, or a base with a LoRA adapter
folded in as its tensors are read; the checks every input passes before any compute."""

from __future__ import annotations

from evomerge.checkpoint import Checkpoint, open_folder
from evomerge.errors import SpecError
from evomerge.lora import open_adapted
from evomerge.refs import split_adapter_ref
from evomerge.vocab import is_vocab_tensor, load_tokenizer


def open_checkpoint(ref: str) -> Checkpoint:
    """Open a model reference; SpecError if it is missing, has no config or weights, or is corrupt. ``BASE+ADAPTER``
    opens the base with the LoRA adapter merged into its tensors as they are read
    (:func:`evomerge.lora.open_adapted`, which checks the adapter against the base first)."""
    parts = split_adapter_ref(ref)
    if parts is not None:
        return open_adapted(open_checkpoint(parts[0]), parts[1], ref)
    return open_folder(ref)


def check_loadable(ref: str, ckpt: Checkpoint) -> None:
    """What a search's worker loads with transformers (``AutoModelForCausalLM``, ``AutoTokenizer``) of its base:
    a config it can build as a causal language model and a tokenizer; checked before any compute, else the worker
    fails with a traceback once the run folder is written."""
    from transformers import AutoConfig  # transformers loads in seconds: only when a search's models are checked
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(ckpt.path)
    except Exception as err:  # noqa: BLE001 — transformers raises many kinds for a config it cannot build
        reason = (str(err).strip().splitlines() or [""])[0]
        raise SpecError(f"{ckpt.path / 'config.json'}: transformers cannot build this config "
                        f"({type(err).__name__}: {reason})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise SpecError(f"{ckpt.path / 'config.json'}: model_type {config.model_type!r} is not a causal language "
                        f"model transformers can load")
    load_tokenizer(ref, "to evaluate with")


def check_compatible(checkpoints: list[Checkpoint], *, aligned_vocab: bool = False) -> None:
    """Same tensor names and shapes, same vocabulary size, in every model; names the first offender. With
    ``aligned_vocab`` (a ``tokenizer_source`` lays every model out in one vocabulary, :mod:`evomerge.vocab`) the
    vocabularies may differ, and so may the row counts of the vocabulary tensors."""
    first = checkpoints[0]
    for other in checkpoints[1:]:
        if first.num_layers != other.num_layers:
            raise SpecError(f"block counts differ: {first.path} has {first.num_layers}, {other.path} has "
                            f"{other.num_layers}")
        if first.vocab_size != other.vocab_size and not aligned_vocab:
            raise SpecError(f"vocabulary sizes differ: {first.path} has {first.vocab_size}, {other.path} has "
                            f"{other.vocab_size}; a single-method recipe or search merges them with tokenizer_source "
                            "(base, union or a model)")
        missing = sorted(set(first.tensors) ^ set(other.tensors))
        if missing:
            owner = first.path if missing[0] in first.tensors else other.path
            raise SpecError(f"tensor {missing[0]} is in {owner} but not in the other of "
                            f"{first.path} and {other.path}")
        for name, info in first.tensors.items():
            skip = 1 if aligned_vocab and is_vocab_tensor(name) else 0  # the rows, one per token
            if info.shape[skip:] != other.tensors[name].shape[skip:]:
                raise SpecError(f"tensor {name} has shape {list(info.shape)} in {first.path} "
                                f"but {list(other.tensors[name].shape)} in {other.path}")
