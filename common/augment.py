"""Task data augmentation by word replacement (TinyBERT's, simplified): rewritten copies of the training sentences,
labelled by the teacher (stage 2: AUGMENT_COPIES).

Each copy replaces every candidate word, with probability `prob`, by one of its `neighbours` nearest words.
- Words: token ids, not text. A WordPiece word is a token and the `##` pieces that follow it; only single-token
  words are candidates, and only when the token is all letters (no `##` piece, no special token, no punctuation or
  number). A replacement is a candidate token too, so the sentence keeps its length and needs no re-tokenization:
  the simpler of the two levels, and it never changes what the tokenizer would split.
- Neighbours: cosine similarity between the TEACHER's own input word embeddings (a candidate is never its own
  neighbour), because neither a masked-LM head nor GloVe is available offline. `neighbour_table` builds the table
  once, in chunks of rows (MiniLM: 30,522 x 384, 22,501 candidates: 4.8 s on one CPU thread). Nearest in the
  embeddings is not same in sentiment ("good" -> "bad", "boring" -> "exciting"): the teacher's labels see to that.
- Seeded: a numpy Generator from `AugmentSettings.seed`; the same seed, settings and data give the same rows.
  The original sentences stay in the training set; a copy identical to its original or to an earlier copy of it
  is dropped.
- Labels: the copies carry no label of their own. `with_word_replacements` gives them the teacher's logits as soft
  targets and the teacher's argmax as the hard label of the cross-entropy term, cached on disk under a key made of
  the data and these settings (`common.distillation.with_teacher_labels`).
"""

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.data import Encoded
from common.distillation import with_teacher_labels

NEIGHBOUR_SOURCE = "teacher input word embeddings (cosine, whole-word tokens)"


@dataclass(frozen=True)
class AugmentSettings:
    copies: int  # rewritten copies of each training sentence (before duplicates are dropped)
    prob: float  # chance that each candidate word is replaced
    neighbours: int  # a replacement is one of this many nearest candidate words
    seed: int  # the numpy Generator's seed


@dataclass
class NeighbourTable:
    neighbours: np.ndarray  # [vocab, k] token ids, nearest first; -1 in the rows of tokens that are not candidates
    candidate: np.ndarray  # bool [vocab]: whole-word tokens that may be replaced (and may replace)
    piece: np.ndarray  # bool [vocab]: `##` continuation pieces


def neighbour_table(embeddings: torch.Tensor, tokenizer, k: int, chunk: int = 1024) -> NeighbourTable:
    """The `k` nearest candidate tokens of every candidate token by cosine similarity of `embeddings` (the word
    embedding matrix, one row per token id), computed `chunk` rows at a time."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if embeddings.shape[0] < len(tokens):
        raise ValueError(f"{embeddings.shape[0]} embedding rows for a vocabulary of {len(tokens)} tokens")
    special = set(tokenizer.all_special_ids)
    candidate = np.array([token.isalpha() and i not in special for i, token in enumerate(tokens)])
    piece = np.array([token.startswith("##") for token in tokens])
    ids = np.flatnonzero(candidate)
    if k >= len(ids):
        raise ValueError(f"{k} neighbours asked for, but the vocabulary has only {len(ids)} whole-word tokens")
    vectors = F.normalize(embeddings.detach()[torch.from_numpy(ids)].float(), dim=-1)
    table = np.full((len(tokens), k), -1, dtype=np.int64)
    with torch.no_grad():
        for start in range(0, len(ids), chunk):
            sims = vectors[start:start + chunk] @ vectors.T
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + start] = -float("inf")  # a word is not its own neighbour
            table[ids[start:start + chunk]] = ids[sims.topk(k, dim=-1).indices.numpy()]
    return NeighbourTable(table, candidate, piece)


def replace_words(ids, table: NeighbourTable, prob: float, rng: np.random.Generator) -> list:
    """A copy of `ids` with each single-token candidate word replaced, with probability `prob`, by one of its
    neighbours (uniformly)."""
    ids = np.asarray(ids, dtype=np.int64)
    before_piece = np.append(table.piece[ids[1:]], False)  # the word goes on with a `##` piece: not a candidate
    slots = np.flatnonzero(table.candidate[ids] & ~before_piece)
    hit = slots[rng.random(len(slots)) < prob]
    out = ids.copy()
    out[hit] = table.neighbours[ids[hit], rng.integers(table.neighbours.shape[1], size=len(hit))]
    return out.tolist()


def augmented_copies(encoded: Encoded, table: NeighbourTable, settings: AugmentSettings) -> Encoded:
    """`settings.copies` rewritten copies of every row of `encoded` (rows in order, copies of a row together), less
    those identical to their original or to an earlier copy of it. Labels are 0 placeholders: the caller labels
    the rows with the teacher."""
    rng = np.random.default_rng(settings.seed)
    out = []
    for ids in encoded.input_ids:
        seen = {tuple(ids)}
        for _ in range(settings.copies):
            new = replace_words(ids, table, settings.prob, rng)
            if tuple(new) not in seen:
                seen.add(tuple(new))
                out.append(new)
    return Encoded(input_ids=out, labels=torch.zeros(len(out), dtype=torch.long))


def with_word_replacements(data: dict, logits, teacher, tokenizer, teacher_folder, cache_dir,
                           settings: AugmentSettings) -> tuple:
    """(training set + its word-replaced copies, the teacher logits of both, what was done as a dict for
    metadata.json). `data` is `encoded_splits(...)`, `logits` the teacher's on `data["train"]`, `teacher` the model
    in `teacher_folder` (its word embeddings give the neighbours)."""
    table = neighbour_table(teacher.get_input_embeddings().weight, tokenizer, settings.neighbours)
    extra = augmented_copies(data["train"], table, settings)
    train, logits = with_teacher_labels(data, logits, extra, teacher_folder, cache_dir,
                                        {"augment": "word_replacement", **asdict(settings)}, "word-replaced copies")
    info = {**asdict(settings), "rows": len(extra), "neighbour_source": NEIGHBOUR_SOURCE,
            "candidate_tokens": int(table.candidate.sum()), "labels": "teacher soft targets, teacher argmax as label"}
    return train, logits, info
