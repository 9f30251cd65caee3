"""SST-2: preparing it on disk, reading it back, tokenizing, and length-grouped batches.

On disk (written by download_model.py into data/sst2/):
  train.tsv, validation.tsv   GLUE format, header `sentence<TAB>label`, labels 0/1, no quoting
  manifest.json               row counts, label balance, source, sha256 of each file

Splits used by every stage:
  train       train.tsv minus the held-out slice (what models learn from)
  heldout     a fixed, seeded slice of train.tsv (HELDOUT_FRACTION, 2%) for model selection
  validation  GLUE dev, 872 sentences: for reported numbers only, never for choosing a checkpoint
"""

import codecs
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from common.paths import sst2_dir

HELDOUT_FRACTION = 0.02
HELDOUT_SEED = 0  # the held-out slice is the same whatever a stage's training seed
MAX_LENGTH = 128
SPLIT_FILES = {"train": "train.tsv", "validation": "validation.tsv"}
MANIFEST = "manifest.json"
MAX_FIELD_CHARS = 100_000  # per line: SST-2 sentences are under 300 characters; longer reviews still fit


class DataError(ValueError):
    """Missing or malformed data; the message names the file (and line) and what to do."""


def read_glue_tsv(path) -> list:
    """Rows (sentence, label) of a GLUE-format TSV, validated line by line.

    UTF-8, with or without a byte-order mark; LF or CRLF line ends, or CR alone in a file with no LF (old Mac);
    no quoting (a quote is plain text). A UTF-16 file, bytes that are not UTF-8 and a field over MAX_FIELD_CHARS
    are refused, each in one line naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a GLUE-format TSV with header 'sentence<TAB>label')")
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path}, line 1: the file is UTF-16 (it starts with a UTF-16 byte-order mark): "
                        f"save it as UTF-8")
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    lines = raw.split(b"\n" if b"\n" in raw else b"\r")  # no LF at all: CR-only line ends (old Mac)
    rows = []
    for lineno, line in enumerate(lines, start=1):
        text = _decode_line(path, lineno, line[:-1] if line.endswith(b"\r") else line)
        if lineno == 1:
            if not text:
                raise DataError(f"{path}: the file is empty (expected header 'sentence<TAB>label' and rows)")
            if text.split("\t") != ["sentence", "label"]:
                shown = repr(text) if len(text) <= 60 else f"{text[:60]!r}... ({len(text):,} characters)"
                raise DataError(f"{path}, line 1: header is {shown}, expected 'sentence<TAB>label'")
            continue
        if not text:
            continue
        fields = text.split("\t")
        if len(fields) != 2:
            raise DataError(
                f"{path}, line {lineno}: expected 2 tab-separated fields (sentence, label), got {len(fields)}"
            )
        sentence, label = fields
        if label not in ("0", "1"):
            raise DataError(f"{path}, line {lineno}: label {label[:20]!r} is not 0 or 1")
        if not sentence.strip():
            raise DataError(f"{path}, line {lineno}: empty sentence")
        rows.append((sentence, int(label)))
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    return rows


def _decode_line(path, lineno: int, line: bytes) -> str:
    if b"\x00" in line:
        raise DataError(f"{path}, line {lineno}: NUL bytes, so not UTF-8 text (UTF-16 without a byte-order mark, "
                        f"or a binary file?): save it as UTF-8")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}, line {lineno}: byte {line[err.start]:#04x} at column {err.start + 1} is not "
                        f"UTF-8: save the file as UTF-8") from None
    if len(text) > MAX_FIELD_CHARS:
        raise DataError(f"{path}, line {lineno}: {len(text):,} characters, more than the {MAX_FIELD_CHARS:,} a "
                        f"sentence<TAB>label line may have (is it one line of a GLUE-format TSV?)")
    return text


def write_glue_tsv(path, rows) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("sentence\tlabel\n")
        for sentence, label in rows:
            if "\t" in sentence or "\n" in sentence:
                raise DataError(f"sentence contains a tab or newline and cannot be written as TSV: {sentence!r}")
            f.write(f"{sentence}\t{label}\n")


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_for(folder, source: str) -> dict:
    manifest = {"name": "sst2", "source": source, "splits": {}}
    for split, name in SPLIT_FILES.items():
        rows = read_glue_tsv(Path(folder) / name)
        positives = sum(label for _, label in rows)
        manifest["splits"][split] = {
            "file": name,
            "rows": len(rows),
            "negative": len(rows) - positives,
            "positive": positives,
            "sha256": sha256_file(Path(folder) / name),
        }
    return manifest


def rows_from_glue_dir(folder) -> dict:
    """train/validation rows from a GLUE-format folder (train.tsv, dev.tsv), as SST2_DIR points to."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"SST2_DIR={folder} is not a folder; point it at a GLUE SST-2 folder with train.tsv and dev.tsv")
    return {"train": read_glue_tsv(folder / "train.tsv"), "validation": read_glue_tsv(folder / "dev.tsv")}


