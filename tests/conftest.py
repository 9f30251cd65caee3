"""Shared fixtures: tiny random BERT / DistilBERT classifiers with a tiny WordPiece tokenizer, tiny GLUE-format
SST-2 data, and an isolated models/ and data/ root per test. Nothing here touches the network."""

import os
import random
import runpy
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=DeprecationWarning)
# Tiny models run faster on one thread (thread hand-off costs more than their matmuls); the real-data test
# raises it for the packaged MiniLM.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SHARED_SST2 = REPO.parent / "shared" / "data" / "sst2"

POSITIVE = ["good", "great", "fine", "fun", "moving", "charming", "brilliant", "warm", "smart", "lovely"]
NEGATIVE = ["bad", "dull", "awful", "boring", "flat", "tedious", "weak", "ugly", "stale", "messy"]
FILLER = ["the", "film", "movie", "is", "a", "and", "story", "acting", "very", "quite", "plot", "it", "'s", "."]
UNUSED = ["opera", "jazz", "noir"]  # never in tiny_sentences: what a vocabulary kept from the training text drops
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER + UNUSED


def make_tokenizer(folder: Path):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return BertTokenizer.from_pretrained(str(folder))


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    kwargs = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, num_labels=2)
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def tiny_distilbert_config(**overrides):
    from transformers import DistilBertConfig

    kwargs = dict(vocab_size=len(VOCAB), dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                  max_position_embeddings=64, num_labels=2)
    kwargs.update(overrides)
    return DistilBertConfig(**kwargs)


def save_tiny(model, folder: Path) -> Path:
    tokenizer = make_tokenizer(folder)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture
def tiny_bert():
    """A random 2-layer BERT classifier (hidden 32, 4 heads, FFN 64), eval mode."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


@pytest.fixture
def tiny_distilbert():
    from transformers import DistilBertForSequenceClassification

    torch.manual_seed(0)
    return DistilBertForSequenceClassification(tiny_distilbert_config()).eval()


@pytest.fixture
def tiny_bert_dir(tmp_path, tiny_bert):
    """A folder with a tiny random BERT classifier, its config and tokenizer (like a Hub checkpoint)."""
    return save_tiny(tiny_bert, tmp_path / "tiny_bert")


@pytest.fixture
def tiny_distilbert_dir(tmp_path, tiny_distilbert):
    return save_tiny(tiny_distilbert, tmp_path / "tiny_distilbert")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A saved tiny WordPiece tokenizer folder (shared by a test module)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(folder).save_pretrained(str(folder))
    return folder


@pytest.fixture
def tiny_tokenizer(tmp_path):
    return make_tokenizer(tmp_path / "tokenizer")


def tiny_sentences(n: int, seed: int):
    """Learnable toy sentiment: label 1 iff the sentence holds a positive word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_glue_tsv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write("sentence\tlabel\n")
        for sentence, label in rows:
            f.write(f"{sentence}\t{label}\n")
    return path


@pytest.fixture
def glue_dir(tmp_path):
    """A tiny GLUE-format SST-2 folder (train.tsv 400 rows, dev.tsv 60 rows), like SST2_DIR."""
    folder = tmp_path / "glue_sst2"
    write_glue_tsv(folder / "train.tsv", tiny_sentences(400, seed=1))
    write_glue_tsv(folder / "dev.tsv", tiny_sentences(60, seed=2))
    return folder


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Isolated models/ and data/ roots for a test (env MODELS_DIR, DATA_DIR)."""
    models = tmp_path / "models"
    data = tmp_path / "data"
    monkeypatch.setenv("MODELS_DIR", str(models))
    monkeypatch.setenv("DATA_DIR", str(data))
    monkeypatch.setenv("PRESET", "minilm")
    monkeypatch.delenv("QUICK", raising=False)
    monkeypatch.delenv("SST2_DIR", raising=False)
    return tmp_path


def run_script(name: str, *args: str):
    """Run a numbered stage script's main() in-process (they cannot be imported by name)."""
    namespace = runpy.run_path(str(REPO / name), run_name="dpq_test")
    return namespace["main"](list(args))


@pytest.fixture
def shared_sst2():
    if not (SHARED_SST2 / "train.tsv").is_file():
        pytest.skip(f"real SST-2 not found at {SHARED_SST2} (the shared data folder beside the checkout)")
    return SHARED_SST2


def write_stage(model, folder, stage, upstream=(), results=None):
    """A finished stage folder (weights, tokenizer, metadata.json) as the real stage would leave it."""
    from common.stage import stage_output

    with stage_output(folder, stage, {"SEED": 0}, 0) as out:
        for up_folder, up_stage in upstream:
            out.add_upstream(up_folder, up_stage)
        save_tiny(model, out.dir)
        out.results = results if results is not None else {"validation_accuracy": 0.5, "preset": "minilm"}
    return folder


def write_tiny_student(kind: str = "bert"):
    """A tiny random 2-layer student_model stage folder (BERT or DistilBERT, sequence length 128 fits), made from
    the teacher_model folder under MODELS_DIR."""
    from transformers import BertForSequenceClassification, DistilBertForSequenceClassification

    from common.paths import stage_dir

    torch.manual_seed(1)
    if kind == "bert":
        student = BertForSequenceClassification(tiny_bert_config(max_position_embeddings=128))
    else:
        student = DistilBertForSequenceClassification(tiny_distilbert_config(max_position_embeddings=128))
    return write_stage(student, stage_dir("student"), "student", [(stage_dir("teacher"), "teacher")])


def write_tiny_teacher():
    """A tiny random 3-layer teacher_model stage folder under MODELS_DIR (sequence length 128 fits)."""
    from transformers import BertForSequenceClassification

    from common.paths import stage_dir

    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(max_position_embeddings=128, num_hidden_layers=3))
    return write_stage(teacher, stage_dir("teacher"), "teacher")


def write_tiny_teacher_and_student(kind: str = "bert"):
    """Tiny random teacher_model (3 layers) and student_model stage folders under MODELS_DIR."""
    write_tiny_teacher()
    return write_tiny_student(kind)
