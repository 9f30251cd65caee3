"""common/report/length.py: word-count quartile buckets, accuracy per bucket, and the paired difference against the
student within each bucket, on tiny hand-made data (no models)."""

import pytest

from common.report.compare import frontier_summary, seed_groups
from common.report.length import bucket_accuracies, bucket_differences, by_length, length_buckets
from common.report.markdown import length_table
from common.stats import paired_comparison


def sentences_of(counts):
    """One sentence per word count, words separated by mixed whitespace (a tab, double spaces)."""
    return ["  ".join(f"w{j}" for j in range(k)).replace("w0  ", "w0\t") for k in counts]


def test_buckets_split_at_nearest_rank_quartiles_and_ties_go_to_the_lower_bucket():
    counts = [5, 1, 12, 2, 8, 5, 3, 9, 2, 5]  # sorted: 1 2 2 3 5 5 5 8 9 12; ranks 3, 5, 8 -> 2, 5, 8
    sentences = sentences_of(counts)
    assert [len(s.split()) for s in sentences] == counts
    buckets = length_buckets(sentences)
    assert buckets["edges_words"] == [2, 5, 8]
    assert [b["n"] for b in buckets["buckets"]] == [3, 4, 1, 2]  # every 5 with the 3 in Q2, the 8 alone in Q3
    assert [b["words"] for b in buckets["buckets"]] == [[1, 2], [3, 5], [8, 8], [9, 12]]
    assert [b["name"] for b in buckets["buckets"]] == ["Q1", "Q2", "Q3", "Q4"]
    assert buckets["members"] == [[1, 3, 8], [0, 5, 6, 9], [4], [2, 7]]

    correct = [True, True, False, False, True, False, True, True, True, False]
    # Q1: sentences 1, 3, 8 -> 2 of 3; Q2: 0, 5, 6, 9 -> 2 of 4; Q3: 4 -> 1 of 1; Q4: 2, 7 -> 1 of 2
    assert bucket_accuracies(correct, buckets["members"]) == [66.6667, 50.0, 100.0, 50.0]


def test_equal_lengths_share_one_bucket_and_empty_buckets_have_no_numbers():
    buckets = length_buckets(["a b c"] * 6)
    assert buckets["edges_words"] == [3, 3, 3]
    assert [b["n"] for b in buckets["buckets"]] == [6, 0, 0, 0]
    assert [b["words"] for b in buckets["buckets"]] == [[3, 3], None, None, None]
    members = buckets["members"]
    assert bucket_accuracies([True] * 3 + [False] * 3, members) == [50.0, None, None, None]
    assert bucket_differences([True] * 6, [False] * 6, members, seed=0)[1:] == [None, None, None]


def test_bucket_difference_is_the_paired_test_on_that_buckets_sentences_only():
    members = [[0, 1, 2, 3], [4, 5, 6, 7]]
    a = [True, True, True, True, True, True, False, False]
    b = [True, True, True, True, True, True, True, True]
    short, long = bucket_differences(a, b, members, seed=3)
    assert (short["diff_points"], short["only_a_right"], short["only_b_right"]) == (0.0, 0, 0)
    assert (long["n"], long["diff_points"], long["only_b_right"]) == (4, -50.0, 2)
    expected = paired_comparison(a[4:], b[4:], seed=3)
    assert (long["ci_low_points"], long["ci_high_points"]) == (expected["ci_low_points"], expected["ci_high_points"])
    overall = paired_comparison(a, b, seed=3)["diff_points"]
    assert overall == -25.0 != long["diff_points"]  # the bucket is not the whole set


def record(bits: str, family: str, precision: int = 32, **fields) -> dict:
    """The fields of a measured model that seed_groups, frontier_summary and by_length read."""
    return {"family": family, "bits": precision, "accuracy": bits.count("1") / len(bits), "accuracy_ci": [0.0, 1.0],
            "gflops": 1.0, "size_mb": 1.0, "params": 10, "latency_ms": {"batch_1": 1.0}, "upstream": [],
            "artifacts": {"pytorch": {"correct": bits}}, **fields}


def pruned(bits: str, method: str, seed: int, precision: int = 32, upstream=()) -> dict:
    return record(bits, "pruned", precision, pruning_method=method, target_sparsity=0.5, pruning_mode="frontier",
                  seed=seed, upstream=list(upstream))


