"""The loader of pruned and 4-bit classifiers, shipped into every such model folder as `modeling_dpq.py`.

SELF-CONTAINED: it imports only the standard library, torch and safetensors when imported; transformers when it
builds a model, huggingface_hub for Hub ids and bitsandbytes only for 4-bit folders (through `importlib`, so that
transformers' remote-code check does not require bitsandbytes for fp32 folders). It never imports the project. In the
project it is `common.modeling_dpq`: the one place that knows the model families (`FAMILIES`: BERT, DistilBERT,
RoBERTa; a BERT-shaped family is one more entry) and the one copy of the slicing that pruning uses.

Outside the project (torch + transformers, + bitsandbytes for 4-bit):

    AutoModelForSequenceClassification.from_pretrained(folder_or_hub_id, trust_remote_code=True)

returns the same model, with the same logits, as `common.modeling.load_model(folder)`.

A folder holds config.json of the UNPRUNED architecture plus `dpq_layout` ({"heads": [heads kept per layer], "ffn":
[FFN width per layer]}) for a pruned model and `dpq_quantization` (the bitsandbytes settings) for a 4-bit one, and
model.safetensors (4-bit: bnb's codes with their statistics as `<module>.weight.<stat>` entries). Loading builds the
unpruned skeleton, keeps the first heads / neurons of each layer (the saved weights overwrite them), swaps in empty
bnb placeholders where the folder is 4-bit, and loads the saved state dict STRICTLY. 4-bit: every Linear of the
blocks (and with `quantize_head` the pooler / pre-classifier) is a bnb `Linear4bit` with bnb's AVX512-BF16 CPU repack
path off (slower, and it corrupts checkpoints saved after it ran); the word embeddings are 8- or 4-bit; the rest fp32.
`from_pretrained` takes a folder or Hub id (`revision`, `cache_dir`, `token`, `local_files_only`, `force_download`,
`subfolder`), `config`, `attn_implementation`, `device_map` (one device) and `dtype` (fp32 folders only); anything
else raises TypeError. Folders made with narrowed heads or hidden size (git tag screens-2026-12) are refused.
The bitsandbytes modules live in the sibling file modeling_dpq_4bit.py, shipped with this one.
"""

import importlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .modeling_dpq_4bit import (COMPUTE_DTYPES, QUANT_KEY, check_settings, import_bitsandbytes, module_device,
                                quant_classes)

LAYOUT_KEY = "dpq_layout"  # config attribute: {"heads": [...], "ffn": [...]}
CODE_FILE = "modeling_dpq.py"  # the name this file has inside a model folder
CODE_FILES = (CODE_FILE, "modeling_dpq_4bit.py")  # what a folder ships: this file and the bitsandbytes modules
AUTO_CLASS = "AutoModelForSequenceClassification"
RETIRED_TAG = "screens-2026-12"  # the git tag whose code reads the layouts with narrowed heads or hidden size


# ---------------------------------------------------------------------------------------------------------------
# Model families: everything the project knows about BERT vs DistilBERT (and BERT-shaped RoBERTa) is here


@dataclass(frozen=True)
class Family:
    """Where a family's classifier keeps its parts (dotted module names) and how its config names the sizes."""

    classifier_class: str  # transformers' sequence-classification class
    remote_class: str  # the class of this file that loads a pruned / 4-bit folder of the family
    encoder: str  # the module whose `.layer` lists the transformer blocks
    word_embeddings: str
    head_dense: str | None  # the hidden->hidden Linear before the final classifier (None: there is none)
    classifier: str  # the final hidden->labels Linear (kept fp32 in 4-bit models)
    heads_key: str = "num_attention_heads"  # config attributes: heads, hidden size, FFN width, layers
    hidden_key: str = "hidden_size"
    ffn_key: str = "intermediate_size"
    layers_key: str = "num_hidden_layers"


