"""Accuracy by sentence length: the validation sentences in four buckets at the quartiles of their word counts,
each model's accuracy per bucket, and pruned models paired against their student within each bucket.

Why: SST-2 validation holds full sentences (median 19 words) while the training set is mostly short phrases
(median 7 words); pruning costs accuracy mostly on the longest sentences, which one overall accuracy hides.

- `word_counts`: words per sentence, `len(sentence.split())` (whitespace words, not tokens: the same for every
  tokenizer, and what a reader counts);
- `quartile_edges`: the three nearest-rank quartiles of the word counts (word counts that occur in the data);
- `bucket_members`: sentence indices per bucket; a sentence goes to the first bucket whose upper edge it does
  not exceed, so sentences of equal length always share a bucket (buckets differ in size where lengths tie at an
  edge, and one can be empty);
- `bucket_accuracies`, `bucket_differences`: accuracy in points per bucket; a paired difference per bucket through
  common.stats.paired_comparison on that bucket's sentences only;
- `by_length`: the `by_length` entry of final_report.json.
"""

from bisect import bisect_left

from common.report.measure import from_bits
from common.stats import paired_comparison

BUCKET_NAMES = ("Q1", "Q2", "Q3", "Q4")  # shortest to longest
PAIRED_KEYS = ("n", "diff_points", "ci_low_points", "ci_high_points", "only_a_right", "only_b_right", "mcnemar_p",
               "significant")
LENGTH_CONVENTION = (
    "Validation sentences in 4 buckets by WORD count (whitespace-split words, not tokens): edges_words are the "
    "nearest-rank quartiles of the word counts (the word count of the sentence at rank ceil(k n / 4), k = 1, 2, 3, "
    "sorted ascending); a sentence goes to the first bucket whose edge it does not exceed (Q4: above the third "
    "edge), so equal lengths share a bucket and bucket sizes can differ. words: the shortest and longest sentence "
    "in the bucket. accuracy_points: the PyTorch model's accuracy in points on the bucket's sentences (null for an "
    "empty bucket). vs_student / frontier_rows[].vs_student: the model paired against the student of its precision "
    "on the bucket's sentences only (common.stats.paired_comparison: difference a - b in points, 95% paired-bootstrap "
    "interval over the sentences within the bucket, seeded as the rest of the report, exact McNemar p): "
    "sentence-sampling uncertainty, not seed spread. frontier_rows: one per frontier row; accuracy_points_mean is "
    "the mean over its training seeds (members), vs_student is its first member (seed SEED).")


def word_counts(sentences) -> list:
    """Whitespace-separated words in each sentence."""
    return [len(sentence.split()) for sentence in sentences]


def quartile_edges(counts) -> list:
    """[q1, q2, q3]: nearest-rank quartiles, the count at rank ceil(k n / 4) of the sorted counts (integer maths)."""
    if not counts:
        raise ValueError("quartile_edges needs at least one sentence")
    ordered = sorted(counts)
    n = len(ordered)
    return [ordered[-(-k * n // 4) - 1] for k in (1, 2, 3)]


def bucket_members(counts, edges) -> list:
    """Sentence indices per bucket (4 lists): bucket = how many edges lie strictly below the sentence's count."""
    members = [[] for _ in range(len(edges) + 1)]
    for i, count in enumerate(counts):
        members[bisect_left(edges, count)].append(i)
    return members


def length_buckets(sentences) -> dict:
    """{"edges_words", "buckets": [{"name", "n", "words": [shortest, longest] or None}], "members": indices}."""
    counts = word_counts(sentences)
    edges = quartile_edges(counts)
    members = bucket_members(counts, edges)
    buckets = [{"name": name, "n": len(idx), "words": [min(counts[i] for i in idx), max(counts[i] for i in idx)]
                if idx else None} for name, idx in zip(BUCKET_NAMES, members)]
    return {"edges_words": edges, "buckets": buckets, "members": members}


def bucket_accuracies(correct, members) -> list:
    """Accuracy in points (rounded to 4 places) on each bucket's sentences; None for an empty bucket."""
    return [round(100 * sum(correct[i] for i in idx) / len(idx), 4) if idx else None for idx in members]


def bucket_differences(correct_a, correct_b, members, seed: int) -> list:
    """Per bucket: a against b on that bucket's sentences (the PAIRED_KEYS of paired_comparison); None if empty."""
    out = []
    for idx in members:
        if not idx:
            out.append(None)
            continue
        result = paired_comparison([correct_a[i] for i in idx], [correct_b[i] for i in idx], seed=seed)
        out.append({k: result[k] for k in PAIRED_KEYS})
    return out


def _correct(models: dict, name: str, n: int) -> list:
    """The PyTorch artifact's per-sentence correctness; it must score the same n sentences as the buckets."""
    correct = from_bits(models[name]["artifacts"]["pytorch"]["correct"])
    if len(correct) != n:
        raise ValueError(f"{name}: {len(correct)} correctness bits for {n} validation sentences; the report must "
                         f"bucket the sentences the models were scored on")
    return correct


def by_length(models: dict, sentences, pairs, frontier, seed: int) -> dict:
    """The report's `by_length` entry (LENGTH_CONVENTION). `pairs`: (model, student) pairs to compare per bucket
    ("pruned vs student"); `frontier`: compare.frontier_summary's result or None. Each model's correctness is
    decoded once, and each (model, reference) pair is compared once: a frontier row's first member against the
    fp32 student is also one of `pairs`."""
    buckets = length_buckets(sentences)
    members = buckets.pop("members")
    n = len(sentences)
    correct = {name: _correct(models, name, n) for name in models}
    accuracy = {name: bucket_accuracies(bits, members) for name, bits in correct.items()}
    compared = {}

    def versus(a: str, b: str) -> dict:
        if (a, b) not in compared:
            compared[(a, b)] = {"model": a, "reference": b,
                                "per_bucket": bucket_differences(correct[a], correct[b], members, seed)}
        return compared[(a, b)]

    def frontier_row(row: dict) -> dict:
        """One frontier row by bucket: accuracy mean over its members, its first member against its reference."""
        per_member = [accuracy[name] for name in row["members"]]
        means = [None if values[0] is None else round(sum(values) / len(values), 4) for values in zip(*per_member)]
        reference = (row.get("vs_student") or {}).get("reference")
        return {**{k: row[k] for k in ("group", "members", "n_seeds", "method", "bits", "sparsity_target", "mode")},
                "accuracy_points_mean": means,
                "vs_student": versus(row["members"][0], reference) if reference else None}

    return {
        "convention": LENGTH_CONVENTION,
        "evaluation": "validation",
        "n": n,
        **buckets,
        "models": {name: {"accuracy_points": values} for name, values in accuracy.items()},
        "vs_student": [versus(a, b) for a, b in pairs],
        "frontier_rows": [frontier_row(row) for row in frontier["rows"]] if frontier else None,
    }
