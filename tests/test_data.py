"""SST-2 on disk (download_model.py's data half), the validating reader, splits and batching."""

from collections import Counter

import pytest
import torch

from common.data import (DataError, Encoded, check_prepared, concatenated_pairs, encode, joined, load_sst2_splits,
                         make_loader, read_glue_tsv)
from conftest import run_script, tiny_sentences, write_glue_tsv


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("", "the file is empty"),
    ("text\tlabel\nfine\t1\n", "line 1: header is 'text\\\\tlabel'"),
    ("sentence\tlabel\ngood\t1\nbad\t2\n", "line 3: label '2' is not 0 or 1"),
    ("sentence\tlabel\ngood\t1\nno tab here\n", "line 3: expected 2 tab-separated fields"),
    ("sentence\tlabel\n", "no data rows"),
])
def test_malformed_tsv_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "train.tsv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        read_glue_tsv(path)
    assert str(path) in str(err.value)


def test_quotes_are_plain_text(tmp_path):
    path = write_glue_tsv(tmp_path / "q.tsv", [('a "quoted" word', 1), ("it 's fine", 0)])
    assert read_glue_tsv(path) == [('a "quoted" word', 1), ("it 's fine", 0)]


def test_download_writes_data_with_manifest(workspace, glue_dir, monkeypatch, tiny_bert_dir):
    monkeypatch.setenv("SST2_DIR", str(glue_dir))
    run_script("download_model.py", f"TEACHER_SOURCE={tiny_bert_dir}")
    manifest = check_prepared()
    assert manifest["splits"]["train"]["rows"] == 400 and manifest["splits"]["validation"]["rows"] == 60
    assert manifest["splits"]["train"]["positive"] == 200 and "SST2_DIR" in manifest["source"]
    assert (workspace / "models" / "pretrained_teacher" / "metadata.json").is_file()

    splits = load_sst2_splits()
    assert len(splits["heldout"]) == 8 and len(splits["train"]) == 392 and len(splits["validation"]) == 60
    original = read_glue_tsv(workspace / "data" / "sst2" / "train.tsv")
    assert Counter(splits["heldout"]) + Counter(splits["train"]) == Counter(original)  # a partition of train
    assert load_sst2_splits() == splits  # fixed, seeded
    assert len(load_sst2_splits(train_limit=50)["train"]) == 50

    # the prepared files are checked against the manifest: an edited file is not used silently
    path = workspace / "data" / "sst2" / "train.tsv"
    path.write_text(path.read_text() + "an extra line\t1\n")
    with pytest.raises(DataError, match="changed since download_model.py"):
        load_sst2_splits()


def test_no_data_source_is_a_clear_error_and_writes_nothing(workspace, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="SST2_DIR is not set and the Hugging Face Hub"):
        run_script("download_model.py")
    assert not (workspace / "data").exists() or not any((workspace / "data").iterdir())
    assert not (workspace / "models").exists()


def test_bad_sst2_dir_fails_before_anything_is_written(workspace, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    write_glue_tsv(bad / "train.tsv", tiny_sentences(20, seed=0))
    (bad / "dev.tsv").write_text("sentence\tlabel\nnice\tpositive\n")
    monkeypatch.setenv("SST2_DIR", str(bad))
    with pytest.raises(DataError, match=r"dev.tsv, line 2: label 'positive'"):
        run_script("download_model.py")
    assert not (workspace / "models").exists()


def test_stages_refuse_to_run_without_data(workspace):
    with pytest.raises(DataError, match="run `python download_model.py` first"):
        load_sst2_splits()


def test_length_grouped_batches_cover_every_row_once(tiny_tokenizer):
    rows = tiny_sentences(100, seed=3)
    encoded = encode(tiny_tokenizer, rows)
    loader = make_loader(encoded, batch_size=16, shuffle=True, seed=1)
    seen = []
    for batch in loader:
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        lengths = batch["attention_mask"].sum(1)
        assert lengths.max() == batch["input_ids"].shape[1]  # padded to the longest in the batch only
        assert torch.equal(batch["labels"], encoded.labels[batch["idx"]])
        seen += batch["idx"].tolist()
    assert sorted(seen) == list(range(100))
    first_epoch = seen
    second = [i for batch in loader for i in batch["idx"].tolist()]
    assert sorted(second) == list(range(100)) and second != first_epoch  # reshuffled per epoch


def test_concatenated_pairs_join_two_long_enough_rows_and_keep_the_closing_token():
    """[CLS] a [SEP] + [CLS] b [SEP] -> [CLS] a b [SEP]; rows with fewer than min_tokens inner tokens are never
    used; truncation keeps the closing token; the same seed gives the same pairs."""
    rows = Encoded(input_ids=[[101, 5, 6, 102], [101, 7, 102], [101, 8, 9, 10, 102]],
                   labels=torch.tensor([1, 0, 1]))
    pairs = concatenated_pairs(rows, 50, seed=3, min_tokens=2)
    allowed = {(5, 6), (8, 9, 10)}  # row 1 has one inner token: left out
    for ids in pairs.input_ids:
        assert ids[0] == 101 and ids[-1] == 102 and 102 not in ids[1:-1] and 101 not in ids[1:]
        inner = tuple(ids[1:-1])
        assert any(inner[:len(a)] == a and inner[len(a):] in allowed for a in allowed)
    assert {tuple(ids) for ids in pairs.input_ids} == {(101, *a, *b, 102) for a in allowed for b in allowed}
    assert pairs.labels.tolist() == [0] * 50
    assert concatenated_pairs(rows, 50, seed=3, min_tokens=2).input_ids == pairs.input_ids
    assert concatenated_pairs(rows, 50, seed=4, min_tokens=2).input_ids != pairs.input_ids
    short = concatenated_pairs(rows, 20, seed=0, max_length=4, min_tokens=2)
    assert all(len(ids) == 4 and ids[-1] == 102 for ids in short.input_ids)
    with pytest.raises(DataError, match="5 or more tokens"):
        concatenated_pairs(rows, 1, seed=0)
    both = joined(rows, pairs)
    assert len(both) == 53 and both.input_ids[3] == pairs.input_ids[0] and both.labels[:3].tolist() == [1, 0, 1]