# model_type -> Family. A BERT-shaped family (blocks with `attention.self.query`..., `intermediate.dense`,
# `output.dense`) needs only an entry here.
FAMILIES = {
    "bert": Family("BertForSequenceClassification", "DPQBertForSequenceClassification", encoder="bert.encoder",
                   word_embeddings="bert.embeddings.word_embeddings", head_dense="bert.pooler.dense",
                   classifier="classifier"),
    "distilbert": Family("DistilBertForSequenceClassification", "DPQDistilBertForSequenceClassification",
                         encoder="distilbert.transformer", word_embeddings="distilbert.embeddings.word_embeddings",
                         head_dense="pre_classifier", classifier="classifier", heads_key="n_heads", hidden_key="dim",
                         ffn_key="hidden_dim", layers_key="n_layers"),
    "roberta": Family("RobertaForSequenceClassification", "DPQRobertaForSequenceClassification",
                      encoder="roberta.encoder", word_embeddings="roberta.embeddings.word_embeddings",
                      head_dense="classifier.dense", classifier="classifier.out_proj"),
}


def family_of(model_or_config) -> Family:
    """The Family of a model, a config object or a config dict (by its `model_type`)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise TypeError(f"unsupported model_type {model_type!r} ({type(model_or_config).__name__}): expected one of "
                        f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def config_sizes(config) -> dict:
    """{"heads", "hidden", "ffn", "layers"} of the unpruned architecture, from a config object or dict."""
    family = family_of(config)
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key)
    return {"heads": get(family.heads_key), "hidden": get(family.hidden_key), "ffn": get(family.ffn_key),
            "layers": get(family.layers_key)}


# ---------------------------------------------------------------------------------------------------------------
# Anatomy of the transformer blocks (BERT-shaped or DistilBERT)


@dataclass
class BlockParts:
    """The pieces of one transformer block that pruning touches."""

    attention: nn.Module  # the module holding the head count
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attn_out: nn.Linear  # input = concatenated heads
    ffn_in: nn.Linear  # rows = neurons
    ffn_out: nn.Linear  # columns = neurons


def encoder_module_name(model) -> str:
    """Dotted name of the module holding the transformer blocks."""
    return family_of(model).encoder


def encoder_layers(model) -> list:
    """The transformer blocks of a classifier of any family in FAMILIES."""
    return list(model.get_submodule(encoder_module_name(model)).layer)


def block_parts(layer) -> BlockParts:
    if hasattr(layer, "intermediate"):  # BertLayer (and the BERT-shaped families: RobertaLayer, ...)
        sa = layer.attention.self
        return BlockParts(sa, sa.query, sa.key, sa.value, layer.attention.output.dense,
                          layer.intermediate.dense, layer.output.dense)
    if hasattr(layer, "ffn"):  # DistilBERT TransformerBlock
        sa = layer.attention
        return BlockParts(sa, sa.q_lin, sa.k_lin, sa.v_lin, sa.out_lin, layer.ffn.lin1, layer.ffn.lin2)
    raise TypeError(f"unsupported transformer block {type(layer).__name__}: expected a BERT-shaped or DistilBERT block")


def head_size(parts: BlockParts) -> int:
    return parts.attention.attention_head_size


def num_heads(parts: BlockParts) -> int:
    return parts.query.out_features // head_size(parts)


def original_sizes(config) -> tuple:
    """(heads, head_size, ffn width, hidden size) of the unpruned architecture, from the config."""
    sizes = config_sizes(config)
    return sizes["heads"], sizes["hidden"] // sizes["heads"], sizes["ffn"], sizes["hidden"]


def get_layout(model) -> dict:
    """{"heads": [heads kept per layer], "ffn": [FFN width per layer]} (JSON-able)."""
    parts = [block_parts(layer) for layer in encoder_layers(model)]
    return {"heads": [num_heads(p) for p in parts], "ffn": [p.ffn_in.out_features for p in parts]}


def config_is_pruned(config) -> bool:
    """Whether a config's layout removes any head or FFN neuron (plain `from_pretrained` cannot load it)."""
    layout = getattr(config, LAYOUT_KEY, None)
    if not layout:
        return False
    heads, _, ffn, _ = original_sizes(config)
    return any(h != heads for h in layout.get("heads", [])) or any(w != ffn for w in layout.get("ffn", []))


# ---------------------------------------------------------------------------------------------------------------
# Physical removal (the one copy of the slicing: common.pruning removes units with these too). A head is a block of
# rows of query/key/value and of columns of the attention-output Linear; an FFN neuron a row of the first FFN Linear
# and a column of the second.


