"""Vocabulary pruning (common/vocab.py) on a tiny BERT (hidden 64, as bnb's 4-bit CPU kernels want) with a tiny
WordPiece vocabulary made here: every letter and its ## form, some whole words and ## pieces. The pruned model with
the rewritten tokenizer gives the full model's logits exactly, spells unseen words with kept pieces, and its folder
loads through every loader (project, plain transformers, trust_remote_code, ONNX, 4-bit); inconsistent folders are
refused in one line."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, processors
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification,
                          BertTokenizer, DistilBertForSequenceClassification, RobertaConfig,
                          RobertaForSequenceClassification)

from common.export import OnnxClassifier, export_fp32
from common.modeling import load_model, save_model
from common.modeling_dpq import get_layout
from common.pruning.selection import prune_units
from common.quantization import quantize_model, save_quantized
from common.vocab import (VocabularyError, check_vocabulary, prune_vocabulary, select_vocabulary,
                          write_pruned_tokenizer)
from conftest import tiny_bert_config, tiny_distilbert_config

# laid out like BERT's: placeholders among the specials (dropped, so [UNK], [CLS]... move), then characters
HEAD = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused2]"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARACTERS = list("abcdefghijklmnopqrstuvwxyz.!")
WORDS = ["the", "very", "film", "great", "boring", "movie", "is", "dull", "was", "good", "bad", "story", "fun"]
PIECES = ["##ing", "##ly", "##ed", "##ness"]
CHARACTER_PIECES = CHARACTERS + ["##" + c for c in CHARACTERS]
VOCAB = HEAD + CHARACTER_PIECES + WORDS + PIECES
TRAIN = ["the film is good.", "a bad movie!", "the story was fun", "films"]
EXTRA = 2  # the two lowest ids neither special, character nor in TRAIN ([unused*] never occur): "very", "great"
KEPT = 72  # 5 specials, 56 character pieces, 9 more ids of TRAIN, 2 extra
KEPT_SENTENCES = TRAIN + ["very great film!", "a good story"]  # every token kept
UNSEEN = "the boringly dull film"  # "boring", "##ly", "dull" are not kept
SIZES = dict(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128)
PRUNE = {"heads": {0: [1, 2, 3]}, "ffn": {1: list(range(96))}}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full_tokenizer")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return BertTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def selection(tokenizer):
    return select_vocabulary(tokenizer, tokenizer(TRAIN)["input_ids"], EXTRA)


def build(kind="bert"):
    torch.manual_seed(0)
    if kind == "bert":
        return BertForSequenceClassification(tiny_bert_config(**SIZES)).eval()
    if kind == "distilbert":
        return DistilBertForSequenceClassification(tiny_distilbert_config(vocab_size=len(VOCAB))).eval()
    config = RobertaConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=0,
                           bos_token_id=VOCAB.index("[CLS]"), eos_token_id=VOCAB.index("[SEP]"))
    return RobertaForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def pruned(tokenizer, selection, tmp_path_factory):
    """(full model, vocab-pruned copy, rewritten tokenizer)."""
    model = build()
    small = copy.deepcopy(model)
    prune_vocabulary(small, tokenizer, selection.kept)
    return model, small, write_pruned_tokenizer(tokenizer, selection.kept, tmp_path_factory.mktemp("tokenizer"))


def encode(tokenizer, sentences):
    return tokenizer(sentences, padding=True, return_tensors="pt", return_token_type_ids=False)


@torch.no_grad()
def logits(model, batch):
    return model(**batch).logits


def renumbered(ids, kept):
    new = torch.full((len(VOCAB),), -1, dtype=torch.long)
    new[kept] = torch.arange(len(kept))
    return new[ids]


def test_selection_keeps_specials_characters_training_ids_and_lowest_extras(tokenizer, selection):
    ids = {token: i for i, token in enumerate(VOCAB)}
    training = {"the", "film", "is", "good", ".", "a", "bad", "movie", "!", "story", "was", "fun", "##s"}
    assert selection.ids["special"] == [0, 3, 4, 5, 6]
    assert selection.ids["character"] == sorted(ids[t] for t in CHARACTER_PIECES)
    assert selection.ids["training"] == sorted(ids[t] for t in training - set(CHARACTER_PIECES))  # not a . ##s
    assert selection.ids["extra"] == [ids["very"], ids["great"]]
    kept = selection.kept
    assert kept == sorted(kept) and kept[0] == 0  # original order; [PAD] stays 0
    assert len(kept) == KEPT and {VOCAB[i] for i in kept} == set(SPECIALS + CHARACTER_PIECES) | training | {
        "very", "great"}
    assert selection.record() == {"original_size": len(VOCAB), "kept_size": len(kept), "extra_requested": EXTRA,
                                  "kept_by_reason": {"special": 5, "character": 56, "training": 9, "extra": 2}}
    again = select_vocabulary(tokenizer, [torch.tensor(row) for row in tokenizer(TRAIN)["input_ids"]], EXTRA)
    assert again == selection  # deterministic, whatever the rows are
    assert [VOCAB[i] for i in select_vocabulary(tokenizer, [], 1000).kept] == [t for t in VOCAB if "unused" not in t]
    with pytest.raises(ValueError, match="outside"):
        select_vocabulary(tokenizer, [[2, len(VOCAB)]], 0)
    with pytest.raises(ValueError, match="extra"):
        select_vocabulary(tokenizer, [], -1)


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta"])
def test_pruned_model_and_tokenizer_give_the_full_models_logits_exactly(kind, tokenizer, selection, pruned):
    model = build(kind)
    small = copy.deepcopy(model)
    prune_vocabulary(small, tokenizer, selection.kept)
    new_tokenizer = pruned[2]
    assert small.config.vocab_size == len(new_tokenizer) == len(selection.kept) < len(VOCAB)
    assert small.config.pad_token_id == 0
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # renumbered: the same tokens
        if getattr(model.config, key) is not None:
            assert selection.kept[getattr(small.config, key)] == getattr(model.config, key)
    full, new = encode(tokenizer, KEPT_SENTENCES), encode(new_tokenizer, KEPT_SENTENCES)
    assert (new["attention_mask"] == 0).any()  # padding in the batch
    assert torch.equal(new["input_ids"], renumbered(full["input_ids"], selection.kept))
    assert not torch.equal(new["input_ids"], full["input_ids"])
    assert torch.equal(logits(small, new), logits(model, full))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_an_unseen_word_is_spelled_with_kept_pieces(tokenizer, selection, pruned):
    _, small, new_tokenizer = pruned
    assert {"boring", "##ly", "dull"} <= set(tokenizer.tokenize(UNSEEN)) - {VOCAB[i] for i in selection.kept}
    pieces = new_tokenizer.tokenize(UNSEEN)
    assert "[UNK]" not in pieces and "##y" in pieces and set(pieces) <= set(new_tokenizer.get_vocab())
    batch = encode(new_tokenizer, [UNSEEN])
    assert new_tokenizer.unk_token_id not in batch["input_ids"][0].tolist()
    assert int(batch["input_ids"].max()) < small.config.vocab_size
    assert torch.isfinite(logits(small, batch)).all()
    assert new_tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == UNSEEN


@pytest.mark.parametrize("units", [False, True], ids=["vocab_only", "vocab_heads_ffn"])
def test_folder_reloads_through_every_loader(units, tokenizer, selection, pruned, tmp_path):
    model, small, new_tokenizer = pruned
    small = copy.deepcopy(small)
    if units:
        prune_units(small, **PRUNE)
    folder = tmp_path / "model"
    save_model(small, new_tokenizer, folder)
    assert check_vocabulary(folder) == len(selection.kept)
    batch = encode(AutoTokenizer.from_pretrained(str(folder)), KEPT_SENTENCES)
    assert torch.equal(batch["input_ids"], encode(new_tokenizer, KEPT_SENTENCES)["input_ids"])
    expected = logits(small, batch)
    stock = AutoModelForSequenceClassification.from_pretrained(str(folder), trust_remote_code=units)
    assert type(stock).__name__ == ("DPQBertForSequenceClassification" if units else "BertForSequenceClassification")
    for loaded in (load_model(folder), stock):
        assert get_layout(loaded) == get_layout(small)
        assert torch.equal(logits(loaded.eval(), batch), expected)
    if not units:  # only the embeddings changed: the full model's logits on the original ids
        assert torch.equal(expected, logits(model, encode(tokenizer, KEPT_SENTENCES)))


def test_onnx_export_of_a_vocab_pruned_model_matches_pytorch(pruned, tmp_path):
    _, small, new_tokenizer = pruned
    small = copy.deepcopy(small)
    prune_units(small, **PRUNE)
    export_fp32(small, tmp_path / "model.onnx")
    batch = encode(new_tokenizer, KEPT_SENTENCES + [UNSEEN])
    onnx = OnnxClassifier(tmp_path / "model.onnx", threads=1).logits(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(torch.from_numpy(onnx), logits(small, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("embedding_bits", [8, 4])
def test_4bit_folder_of_a_vocab_pruned_model_reloads(embedding_bits, selection, pruned, tmp_path):
    _, small, new_tokenizer = pruned
    small = copy.deepcopy(small)
    prune_units(small, **PRUNE)
    quantized = quantize_model(small, embedding_bits=embedding_bits)
    batch = encode(new_tokenizer, KEPT_SENTENCES + [UNSEEN])
    before = logits(quantized, batch)
    folder = tmp_path / "q"
    save_quantized(quantized, new_tokenizer, folder)
    assert check_vocabulary(folder) == len(selection.kept)
    after = logits(load_model(folder), batch)
    assert torch.equal(after, before) and torch.equal(after.argmax(-1), before.argmax(-1))


def test_bad_keep_lists_and_unsupported_models_are_refused(tokenizer, selection):
    kept = selection.kept
    cases = {"outside": kept + [len(VOCAB)], "duplicate": kept + [kept[-1]], "ascending": kept[::-1],
             r"misses the special token ids \[3\]": [i for i in kept if i != 3]}
    for match, bad in cases.items():
        model = build()
        with pytest.raises(ValueError, match=match):
            prune_vocabulary(model, tokenizer, bad)
        assert model.config.vocab_size == len(VOCAB)  # untouched
    with pytest.raises(ValueError, match="the tokenizer has"):
        prune_vocabulary(BertForSequenceClassification(tiny_bert_config(vocab_size=90)), tokenizer, kept)
    roberta = RobertaForSequenceClassification(RobertaConfig(  # positions count from the pad id: it must not move
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        pad_token_id=VOCAB.index("bad"), bos_token_id=VOCAB.index("[CLS]"), eos_token_id=VOCAB.index("[SEP]")))
    with pytest.raises(ValueError, match="numbers positions from pad_token_id"):
        prune_vocabulary(roberta, tokenizer, kept)
    quantized = quantize_model(build())
    with pytest.raises(ValueError, match="before quantizing"):
        prune_vocabulary(quantized, tokenizer, kept)


@pytest.mark.parametrize("processor", ["template", "bert_in_sequence"])
def test_written_files_hold_the_new_numbering(processor, tokenizer, selection, tmp_path):
    """tokenizer.json as the `tokenizers` library reads it alone (its post-processor and added tokens: transformers'
    BertTokenizer rebuilds those itself), and a vocab.txt that was there, rewritten."""
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")  # stale: the full vocabulary
    if processor != "template":  # the older form of BERT's post-processor
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.backend_tokenizer.post_processor = processors.Sequence(
            [processors.ByteLevel(), processors.BertProcessing(("[SEP]", 5), ("[CLS]", 4))])
        assert tokenizer.backend_tokenizer.encode("good").ids == [4, VOCAB.index("good"), 5]
    new_tokenizer = write_pruned_tokenizer(tokenizer, selection.kept, tmp_path)
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    raw.no_padding()
    sentences = KEPT_SENTENCES + [UNSEEN, "the [MASK] is good"]  # [MASK] in the text: an added token
    expected = new_tokenizer(sentences)["input_ids"]
    assert [e.ids for e in raw.encode_batch(sentences)] == expected and expected[-1][2] == 4
    assert expected[0][0] == 2 == raw.token_to_id("[CLS]") != tokenizer.cls_token_id  # [CLS] moved
    added = json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"]
    assert {t["content"]: t["id"] for t in added} == {t: i for i, t in enumerate(SPECIALS)}
    lines = (tmp_path / "vocab.txt").read_text().splitlines()
    assert lines == [VOCAB[i] for i in selection.kept]
    assert [new_tokenizer.convert_ids_to_tokens(i) for i in range(len(lines))] == lines
    alone = tmp_path / "vocab_txt_only"
    alone.mkdir()
    (alone / "vocab.txt").write_text((tmp_path / "vocab.txt").read_text())
    assert BertTokenizer.from_pretrained(str(alone)).get_vocab() == new_tokenizer.get_vocab()


def corrupt(folder, what, model, tokenizer):
    if what == "full tokenizer":
        tokenizer.save_pretrained(str(folder))
    elif what == "full weights":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    elif what == "truncated tokenizer.json":
        (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text()[:500])
    elif what == "duplicate id":
        data = json.loads((folder / "tokenizer.json").read_text())
        data["model"]["vocab"]["great"] = data["model"]["vocab"]["very"]
        (folder / "tokenizer.json").write_text(json.dumps(data))
    elif what == "vocab.txt":
        (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    elif what == "pad_token_id":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(dict(config, pad_token_id=config["vocab_size"])))


@pytest.mark.parametrize("what, message", [
    ("full tokenizer", f"vocab_size {KEPT}, the tokenizer has {len(VOCAB)} tokens"),
    ("full weights", f"the weights hold {len(VOCAB)} rows"),
    ("truncated tokenizer.json", "JSONDecodeError"),
    ("duplicate id", "gives id"),
    ("vocab.txt", "vocab.txt"),
    ("pad_token_id", "pad_token_id"),
])
def test_an_inconsistent_or_corrupt_vocabulary_is_refused_in_one_line(what, message, tokenizer, pruned, tmp_path):
    model, small, new_tokenizer = pruned
    folder = tmp_path / "pruned_model"
    save_model(small, new_tokenizer, folder)
    check_vocabulary(folder)
    corrupt(folder, what, model, tokenizer)
    with pytest.raises(VocabularyError) as err:
        check_vocabulary(folder)
    text = str(err.value)
    assert "\n" not in text and str(folder) in text and message in text
    assert "`python 8_pruning_with_finetuning.py`; run it again" in text  # what writes a pruned_model folder
