"""Accuracy by sentence length (the report's `by_length`): the validation sentences in four buckets at the
nearest-rank quartiles of their word counts (whitespace words, not tokens: the same for every tokenizer), each
model's accuracy per bucket, and pruned models paired against their student within each bucket. SST-2 validation
holds full sentences (median 19 words), its training set mostly short phrases (median 7): pruning costs accuracy
mostly on the longest sentences, which one overall accuracy hides.
"""

from bisect import bisect_left

from common.report.measure import from_bits
from common.stats import paired_comparison

BUCKET_NAMES = ("Q1", "Q2", "Q3", "Q4")  # shortest to longest
# what the report keeps of a paired comparison (common.stats.paired_comparison), besides the number of sentences
DIFFERENCE_KEYS = ("diff_points", "ci_low_points", "ci_high_points", "only_a_right", "only_b_right", "mcnemar_p",
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


def length_buckets(sentences) -> dict:
    """{"edges_words", "buckets": [{"name", "n", "words": [shortest, longest] or None}], "members": indices}: edges at
    the nearest-rank quartiles of the word counts (the count at rank ceil(k n / 4), integer maths); a sentence goes to
    the bucket of how many edges lie strictly below its count, so equal lengths share one."""
    counts = [len(sentence.split()) for sentence in sentences]  # whitespace-separated words
    if not counts:
        raise ValueError("length_buckets needs at least one sentence")
    ordered = sorted(counts)
    edges = [ordered[-(-k * len(ordered) // 4) - 1] for k in (1, 2, 3)]
    members = [[] for _ in range(len(edges) + 1)]
    for i, count in enumerate(counts):
        members[bisect_left(edges, count)].append(i)
    buckets = [{"name": name, "n": len(idx), "words": [min(counts[i] for i in idx), max(counts[i] for i in idx)]
                if idx else None} for name, idx in zip(BUCKET_NAMES, members)]
    return {"edges_words": edges, "buckets": buckets, "members": members}


def bucket_accuracies(correct, members) -> list:
    """Accuracy in points (rounded to 4 places) on each bucket's sentences; None for an empty bucket."""
    return [round(100 * sum(correct[i] for i in idx) / len(idx), 4) if idx else None for idx in members]


def bucket_differences(correct_a, correct_b, members, seed: int) -> list:
    """Per bucket: a against b on that bucket's sentences (n and the DIFFERENCE_KEYS); None if empty."""
    out = []
    for idx in members:
        result = paired_comparison([correct_a[i] for i in idx], [correct_b[i] for i in idx], seed=seed) if idx else None
        out.append(result and {k: result[k] for k in ("n", *DIFFERENCE_KEYS)})
    return out


def _correct(models: dict, name: str, n: int) -> list:
    """The PyTorch artifact's per-sentence correctness; it must score the same n sentences as the buckets."""
    correct = from_bits(models[name]["artifacts"]["pytorch"]["correct"])
    if len(correct) != n:
        raise ValueError(f"{name}: {len(correct)} correctness bits for {n} validation sentences; the report must "
                         f"bucket the sentences the models were scored on")
    return correct


def by_length(models: dict, sentences, pairs, frontier, seed: int) -> dict:
    """The report's `by_length` (LENGTH_CONVENTION); `pairs`: (model, student) to compare per bucket."""
    buckets, n = length_buckets(sentences), len(sentences)
    members = buckets.pop("members")
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
        return {**{k: row[k] for k in ("group", "members", "n_seeds", "method", "bits", "target_sparsity", "mode")},
                "accuracy_points_mean": means,
                "vs_student": versus(row["members"][0], reference) if reference else None}

    return {"convention": LENGTH_CONVENTION, "evaluation": "validation", "n": n, **buckets,
            "models": {name: {"accuracy_points": values} for name, values in accuracy.items()},
            "vs_student": [versus(a, b) for a, b in pairs],
            "frontier_rows": [frontier_row(row) for row in frontier["rows"]] if frontier else None}
