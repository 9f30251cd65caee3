"""Stage 2's TinyBERT options on tiny vocabularies and models: word-replacement augmentation (common/augment.py),
its teacher-logit cache, and the intermediate-layer loss (common/distillation.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BertForSequenceClassification, BertTokenizer

import common.distillation
from common.augment import AugmentSettings, augmented_copies, neighbour_table, replace_words, with_word_replacements
from common.config import ConfigError
from common.data import Encoded, encode, make_loader, model_inputs
from common.distillation import (IntermediateDistillation, eager_attention, intermediate_layer_map, intermediate_loss,
                                 kd_loss, kd_loss_fn, student_from_teacher_layers, teacher_logits_for)
from common.modeling import load_model, load_tokenizer
from common.training import predict_logits
from conftest import VOCAB, save_tiny, tiny_bert_config, tiny_sentences


@pytest.fixture
def piece_tokenizer(tmp_path):
    """The tiny vocabulary plus two `##` pieces, so that "films" and "boringly" are words of two tokens."""
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB + ["##s", "##ly"]) + "\n")
    return BertTokenizer.from_pretrained(str(tmp_path))


def random_table(tokenizer, k=3, seed=0):
    torch.manual_seed(seed)
    return neighbour_table(torch.randn(len(tokenizer), 16), tokenizer, k)


def test_neighbours_are_the_nearest_whole_words_by_cosine(piece_tokenizer):
    torch.manual_seed(0)
    embeddings = torch.randn(len(piece_tokenizer), 16)
    table = neighbour_table(embeddings, piece_tokenizer, k=4, chunk=7)  # several chunks
    vocab = piece_tokenizer.get_vocab()
    words = [t for t in VOCAB if t.isalpha()]
    assert sorted(np.flatnonzero(table.candidate)) == sorted(vocab[t] for t in words)
    for token in ("[CLS]", "[SEP]", "[PAD]", ".", "'s", "##s", "##ly"):
        assert not table.candidate[vocab[token]] and (table.neighbours[vocab[token]] == -1).all()
    assert table.piece[vocab["##s"]] and not table.piece[vocab["film"]]
    ids = torch.tensor([vocab[t] for t in words])
    sims = F.normalize(embeddings[ids], dim=-1) @ F.normalize(embeddings[ids], dim=-1).T
    sims.fill_diagonal_(-2)
    for row, token_id in enumerate(ids.tolist()):
        assert table.neighbours[token_id].tolist() == ids[sims[row].topk(4).indices].tolist()
    with pytest.raises(ValueError, match="whole-word tokens"):
        neighbour_table(embeddings, piece_tokenizer, k=len(words))


def test_replacements_come_from_the_table_and_skip_non_words(piece_tokenizer):
    table = random_table(piece_tokenizer)
    ids = piece_tokenizer("the films is boringly dull . it 's fun")["input_ids"]
    tokens = piece_tokenizer.convert_ids_to_tokens(ids)
    assert "##s" in tokens and "##ly" in tokens
    fixed = {i for i, t in enumerate(tokens) if not t.isalpha() or i + 1 < len(tokens) and tokens[i + 1][:2] == "##"}
    rng = np.random.default_rng(0)
    changed = set()
    for _ in range(200):
        new = replace_words(ids, table, 1.0, rng)
        assert len(new) == len(ids)
        for i, (old, now) in enumerate(zip(ids, new)):
            assert now == old if i in fixed else now in table.neighbours[old]
        changed |= {i for i, (old, now) in enumerate(zip(ids, new)) if old != now}
    assert changed == set(range(len(ids))) - fixed  # prob 1: every candidate word replaced, "film"+"##s" never


@pytest.mark.parametrize("prob", [0.1, 0.4])
def test_replacement_probability_is_honoured(tiny_tokenizer, prob):
    table = random_table(tiny_tokenizer)
    rows = encode(tiny_tokenizer, tiny_sentences(400, seed=3)).input_ids
    rng = np.random.default_rng(1)
    slots = replaced = 0
    for ids in rows:
        new = replace_words(ids, table, prob, rng)
        slots += int(table.candidate[ids].sum())
        replaced += sum(a != b for a, b in zip(ids, new))  # a neighbour is never the word itself
    assert slots > 1500 and replaced / slots == pytest.approx(prob, abs=0.03)


def test_copies_are_seeded_and_never_the_original(tiny_tokenizer):
    table = random_table(tiny_tokenizer)
    encoded = encode(tiny_tokenizer, tiny_sentences(50, seed=4))
    first = augmented_copies(encoded, table, AugmentSettings(copies=3, prob=0.4, neighbours=3, seed=7))
    again = augmented_copies(encoded, table, AugmentSettings(copies=3, prob=0.4, neighbours=3, seed=7))
    other = augmented_copies(encoded, table, AugmentSettings(copies=3, prob=0.4, neighbours=3, seed=8))
    assert first.input_ids == again.input_ids and first.input_ids != other.input_ids
    originals = {tuple(ids) for ids in encoded.input_ids}
    assert 100 < len(first) <= 150 and not any(tuple(ids) in originals for ids in first.input_ids)
    assert len({tuple(ids) for ids in first.input_ids}) > 0.9 * len(first)
    low = augmented_copies(encoded, table, AugmentSettings(copies=3, prob=0.05, neighbours=3, seed=7))
    assert len(low) < len(first)  # copies identical to their original are dropped


def test_augmented_set_keeps_the_originals_and_its_cache_follows_the_settings(tmp_path, tiny_bert_dir, monkeypatch):
    tokenizer, teacher = load_tokenizer(tiny_bert_dir), load_model(tiny_bert_dir)
    data = {"train": encode(tokenizer, tiny_sentences(30, seed=5)), "tokenization": {"max_length": 128}}
    cache = tmp_path / "cache"
    logits = teacher_logits_for(tiny_bert_dir, data["train"], cache)
    settings = AugmentSettings(copies=2, prob=1.0, neighbours=1, seed=0)  # deterministic: nearest word everywhere
    train, all_logits, info = with_word_replacements(data, logits, teacher, tokenizer, tiny_bert_dir, cache, settings)
    n = len(data["train"])
    assert train.input_ids[:n] == data["train"].input_ids and torch.equal(train.labels[:n], data["train"].labels)
    assert torch.equal(all_logits[:n], logits) and len(train) == len(all_logits) == n + info["rows"]
    assert info["rows"] == n  # prob 1, one neighbour: one distinct copy per sentence
    # soft targets and hard labels of the copies are the teacher's own
    expected = predict_logits(teacher, make_loader(Encoded(train.input_ids[n:], train.labels[n:]), 100))
    assert torch.allclose(all_logits[n:], expected, atol=1e-5)
    assert torch.equal(train.labels[n:], all_logits[n:].argmax(-1))
    assert len(list(cache.glob("*.pt"))) == 2

    with monkeypatch.context() as patch:  # the same settings: the cache, no teacher run
        patch.setattr(common.distillation, "load_model", lambda *a, **k: pytest.fail("cache not reused"))
        again = with_word_replacements(data, logits, teacher, tokenizer, tiny_bert_dir, cache, settings)
    assert torch.equal(again[1], all_logits) and again[0].input_ids == train.input_ids
    # another seed gives the very same rows here (prob 1, one neighbour), yet its own cache entry
    reseeded = with_word_replacements(data, logits, teacher, tokenizer, tiny_bert_dir, cache,
                                      AugmentSettings(copies=2, prob=1.0, neighbours=1, seed=1))
    assert reseeded[0].input_ids == train.input_ids and len(list(cache.glob("*.pt"))) == 3
    with_word_replacements(data, logits, teacher, tokenizer, tiny_bert_dir, cache,
                           AugmentSettings(copies=2, prob=0.5, neighbours=1, seed=0))
    assert len(list(cache.glob("*.pt"))) == 4


@pytest.fixture
def teacher4():
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(num_hidden_layers=4)).eval()


def padded_batch(tokenizer):
    rows = tiny_sentences(6, seed=6) + [("good", 1)]
    encoded = encode(tokenizer, rows)
    return next(iter(make_loader(encoded, len(rows))))


def outputs(model, batch):
    return model(**model_inputs(batch), output_hidden_states=True, output_attentions=True)


def test_intermediate_loss_is_zero_only_for_a_student_that_copies_the_mapped_layers(teacher4, tiny_tokenizer):
    batch = padded_batch(tiny_tokenizer)
    assert (batch["attention_mask"] == 0).any()
    copy = student_from_teacher_layers(teacher4, (0, 1)).eval()
    other = student_from_teacher_layers(teacher4, (0, 2)).eval()
    assert intermediate_layer_map(copy, teacher4) == [0, 1] and intermediate_layer_map(other, teacher4) == [0, 2]
    with eager_attention(teacher4, copy, other):
        target = outputs(teacher4, batch)
        same = intermediate_loss(outputs(copy, batch), target, [0, 1], batch["attention_mask"])
        assert same.item() == pytest.approx(0, abs=1e-10)
        wrong = intermediate_loss(outputs(copy, batch), target, [0, 2], batch["attention_mask"])
        assert wrong.item() > 1e-6
        loss = intermediate_loss(outputs(other, batch), target, [0, 2], batch["attention_mask"])
        assert loss.item() > 1e-6
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in other.parameters())
    assert teacher4.config._attn_implementation == "sdpa"  # switched back
    with pytest.raises(ValueError, match="eager attention"):
        intermediate_loss(outputs(copy, batch), target, [0, 1], batch["attention_mask"])


def test_kd_loss_fn_adds_the_weighted_intermediate_term(teacher4, tiny_tokenizer):
    batch = padded_batch(tiny_tokenizer)
    student = student_from_teacher_layers(teacher4, (0, 2)).eval()
    cached = torch.randn(len(batch["idx"]), 2)
    plain = kd_loss_fn(cached, 2.0, 0.5)(student, batch)
    with eager_attention(teacher4, student):
        term = intermediate_loss(outputs(student, batch), outputs(teacher4, batch), [0, 2], batch["attention_mask"])
        both = kd_loss_fn(cached, 2.0, 0.5, IntermediateDistillation(teacher4, [0, 2], 3.0))(student, batch)
    assert plain.item() == pytest.approx(kd_loss(student(**model_inputs(batch)).logits, cached[batch["idx"]],
                                                 batch["labels"], 2.0, 0.5).item(), rel=1e-6)
    assert both.item() == pytest.approx(plain.item() + 3.0 * term.item(), rel=1e-4)


def test_layer_map_is_uniform_without_recorded_layers_and_refuses_other_widths(teacher4, tiny_distilbert):
    assert intermediate_layer_map(tiny_distilbert, teacher4) == [1, 3]  # 2 of 4 layers, ending at the last
    torch.manual_seed(0)
    narrow = BertForSequenceClassification(tiny_bert_config(hidden_size=16, num_attention_heads=4))
    with pytest.raises(ConfigError, match="hidden"):
        intermediate_layer_map(narrow, teacher4)


def test_a_student_saved_after_intermediate_training_loads_like_any_other(tmp_path, teacher4):
    student = student_from_teacher_layers(teacher4, (0, 2))
    with eager_attention(student):
        assert student.config._attn_implementation == "eager"
    save_tiny(student, tmp_path / "s")
    assert load_model(tmp_path / "s").config._attn_implementation == "sdpa"
