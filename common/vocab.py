"""The vocabulary of a classifier and its tokenizer: pruned to what a task uses, and checked in a saved folder.

The word embeddings are most of a small student (MiniLM: 11.7M of 17.4M parameters) and survive head / FFN pruning;
SST-2's training text uses ~11.6k of BERT's 30,522 ids. `select_vocabulary` keeps ORIGINAL ids, ascending (new id =
position: the original order stays, BERT's [PAD] stays 0), each counted under the first reason that applies:
  special    every special or added token
  character  every one-character WordPiece piece `c` and its continuation `##c`: with all of them kept, greedy
             longest-match WordPiece spells any word it could spell before out of kept pieces, never as [UNK]
  training   every id the training text uses
  extra      the `extra` lowest remaining ids (BERT lists whole words roughly by frequency after its characters),
             bracketed placeholders such as BERT's 994 `[unused0]`... skipped (the pre-tokenizer splits "[" off)
Only the word-embedding rows and the token ids change, so on input made of kept tokens the pruned model gives exactly
the full model's logits, and every loader (plain, pruned, 4-bit, ONNX export) sizes the embeddings from the config.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from common.modeling_dpq import family_of, word_embedding_name
from common.stage import StageError, writer_script

REASONS = ("special", "character", "training", "extra")  # why an id is kept, in order of precedence


class VocabularyError(StageError):
    """A folder whose config, tokenizer and embeddings disagree on the vocabulary: one line, the folder, its script."""


@dataclass(frozen=True)
class VocabSelection:
    original_size: int
    extra: int  # how many extra ids were asked for
    ids: dict  # reason -> ascending original ids kept for that reason (disjoint)

    @property
    def kept(self) -> list:
        """Every kept original id, ascending (for prune_vocabulary, write_pruned_tokenizer and kept_units.json)."""
        return sorted(i for ids in self.ids.values() for i in ids)

    def record(self) -> dict:
        """JSON-able summary for metadata.json."""
        return {"original_size": self.original_size, "kept_size": len(self.kept), "extra_requested": self.extra,
                "kept_by_reason": {reason: len(self.ids[reason]) for reason in REASONS}}


def special_ids(tokenizer) -> set:
    return set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)


def select_vocabulary(tokenizer, train_ids, extra: int) -> VocabSelection:
    """What to keep of `tokenizer`'s vocabulary for a task whose training text has the token ids `train_ids` (an
    iterable of id lists, e.g. `data["train"].input_ids`); deterministic."""
    size = len(tokenizer)
    if not isinstance(extra, int) or extra < 0:
        raise ValueError(f"extra={extra!r}: expected a count >= 0")
    prefix = getattr(tokenizer.backend_tokenizer.model, "continuing_subword_prefix", "##")
    candidates = {"special": special_ids(tokenizer),
                  "character": {i for token, i in tokenizer.get_vocab().items()
                                if len(token) == 1 or (token.startswith(prefix) and len(token) == len(prefix) + 1)},
                  "training": set()}
    for row in train_ids:
        candidates["training"].update(map(int, row))
    outside = sorted(i for i in candidates["training"] if not 0 <= i < size)
    if outside:
        raise ValueError(f"training ids {outside[:5]} are outside the tokenizer's vocabulary of {size}")
    ids, taken = {}, set()
    for reason, wanted in candidates.items():
        ids[reason] = sorted(wanted - taken)
        taken |= wanted
    placeholders = {i for token, i in tokenizer.get_vocab().items() if len(token) > 2 and token[0] + token[-1] == "[]"}
    ids["extra"] = [i for i in range(size) if i not in taken and i not in placeholders][:extra]
    return VocabSelection(size, extra, ids)


def _checked(kept, size: int, required) -> dict:
    """{original id: new id} for an ascending keep list within range that holds every required (special) id."""
    kept = [int(i) for i in kept]
    if any(b <= a for a, b in zip(kept, kept[1:])):
        raise ValueError("the keep list must be ascending without duplicates (new id = position: the order stays)")
    if kept and not (0 <= kept[0] and kept[-1] < size):
        raise ValueError(f"the keep list holds ids outside 0..{size - 1}")
    missing = sorted(set(required) - set(kept))
    if missing:
        raise ValueError(f"the keep list misses the special token ids {missing}")
    return {old: new for new, old in enumerate(kept)}


def _config_token_ids(config: dict) -> dict:
    """{key: id} of the token ids (pad_token_id, bos_token_id, ...) a config dict sets."""
    return {key: value for key, value in config.items() if key.endswith("_token_id") and value is not None}


def prune_vocabulary(model, tokenizer, kept) -> None:
    """Keep only the word-embedding rows `kept` (original ids, ascending) of a BERT / DistilBERT / RoBERTa classifier
    whose tokenizer is `tokenizer`, in place: `config.vocab_size` and the config's token ids follow the new numbering.
    Before any 4-bit quantization."""
    name = word_embedding_name(model)
    embedding = model.get_submodule(name)
    if type(embedding) is not nn.Embedding:
        raise ValueError(f"{name} is a {type(embedding).__name__}: prune the vocabulary before quantizing")
    size = embedding.num_embeddings
    if len(tokenizer) != size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model's {name} {size} rows")
    config_ids = _config_token_ids(model.config.to_dict())
    required = special_ids(tokenizer) | set(config_ids.values()) | {embedding.padding_idx} - {None}
    new = _checked(kept, size, required)
    positions = getattr(model.get_submodule(name.rpartition(".")[0]), "position_embeddings", None)
    pad = model.config.pad_token_id
    if getattr(positions, "padding_idx", None) is not None and pad is not None and new[pad] != pad:
        raise ValueError(f"this model numbers positions from pad_token_id ({pad}, RoBERTa): keep every id below it")
    index = torch.tensor(sorted(new), dtype=torch.long, device=embedding.weight.device)
    with torch.no_grad():
        weight = embedding.weight.index_select(0, index).clone()
    embedding.weight = nn.Parameter(weight, requires_grad=embedding.weight.requires_grad)
    embedding.num_embeddings = len(new)
    if embedding.padding_idx is not None:
        embedding.padding_idx = new[embedding.padding_idx]
    model.config.vocab_size = len(new)
    for key, value in config_ids.items():
        setattr(model.config, key, new[value])


def _map_special_ids(data: dict, fn) -> None:
    """Replace every special id of a tokenizer.json by `fn(id)`, in place: `added_tokens`, `padding.pad_id` and the
    post-processor's (TemplateProcessing `special_tokens`, Bert/RobertaProcessing `sep` / `cls`, inside a Sequence)."""
    for token in data.get("added_tokens") or []:
        token["id"] = fn(token["id"])
    if data.get("padding"):
        data["padding"]["pad_id"] = fn(data["padding"]["pad_id"])
    processors = [data.get("post_processor") or {"type": "ByteLevel"}]
    while processors:
        processor = processors.pop()
        kind = processor.get("type")
        if kind == "Sequence":
            processors += processor["processors"]
        elif kind == "TemplateProcessing":
            for entry in processor["special_tokens"].values():
                entry["ids"] = [fn(i) for i in entry["ids"]]
        elif kind in ("BertProcessing", "RobertaProcessing"):
            processor["sep"], processor["cls"] = [[t, fn(i)] for t, i in (processor["sep"], processor["cls"])]
        elif kind != "ByteLevel":
            raise ValueError(f"a {kind} post-processor in tokenizer.json: its special ids are unknown here")