def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep rows (dim 0, output features, with the bias) or columns (dim 1, input features) in place.

    The module object stays the same (hooks and names survive); its Parameters are new, so an optimizer
    holding the old ones must be rebuilt.
    """
    index = index.to(linear.weight.device)
    with torch.no_grad():
        weight = linear.weight.index_select(dim, index).clone()
        bias = None
        if linear.bias is not None:
            bias = linear.bias.index_select(0, index).clone() if dim == 0 else linear.bias.clone()
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    if dim == 0:
        linear.out_features = weight.shape[0]
    else:
        linear.in_features = weight.shape[1]


def kept_record(layer, original_heads: int, original_ffn: int) -> dict:
    """Original indices of the heads and FFN neurons a layer still has (bookkeeping `_dpq_kept` on the layer module;
    not saved)."""
    if not hasattr(layer, "_dpq_kept"):
        layer._dpq_kept = {"heads": list(range(original_heads)), "ffn": list(range(original_ffn))}
    return layer._dpq_kept


def keep_heads(model, layer_idx: int, keep: torch.Tensor) -> None:
    """Keep only the heads `keep` (current numbering, ascending) of one layer; may be empty. The attention forward
    infers the head count from the tensor shape, so a layer may keep 0 heads (it then outputs its output bias)."""
    layer = encoder_layers(model)[layer_idx]
    p = block_parts(layer)
    d = head_size(p)
    keep = torch.as_tensor(keep, dtype=torch.long)
    rows = (keep[:, None] * d + torch.arange(d)[None, :]).reshape(-1)
    for linear in (p.query, p.key, p.value):
        slice_linear(linear, rows, dim=0)
    slice_linear(p.attn_out, rows, dim=1)
    if hasattr(p.attention, "n_heads"):  # DistilBERT
        p.attention.n_heads = len(keep)
    else:
        p.attention.num_attention_heads = len(keep)
        p.attention.all_head_size = len(keep) * d
    oh, _, of, _ = original_sizes(model.config)
    kept = kept_record(layer, oh, of)
    kept["heads"] = [kept["heads"][i] for i in keep.tolist()]


def keep_ffn_neurons(model, layer_idx: int, keep: torch.Tensor) -> None:
    """Keep only the FFN neurons `keep` (current numbering, ascending) of one layer: rows of the first FFN Linear,
    columns of the second."""
    layer = encoder_layers(model)[layer_idx]
    p = block_parts(layer)
    keep = torch.as_tensor(keep, dtype=torch.long)
    slice_linear(p.ffn_in, keep, dim=0)
    slice_linear(p.ffn_out, keep, dim=1)
    oh, _, of, _ = original_sizes(model.config)
    kept = kept_record(layer, oh, of)
    kept["ffn"] = [kept["ffn"][i] for i in keep.tolist()]


def _count_within(value, low: int, high: int) -> bool:
    """A layout entry is an int (not a bool) in low..high."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def validate_layout(model, layout) -> None:
    """Raise ValueError unless `layout` has one head count and one FFN width per layer, each within the model's."""
    if isinstance(layout, dict) and ("head_size" in layout or "hidden" in layout):
        raise ValueError(f"layout {layout!r} narrows the heads or the hidden size, which this code no longer does: "
                         f"read the folder with the code of git tag {RETIRED_TAG}")
    layers = encoder_layers(model)
    current = get_layout(model)
    for key in ("heads", "ffn"):
        values = layout.get(key) if isinstance(layout, dict) else None
        if not isinstance(values, (list, tuple)) or len(values) != len(layers):
            raise ValueError(f"bad pruning layout {layout!r}: expected {{'heads': [...], 'ffn': [...]}} with one entry "
                             f"per layer ({len(layers)} layers)")
        for i, (want, have) in enumerate(zip(values, current[key])):
            if not (isinstance(want, int) and not isinstance(want, bool) and 0 <= want <= have):
                raise ValueError(f"bad pruning layout: layer {i} {key}={want!r}, the model has {have}")