def rows_from_hub() -> dict:
    """GLUE sst2 from the Hugging Face Hub (needs network)."""
    from datasets import load_dataset  # in the body: slow to import, only needed here

    dataset = load_dataset("glue", "sst2")
    out = {}
    for split in ("train", "validation"):
        out[split] = [(s.strip(), int(l)) for s, l in zip(dataset[split]["sentence"], dataset[split]["label"])]
    return out


def check_prepared(folder=None) -> dict:
    """The manifest of the prepared data, after checking the files still match it."""
    folder = Path(folder) if folder else sst2_dir()
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"no prepared SST-2 at {folder}: run `python download_model.py` first")
    manifest = json.loads(manifest_path.read_text())
    for split, info in manifest["splits"].items():
        path = folder / info["file"]
        if not path.is_file() or sha256_file(path) != info["sha256"]:
            raise DataError(
                f"{path} is missing or changed since download_model.py wrote it (checksum mismatch): "
                f"run `python download_model.py` again"
            )
    return manifest


def data_sha256(manifest: dict) -> str:
    """The fingerprint of a prepared dataset: sha256 over its splits' file checksums (from the manifest).
    Stages record it in metadata.json ("data_sha256"), so a model built from other data is seen as stale."""
    checksums = {split: info["sha256"] for split, info in manifest["splits"].items()}
    return hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()