def write_pruned_tokenizer(tokenizer, kept, folder):
    """Save `tokenizer` restricted to `kept` (original ids, ascending; new id = position) into `folder` and return
    it loaded from there (`AutoTokenizer`). WordPiece tokenizers only; normalizer, pre-tokenizer, decoder unchanged."""
    from transformers import AutoTokenizer  # in the body: slow to import, only needed here

    folder = Path(folder)
    new = _checked(kept, len(tokenizer), special_ids(tokenizer))
    tokenizer.save_pretrained(str(folder))
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    if data["model"].get("type") != "WordPiece":
        raise ValueError(f"{data['model'].get('type')} tokenizer: only WordPiece vocabularies are pruned")
    vocab = sorted((new[i], token) for token, i in data["model"]["vocab"].items() if i in new)
    data["model"]["vocab"] = {token: i for i, token in vocab}
    _map_special_ids(data, new.__getitem__)
    (folder / "tokenizer.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if (folder / "vocab.txt").is_file():
        (folder / "vocab.txt").write_text("".join(token + "\n" for _, token in vocab), encoding="utf-8")
    pruned = AutoTokenizer.from_pretrained(str(folder))
    if len(pruned) != len(new):
        raise ValueError(f"{folder}: the rewritten tokenizer has {len(pruned)} tokens, expected {len(new)}")
    return pruned


def _tokenizer_size(folder: Path) -> tuple:
    """(size, special ids) of the tokenizer.json of a folder whose ids are exactly 0..size-1, with vocab.txt (if any)
    listing the same tokens in id order."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    by_id, specials = {}, set()
    added = [(token["content"], token["id"]) for token in data.get("added_tokens") or []]
    for token, i in [*data["model"]["vocab"].items(), *added]:
        if not isinstance(i, int) or i < 0 or by_id.setdefault(i, token) != token:
            raise ValueError(f"tokenizer.json gives id {i!r} to {token!r} and to {by_id.get(i)!r}")
    if set(by_id) != set(range(len(by_id))):
        raise ValueError(f"the tokenizer's {len(by_id)} ids are not 0..{len(by_id) - 1} (max {max(by_id)})")
    if (folder / "vocab.txt").is_file():
        with open(folder / "vocab.txt", encoding="utf-8") as f:  # as transformers reads it: split at "\n" only
            lines = [line.rstrip("\n") for line in f]
        if lines != [by_id[i] for i in range(len(by_id))]:
            raise ValueError(f"vocab.txt ({len(lines)} lines) disagrees with tokenizer.json ({len(by_id)} tokens)")
    _map_special_ids(data, lambda i: specials.add(i) or i)
    return len(by_id), specials


def _embedding_rows(folder: Path, key: str) -> int:
    """Rows of the word-embedding matrix `key` in the safetensors header (bnb 4-bit: the shape in its quant state)."""
    for path in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(path), "pt") as f:
            if key in f.keys():
                packed = [k for k in f.keys() if k.startswith(key + ".quant_state.")]
                if packed:  # 4-bit codes are packed; bnb stores the original shape as JSON bytes
                    return json.loads(bytes(f.get_tensor(packed[0]).tolist()).decode("utf-8"))["shape"][0]
                return f.get_slice(key).get_shape()[0]
    raise KeyError(f"no {key} in model*.safetensors")


def _check_vocabulary(folder: Path) -> int:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    size = config.get("vocab_size")
    tokenizer_size, specials = _tokenizer_size(folder)
    if tokenizer_size != size:
        raise ValueError(f"config.json says vocab_size {size}, the tokenizer has {tokenizer_size} tokens")
    key = family_of(config).word_embeddings + ".weight"
    rows = _embedding_rows(folder, key)
    if rows != size:
        raise ValueError(f"config.json says vocab_size {size}, the weights hold {rows} rows of {key}")
    ids = _config_token_ids(config)
    ids.update({f"tokenizer.json special id {i}": i for i in specials})
    outside = {key: value for key, value in ids.items() if not (isinstance(value, int) and 0 <= value < size)}
    if outside:
        raise ValueError(f"special token ids outside the vocabulary of {size}: {outside}")
    return size


def check_vocabulary(folder) -> int:
    """The vocabulary size of a saved folder, once config.json, the tokenizer (tokenizer.json, vocab.txt) and the
    word-embedding rows of the weights agree and every special token id is below it; reads no weights. Raises
    VocabularyError (one line: the folder, what is wrong, the script that writes it) otherwise."""
    folder = Path(folder)
    try:
        return _check_vocabulary(folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as err:
        text = " ".join(str(err).split())[:300]
        script = writer_script(folder)
        fix = f"it is written by `python {script}`; run it again" if ".py" in script else "rebuild or remove it"
        raise VocabularyError(f"{folder} has an inconsistent vocabulary ({type(err).__name__}: {text}): "
                              f"{fix}") from None