def shrink_to_layout(model, layout: dict) -> None:
    """Shrink a model in place to `layout`, keeping the FIRST heads / neurons of each layer (a skeleton whose weights
    the saved state dict then overwrites), and record the layout in `model.config`."""
    validate_layout(model, layout)
    current = get_layout(model)
    for i in range(len(current["heads"])):
        if layout["heads"][i] < current["heads"][i]:
            keep_heads(model, i, torch.arange(layout["heads"][i]))
        if layout["ffn"][i] < current["ffn"][i]:
            keep_ffn_neurons(model, i, torch.arange(layout["ffn"][i]))
    setattr(model.config, LAYOUT_KEY, get_layout(model))


# ---------------------------------------------------------------------------------------------------------------
# Loading quietly


def quiet_transformers() -> None:
    """transformers logs errors only (no warnings about unused weights or remote code) when the project loads."""
    import transformers  # in the body: importing this file stays cheap

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------------------------
# Which modules are 4-bit / 8-bit, and swapping them in


def head_dense_name(model) -> str | None:
    """The hidden->hidden layer before the classifier (BERT's pooler dense, DistilBERT's pre_classifier, RoBERTa's
    classifier.dense); None when the model has none (a BERT built without pooler)."""
    name = family_of(model).head_dense
    try:
        model.get_submodule(name)
    except AttributeError:
        return None
    return name


def classifier_name(model) -> str:
    """The final hidden->labels Linear."""
    return family_of(model).classifier


def encoder_linear_names(model) -> list:
    """Names of every Linear inside the transformer blocks (attention q/k/v/out, FFN in/out)."""
    encoder = encoder_module_name(model)  # raises TypeError for anything but BERT / DistilBERT
    return [
        name
        for name, module in model.named_modules()
        if name.startswith(encoder + ".") and isinstance(module, nn.Linear)
    ]


def word_embedding_name(model) -> str:
    return family_of(model).word_embeddings


def linear_targets(model, settings: dict) -> list:
    """Names of the Linear layers that are 4-bit under `settings` (empty ones of a fully pruned block included)."""
    names = encoder_linear_names(model)
    head = head_dense_name(model)
    if settings["quantize_head"] and head is not None:
        names.append(head)
    return names