@pytest.fixture
def frontier_models():
    """8 sentences of 1..8 words (two per bucket); the pruned models lose only on the longest."""
    return {
        "student_model": record("11111111", "student", seed=42),
        "distilled_quantized_student": record("11111110", "student", 4, seed=42, upstream=["student_model"]),
        "pruned_model_s50": pruned("11111100", "taylor", 42),
        "pruned_model_s50_seed43": pruned("11111110", "taylor", 43),
        "pruned_magnitude_s50": pruned("11110000", "magnitude", 42),
        "pruned_model_s50_quantized": pruned("11111100", "taylor", 42, 4, upstream=["pruned_model_s50"]),
    }


def test_frontier_rows_average_their_seeds_and_pair_the_first_seed_with_the_student(frontier_models):
    models, sentences = frontier_models, sentences_of(range(1, 9))
    frontier = frontier_summary(models, seed_groups(models, seed=0), seed=0)
    pairs = [("pruned_model_s50", "student_model"), ("pruned_magnitude_s50", "student_model")]
    length = by_length(models, sentences, pairs, frontier, seed=0)
    assert (length["n"], length["edges_words"]) == (8, [2, 4, 6])
    assert [b["n"] for b in length["buckets"]] == [2, 2, 2, 2]
    assert length["models"]["pruned_magnitude_s50"]["accuracy_points"] == [100.0, 100.0, 0.0, 0.0]
    assert [v["per_bucket"][3]["diff_points"] for v in length["vs_student"]] == [-100.0, -100.0]

    rows = {(r["group"], r["bits"]): r for r in length["frontier_rows"]}
    ours = rows[("pruned_model_s50", 32)]
    assert ours["members"] == ["pruned_model_s50", "pruned_model_s50_seed43"] and ours["method"] == "taylor"
    assert ours["accuracy_points_mean"] == [100.0, 100.0, 100.0, 25.0]  # Q4: 0% and 50% over two seeds
    assert ours["vs_student"]["model"] == "pruned_model_s50" and ours["vs_student"]["reference"] == "student_model"
    assert [c["diff_points"] for c in ours["vs_student"]["per_bucket"]] == [0.0, 0.0, 0.0, -100.0]
    assert rows[("pruned_model_s50_quantized", 4)]["vs_student"]["reference"] == "distilled_quantized_student"
    assert rows[("pruned_magnitude_s50", 32)]["accuracy_points_mean"] == [100.0, 100.0, 0.0, 0.0]

    table = length_table({"by_length": length, "frontier": frontier, "models": models})
    assert table[0] == "## Accuracy by sentence length (validation)"
    assert "Q1 1-2 words (2 sentences)" in table[2] and "not seed spread" in table[2]
    assert table[4].startswith("| target | model | method | Q1: 1-2 words (%) |")
    body = [line for line in table if line.startswith("| 50% |")]
    assert len(body) == 2  # fp32 rows only: ours and the magnitude baseline, not the 4-bit twin
    assert "`pruned_model_s50` (+1 seed)" in body[0] and "| 25.0 | -100.00 [" in body[0]
    assert [line for line in table if line.startswith("| 0% |")] == [
        "| 0% | `student_model` | unpruned student (the reference) | 100.0 | 100.0 | 100.0 | 100.0 |  |"]


def test_without_a_frontier_every_model_gets_a_row(frontier_models):
    models = {k: v for k, v in frontier_models.items() if k in ("student_model", "pruned_magnitude_s50")}
    length = by_length(models, sentences_of(range(1, 9)), [("pruned_magnitude_s50", "student_model")], None, seed=0)
    assert length["frontier_rows"] is None
    table = length_table({"by_length": length, "frontier": None, "models": models})
    assert table[4].startswith("| model | bits | Q1: 1-2 words (%) |")
    assert table[6].startswith("| `student_model` | 32 | 100.0 | 100.0 | 100.0 | 100.0 |  |")
    assert table[7].startswith("| `pruned_magnitude_s50` | 32 | 100.0 | 100.0 | 0.0 | 0.0 | -100.00 [")


def test_correctness_of_other_sentences_is_refused(frontier_models):
    with pytest.raises(ValueError, match="8 correctness bits for 7 validation sentences"):
        by_length(frontier_models, sentences_of(range(1, 8)), [], None, seed=0)