def current_data_sha256(folder=None):
    """data_sha256 of the prepared data as its manifest describes it now; None when there is none (cheap: the
    files themselves are checked against the manifest by `check_prepared` whenever a stage reads them)."""
    folder = Path(folder) if folder else sst2_dir()
    try:
        return data_sha256(json.loads((folder / MANIFEST).read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def load_sst2_splits(heldout_fraction: float = HELDOUT_FRACTION, seed: int = HELDOUT_SEED,
                     train_limit: int = None, folder=None) -> dict:
    """{"train", "heldout", "validation"}: lists of (sentence, label).

    The held-out slice is a fixed seeded sample of train.tsv; `train_limit` (quick runs) keeps a seeded
    sample of the remaining training rows.
    """
    folder = Path(folder) if folder else sst2_dir()
    check_prepared(folder)
    train = read_glue_tsv(folder / SPLIT_FILES["train"])
    validation = read_glue_tsv(folder / SPLIT_FILES["validation"])
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_heldout = max(1, round(len(train) * heldout_fraction))
    heldout = [train[i] for i in sorted(order[:n_heldout])]
    rest = sorted(order[n_heldout:])
    if train_limit and train_limit < len(rest):
        rest = sorted(random.Random(seed + 1).sample(rest, train_limit))
    return {"train": [train[i] for i in rest], "heldout": heldout, "validation": validation}


@dataclass
class Encoded(Dataset):
    """Tokenized rows: input_ids (unpadded lists) and labels."""

    input_ids: list
    labels: torch.Tensor

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return i

    @property
    def lengths(self):
        return [len(ids) for ids in self.input_ids]


def encode(tokenizer, rows, max_length: int = MAX_LENGTH) -> Encoded:
    sentences = [s for s, _ in rows]
    ids = tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]
    return Encoded(input_ids=ids, labels=torch.tensor([l for _, l in rows], dtype=torch.long))


def concatenated_pairs(encoded: Encoded, n: int, seed: int, max_length: int = MAX_LENGTH,
                       min_tokens: int = 5) -> Encoded:
    """`n` longer inputs, each two training rows joined end to end (token level: the first row's ids without its
    closing special token, then the second's without its opening one), truncated to `max_length` with the closing
    token kept. Both rows are drawn (seeded, with replacement) from the rows with at least `min_tokens` tokens between
    the special ones, so single words are not glued on. The labels are 0 placeholders: the caller labels the inputs
    with the teacher (stage 8: AUGMENT_PAIRS)."""
    pool = [i for i, ids in enumerate(encoded.input_ids) if len(ids) - 2 >= min_tokens]
    if n > 0 and not pool:
        raise DataError(f"no training row has {min_tokens} or more tokens to build joined pairs from: set "
                        f"AUGMENT_PAIRS=0, or train on longer sentences")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        first, second = (encoded.input_ids[rng.choice(pool)] for _ in range(2))
        ids = first[:-1] + second[1:]
        out.append(ids if len(ids) <= max_length else ids[:max_length - 1] + ids[-1:])
    return Encoded(input_ids=out, labels=torch.zeros(len(out), dtype=torch.long))


def joined(first: Encoded, second: Encoded) -> Encoded:
    """The rows of `first` then those of `second` (row i of `second` becomes row len(first) + i)."""
    return Encoded(input_ids=list(first.input_ids) + list(second.input_ids),
                   labels=torch.cat([first.labels, second.labels]))


class LengthGroupedSampler(Sampler):
    """Batches of similar length (less padding); shuffled per epoch when `shuffle`, sorted otherwise.

    Shuffling: random order, cut into chunks of 50 batches, each chunk sorted by length and cut into
    batches, then the batches shuffled. Deterministic for a given seed and epoch.
    """

    def __init__(self, lengths, batch_size: int, shuffle: bool, seed: int = 0):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self):
        n = len(self.lengths)
        if not self.shuffle:
            order = sorted(range(n), key=lambda i: self.lengths[i])
            return [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        rng = random.Random(self.seed * 1000 + self.epoch)
        order = list(range(n))
        rng.shuffle(order)
        chunk = self.batch_size * 50
        batches = []
        for start in range(0, n, chunk):
            part = sorted(order[start:start + chunk], key=lambda i: self.lengths[i])
            batches += [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        yield from self._batches()
        self.epoch += 1

    def __len__(self):
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size


def collate(encoded: Encoded, indices, pad_id: int = 0) -> dict:
    width = max(len(encoded.input_ids[i]) for i in indices)
    input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        ids = encoded.input_ids[i]
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
    idx = torch.tensor(indices, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": encoded.labels[idx], "idx": idx}


class _Collator:
    def __init__(self, encoded, pad_id):
        self.encoded, self.pad_id = encoded, pad_id

    def __call__(self, indices):
        return collate(self.encoded, indices, self.pad_id)


def make_loader(encoded: Encoded, batch_size: int, shuffle: bool = False, seed: int = 0,
                pad_id: int = 0) -> DataLoader:
    sampler = LengthGroupedSampler(encoded.lengths, batch_size, shuffle, seed)
    return DataLoader(encoded, batch_sampler=sampler, collate_fn=_Collator(encoded, pad_id))


def model_inputs(batch: dict) -> dict:
    """What a BERT or DistilBERT classifier takes (single sentences: no token_type_ids)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def encoded_splits(tokenizer, train_limit: int = 0, max_length: int = MAX_LENGTH, folder=None) -> dict:
    """load_sst2_splits + encode: {"train", "heldout", "validation"} as Encoded, plus the tokenization
    settings under "tokenization" (part of every cache key)."""
    splits = load_sst2_splits(train_limit=train_limit or None, folder=folder)
    out = {name: encode(tokenizer, rows, max_length) for name, rows in splits.items()}
    out["tokenization"] = {"tokenizer": type(tokenizer).__name__, "vocab_size": len(tokenizer),
                           "max_length": max_length, "train_limit": train_limit or None}
    return out


def split_loaders(data: dict, batch_size: int, seed: int, pad_id: int, eval_batch_size: int = 128) -> dict:
    """Loaders for the splits of `encoded_splits`: shuffled length-grouped train batches, sorted eval ones."""
    return {
        "train": make_loader(data["train"], batch_size, shuffle=True, seed=seed, pad_id=pad_id),
        "heldout": make_loader(data["heldout"], eval_batch_size, pad_id=pad_id),
        "validation": make_loader(data["validation"], eval_batch_size, pad_id=pad_id),
    }