def _set_module(model, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _quantize_on(module: nn.Module, device) -> nn.Module:
    """bnb quantizes a weight when it is moved to a device; on CUDA this is where the 4-bit codes are made."""
    return module.to(device)


def swap_in_quantized_modules(model, settings: dict, copy_weights: bool) -> None:
    """Replace the target modules by bnb modules. copy_weights: take the fp32 weights and quantize them on the
    model's device; else leave empty placeholders on CPU for `load_state_dict` to fill with saved 4-bit state."""
    bnb = import_bitsandbytes()
    Params4bit = bnb.nn.Params4bit
    QuantLinear4bit, QuantEmbedding4bit, QuantEmbedding8bit = quant_classes()
    device = module_device(model)
    compute_dtype = COMPUTE_DTYPES[settings["compute_dtype"]]
    for name in linear_targets(model, settings):
        old = model.get_submodule(name)
        if old.weight.numel() == 0:
            continue  # a block whose heads (or FFN neurons) were all pruned: nothing to store
        new = QuantLinear4bit(
            old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=compute_dtype,
            compress_statistics=settings["double_quant"], quant_type=settings["quant_type"], device="meta",
        )
        new.weight = Params4bit(
            old.weight.data.detach().clone() if copy_weights else torch.empty_like(old.weight, device="cpu"),
            requires_grad=False, blocksize=settings["blocksize"], compress_statistics=settings["double_quant"],
            quant_type=settings["quant_type"], quant_storage=torch.uint8, module=new,
        )
        if old.bias is not None:
            # stored in the compute dtype: bnb's forward would otherwise convert it in place on the first call,
            # so a folder saved after a forward would differ from one saved before
            new.bias = nn.Parameter(old.bias.data.detach().clone().to("cpu", compute_dtype), requires_grad=False)
        new.support_avx512bf16_for_cpu = False
        _set_module(model, name, _quantize_on(new, device) if copy_weights else new)

    bits = settings["embedding_bits"]
    if bits == 32:
        return
    name = word_embedding_name(model)
    old = model.get_submodule(name)
    if bits == 8:
        new = QuantEmbedding8bit(old.num_embeddings, old.embedding_dim, device="meta")
        new.dtype = torch.float32
        data = old.weight.data.detach().clone().float() if copy_weights else torch.empty(
            old.weight.shape, dtype=torch.float32)
        new.weight = bnb.nn.Int8Params(data.cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        new = QuantEmbedding4bit(old.num_embeddings, old.embedding_dim, quant_type=settings["quant_type"],
                                 device="meta")
        new.dtype = torch.float32
        data = old.weight.data.detach().clone().float() if copy_weights else torch.empty(
            old.weight.shape, dtype=torch.float32)
        new.weight = Params4bit(data, requires_grad=False, blocksize=settings["blocksize"],
                                compress_statistics=False, quant_type=settings["quant_type"],
                                quant_storage=torch.uint8, module=new)
    new.padding_idx = old.padding_idx
    _set_module(model, name, _quantize_on(new, device) if copy_weights else new)


# ---------------------------------------------------------------------------------------------------------------
# Building and loading


def model_class_for(config, remote: bool = False):
    """The transformers class for a config's family (`remote`: the DPQ class of this file that loads folders)."""
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(f"unsupported model_type {family!r}: expected one of {', '.join(FAMILIES)}")
    if remote:
        return dpq_model_classes()[FAMILIES[family].remote_class]
    return getattr(importlib.import_module("transformers"), FAMILIES[family].classifier_class)


def build_model(config, model_class=None, attn_implementation: str | None = None):
    """The model a folder with this config holds, with its weights NOT loaded yet: unpruned skeleton (random init)
    -> shrunk to `config.dpq_layout` -> empty bnb placeholders where `config.dpq_quantization` says 4-bit/8-bit.

    `model_class` defaults to transformers' own class of the config's family (`FAMILIES`).
    The model keeps `config` as its config object.
    """
    settings = getattr(config, QUANT_KEY, None)
    if settings:
        check_settings(settings)  # before the (slow) skeleton
    if model_class is None:
        model_class = model_class_for(config)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = model_class._from_config(config, **kwargs)
    layout = getattr(config, LAYOUT_KEY, None)
    if layout:
        shrink_to_layout(model, layout)
    if settings:
        swap_in_quantized_modules(model, settings, copy_weights=False)
    return model


def read_state_dict(folder) -> dict:
    """The weights of a saved folder (safetensors, single file or shards)."""
    folder = Path(folder)
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {folder}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_folder(folder, config=None, model_class=None, attn_implementation: str | None = None):
    """Load a local model folder (plain, pruned or 4-bit): `build_model`, then the saved state dict STRICTLY (no
    missing or unexpected keys). On CPU, in eval mode. `config` defaults to the folder's config.json."""
    from transformers import AutoConfig  # in the body: importing this file stays cheap

    folder = Path(folder)
    if config is None:
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no config.json: not a model folder")
        config = AutoConfig.from_pretrained(str(folder))
    model = build_model(config, model_class, attn_implementation)
    model.load_state_dict(read_state_dict(folder), strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# from_pretrained (what `trust_remote_code=True` runs)

_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")
# accepted and ignored: what AutoModel passes along, and options without meaning here
_IGNORED_KWARGS = ("trust_remote_code", "_from_auto", "adapter_kwargs", "code_revision", "_commit_hash",
                   "low_cpu_mem_usage", "use_safetensors", "proxies")


def resolve_folder(name_or_path, revision=None, cache_dir=None, token=None, local_files_only=False,
                   force_download=False, subfolder=None) -> Path:
    """A local folder as it is, or a Hub repository downloaded (cached) with huggingface_hub."""
    path = Path(name_or_path)
    if not path.is_dir():
        hub = importlib.import_module("huggingface_hub")
        path = Path(hub.snapshot_download(
            str(name_or_path), revision=revision, cache_dir=cache_dir, token=token,
            local_files_only=bool(local_files_only), force_download=bool(force_download),
            allow_patterns=[f"{subfolder}/*"] if subfolder else None,
        ))
    return path / subfolder if subfolder else path


def _device_from_map(device_map):
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = {str(v) for v in device_map.values()}
        if len(devices) != 1:
            raise NotImplementedError(f"device_map {device_map!r}: this model loads onto one device, not several")
        device_map = next(iter(device_map.values()))
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def load_pretrained(model_class, pretrained_model_name_or_path, *model_args, **kwargs):
    """`model_class.from_pretrained` for pruned / 4-bit folders (see the module docstring for the arguments)."""
    from transformers import AutoConfig  # in the body: importing this file stays cheap

    if model_args:
        raise TypeError(f"{model_class.__name__}.from_pretrained takes no positional model arguments")
    config = kwargs.pop("config", None)
    hub = {key: kwargs.pop(key) for key in _HUB_KWARGS if key in kwargs}
    dtype = kwargs.pop("dtype", None)
    torch_dtype = kwargs.pop("torch_dtype", None)
    dtype = torch_dtype if dtype is None else dtype
    device = _device_from_map(kwargs.pop("device_map", None))
    attn_implementation = kwargs.pop("attn_implementation", None)
    if kwargs.get("use_safetensors") is False:
        raise ValueError("these folders hold safetensors weights only")
    for key in _IGNORED_KWARGS:
        kwargs.pop(key, None)
    folder = resolve_folder(pretrained_model_name_or_path, **hub)
    if config is None or isinstance(config, (str, Path)):
        source = folder if config is None else resolve_folder(config, **hub)
        config, kwargs = AutoConfig.from_pretrained(str(source), return_unused_kwargs=True, **kwargs)
    if kwargs:
        raise TypeError(f"{model_class.__name__}.from_pretrained: unsupported arguments {sorted(kwargs)}")
    quantized = bool(getattr(config, QUANT_KEY, None))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    cast = isinstance(dtype, torch.dtype) and dtype != torch.float32
    if cast and quantized:
        raise ValueError(f"dtype {dtype}: a 4-bit folder loads with its saved precision (dtype float32 or None)")
    model = load_folder(folder, config=config, model_class=model_class, attn_implementation=attn_implementation)
    if cast:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()


_MODEL_CLASSES = {}


def dpq_model_classes() -> dict:
    """{name: class} of the DPQ classes of every family (DPQBertForSequenceClassification, ...): transformers'
    classifiers whose `from_pretrained` is `load_pretrained`. Built on first use, so that importing this file does
    not import transformers' model code (seconds); `modeling_dpq.DPQBertForSequenceClassification` (what
    `auto_map` names) builds them through the module `__getattr__` below."""
    if not _MODEL_CLASSES:
        transformers = importlib.import_module("transformers")  # here: slow to import, only needed here

        def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
            return load_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs)

        for family in FAMILIES.values():
            base = getattr(transformers, family.classifier_class)
            cls = type(family.remote_class, (base,), {
                "__doc__": f"{family.classifier_class} whose `from_pretrained` rebuilds pruned / 4-bit folders.",
                "__module__": __name__, "from_pretrained": classmethod(from_pretrained)})
            _MODEL_CLASSES[cls.__name__] = cls  # found as `modeling_dpq.<name>` (pickle, repr)
    return _MODEL_CLASSES


def __getattr__(name):
    """PEP 562: `modeling_dpq.DPQBertForSequenceClassification` (any family's DPQ class, built on first access)."""
    if name in {family.remote_class for family in FAMILIES.values()}:
        return dpq_model_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------------------
# Shipping this file with a folder


def auto_map_for(config) -> dict:
    """{"AutoModelForSequenceClassification": "modeling_dpq.<DPQ class of the config's family>"}."""
    family = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(f"unsupported model_type {family!r}: expected one of {', '.join(FAMILIES)}")
    return {AUTO_CLASS: f"{Path(CODE_FILE).stem}.{FAMILIES[family].remote_class}"}


def ship_code(folder) -> Path:
    """Make a saved folder loadable without this project: copy this file and common/modeling_dpq_4bit.py into it
    (`CODE_FILES`, verbatim) and add `auto_map` (the class for the config's family) to `<folder>/config.json` (other
    entries kept). Returns the path of the copied `modeling_dpq.py`."""
    folder = Path(folder)
    config_file = folder / "config.json"
    data = json.loads(config_file.read_text(encoding="utf-8"))
    data["auto_map"] = {**(data.get("auto_map") or {}), **auto_map_for(data)}
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in CODE_FILES:
        shutil.copyfile(Path(__file__).with_name(name), folder / name)
    return folder / CODE_FILE
