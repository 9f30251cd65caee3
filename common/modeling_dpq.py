"""Loader for pruned and 4-bit classifiers: the project's one loader, the code shipped with them, and the one place
that knows the model families (`FAMILIES`: BERT, DistilBERT, RoBERTa; a BERT-shaped family is one more entry).

This file is SELF-CONTAINED: it imports only the standard library, torch and safetensors when imported,
transformers when it builds or loads a model (importing this file stays cheap), huggingface_hub for Hub ids, and
bitsandbytes only for 4-bit folders, through `importlib` (transformers' remote-code check scans the file's import
statements and would otherwise require bitsandbytes for fp32 folders too). It must never import the project.

Two roles
- In the project it is `common.modeling_dpq`: `common.modeling.load_model`, `common.quantization` (load and
  quantize), `common.pruning` (the slicing) and `common.report` (fp32 twins) all build models with it.
- `ship_code(folder)` copies this very file VERBATIM into a pruned or 4-bit model folder as `modeling_dpq.py` and
  adds `"auto_map": {"AutoModelForSequenceClassification": "modeling_dpq.DPQBertForSequenceClassification"}` (or
  the class of the folder's family) to its config.json. Anyone with torch + transformers (+ bitsandbytes for
  4-bit) can then load the folder without this project:

      AutoModelForSequenceClassification.from_pretrained(folder_or_hub_id, trust_remote_code=True)

  which returns the same model, with the same logits, as `common.modeling.load_model(folder)`. Without
  `trust_remote_code=True` transformers uses its own BERT / DistilBERT class, and a pruned folder fails loudly
  with a size mismatch.

What a folder holds
- config.json of the UNPRUNED architecture (original head count and FFN width), plus
  - `dpq_layout` (LAYOUT_KEY) for a pruned model: {"heads": [heads kept per layer], "ffn": [FFN width per layer]},
    "head_size": [dimensions kept per head, per layer] when any layer's heads were narrowed (absent: the
    original head size everywhere), and "hidden": the hidden size kept when the residual stream was narrowed
    (absent: the original);
  - `dpq_quantization` (QUANT_KEY) for a 4-bit model: the bitsandbytes settings (quant_type, blocksize,
    double_quant, compute_dtype, embedding_bits, quantize_head, ...).
- model.safetensors (or shards model-*.safetensors): the state dict; for 4-bit, bnb's codes plus their
  statistics as `<module>.weight.<stat>` entries (absmax, quant_map, quant_state, SCB, ...).

Loading (`build_model` + `load_folder`): the unpruned skeleton is built from the config, shrunk to the layout
(the first units of each layer are kept: the saved weights overwrite them), the quantized modules are swapped in
as empty placeholders where the config says 4-bit, and the saved state dict is loaded STRICTLY (no missing or
unexpected keys; 4-bit codes are loaded as they are, never re-quantized). transformers' own weight loading is not
used: it does not feed bnb placeholders through `_load_from_state_dict`.

Families: `FAMILIES[model_type]` (a `Family`) names where a classifier keeps its blocks, word embeddings,
hidden->hidden head layer and final classifier, and how its config names heads, hidden size, FFN width and layers;
pruning, quantization, FLOPs, distillation and the report ask it (`family_of`, `config_sizes`, `encoder_layers`,
`head_dense_name`, `classifier_name`, `word_embedding_name`) instead of testing for `model.bert`.

Anatomy: a head is a block of rows of query/key/value and of columns of the attention-output Linear; the
attention module's head count is updated (`num_attention_heads`/`all_head_size` for BERT, `n_heads` for
DistilBERT) and the attention forward infers the head count from the tensor shape, so a layer may keep 0 heads.
An FFN neuron is a row of the first FFN Linear and a column of the second.
A head can also be narrowed (`keep_head_dims`): every head of a layer keeps the same number d' of its d dimensions,
chosen separately for the query/key side (rows of query and key: the terms of q.k) and the value side (rows of value,
columns of the attention output), since the two are independent sums; the module's `attention_head_size` becomes d'
and its `scaling` stays 1/sqrt(d) of the ORIGINAL head size, so a narrowed head computes exactly what the full head
computes with the removed dimensions zeroed.
The residual stream can be narrowed too (`keep_hidden_dims`): the same hidden dimensions go from the embeddings, every
block's Linears and LayerNorms, and the input of the layer before the classifier.

4-bit: every Linear of the transformer blocks (and, with `quantize_head`, BERT's pooler dense / DistilBERT's
pre_classifier) is a bnb `Linear4bit` with `support_avx512bf16_for_cpu = False` (bnb's AVX512-BF16 CPU repack path
is slower and corrupts checkpoints saved after it ran); the word embeddings are bnb `Embedding8bit` or
`Embedding4bit` (`embedding_bits` 8 / 4; 32 = fp32); the classifier and the rest stay fp32. bitsandbytes 0.50 can
neither save its embedding modules nor load pre-quantized `Linear4bit` state outside transformers' quantizer; the
three small subclasses made by `quant_classes()` add exactly that.

`DPQBertForSequenceClassification.from_pretrained` / `DPQDistilBertForSequenceClassification.from_pretrained`
supports: a local folder or a Hub id (downloaded with `huggingface_hub.snapshot_download`; `revision`,
`cache_dir`, `token`, `local_files_only`, `force_download`, `subfolder`); `config` (a config object, or a folder
or id to read one from); extra config attributes as keyword arguments when no config object is given (as in
transformers, e.g. `output_hidden_states=True`); `attn_implementation`; `device_map` as one device ("cpu",
"cuda", "cuda:1", an int, a torch.device, "auto" = cuda if available else cpu, or a dict whose values are all the
same device): the whole model goes there; `dtype` / `torch_dtype`: None, "auto" or float32 for every folder,
another floating dtype only for fp32 (not 4-bit) folders (the model is cast after loading). Accepted and ignored:
`trust_remote_code`, `low_cpu_mem_usage`, `use_safetensors` (only safetensors files exist) and what
AutoModelForSequenceClassification passes along internally. Anything else raises TypeError. The model is
returned in eval mode. Saving a loaded 4-bit model again is the project's job (`common.quantization.save_quantized`),
not `save_pretrained`'s.
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

LAYOUT_KEY = "dpq_layout"  # config attribute: {"heads": [...], "ffn": [...] (, "head_size": [...], "hidden": n)}
QUANT_KEY = "dpq_quantization"  # config attribute: bitsandbytes settings of a 4-bit model
CODE_FILE = "modeling_dpq.py"  # the name this file has inside a model folder
AUTO_CLASS = "AutoModelForSequenceClassification"
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



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
    attn_norm: nn.LayerNorm  # after the attention block's residual sum (the hidden size)
    out_norm: nn.LayerNorm  # after the FFN's residual sum


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
                          layer.intermediate.dense, layer.output.dense, layer.attention.output.LayerNorm,
                          layer.output.LayerNorm)
    if hasattr(layer, "ffn"):  # DistilBERT TransformerBlock
        sa = layer.attention
        return BlockParts(sa, sa.q_lin, sa.k_lin, sa.v_lin, sa.out_lin, layer.ffn.lin1, layer.ffn.lin2,
                          layer.sa_layer_norm, layer.output_layer_norm)
    raise TypeError(f"unsupported transformer block {type(layer).__name__}: expected a BERT-shaped or DistilBERT block")


def head_size(parts: BlockParts) -> int:
    return parts.attention.attention_head_size


def num_heads(parts: BlockParts) -> int:
    return parts.query.out_features // head_size(parts)


def original_sizes(config) -> tuple:
    """(heads, head_size, ffn width, hidden size) of the unpruned architecture, from the config."""
    sizes = config_sizes(config)
    return sizes["heads"], sizes["hidden"] // sizes["heads"], sizes["ffn"], sizes["hidden"]


def embeddings_module(model) -> nn.Module:
    """The module holding the word / position (/ token type) embeddings and their LayerNorm."""
    return model.get_submodule(family_of(model).word_embeddings.rsplit(".", 1)[0])


def hidden_size(model) -> int:
    """The width of the model's residual stream now: the original hidden size unless `keep_hidden_dims` narrowed it
    (read from the embeddings' LayerNorm, which stays fp32 in 4-bit models)."""
    return embeddings_module(model).LayerNorm.normalized_shape[0]


def get_layout(model) -> dict:
    """{"heads": [heads kept per layer], "ffn": [FFN width per layer]} (JSON-able), plus "head_size": [dimensions
    per head, per layer] when any layer's heads are narrower than the original head size, and "hidden": the hidden
    size kept when the residual stream was narrowed."""
    heads, ffn, sizes = [], [], []
    for layer in encoder_layers(model):
        p = block_parts(layer)
        heads.append(num_heads(p))
        ffn.append(p.ffn_in.out_features)
        sizes.append(head_size(p))
    layout = {"heads": heads, "ffn": ffn}
    _, d, _, hidden = original_sizes(model.config)
    if any(size != d for size in sizes):
        layout["head_size"] = sizes
    if hidden_size(model) != hidden:
        layout["hidden"] = hidden_size(model)
    return layout


def head_sizes(model_or_layout, config=None) -> list:
    """Dimensions per head, per layer, of a model or of a layout dict (the original head size where it has none)."""
    if isinstance(model_or_layout, dict):
        _, d, _, _ = original_sizes(config)
        return list(model_or_layout.get("head_size") or [d] * len(model_or_layout["heads"]))
    return [head_size(block_parts(layer)) for layer in encoder_layers(model_or_layout)]


def config_is_pruned(config) -> bool:
    """Whether a config's layout removes any head, head dimension, FFN neuron or hidden dimension (plain
    `from_pretrained` cannot load it)."""
    layout = getattr(config, LAYOUT_KEY, None)
    if not layout:
        return False
    heads, d, ffn, hidden = original_sizes(config)
    return (any(h != heads for h in layout.get("heads", [])) or any(w != ffn for w in layout.get("ffn", []))
            or any(size != d for size in layout.get("head_size") or []) or layout.get("hidden", hidden) != hidden)


# ---------------------------------------------------------------------------------------------------------------
# Physical removal (the one copy of the slicing: common.pruning removes units with these too)


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
    """Original indices of the units a layer still has (bookkeeping `_dpq_kept` on the layer module; not saved):
    heads, FFN neurons, and once a head was narrowed, "qk_dims" / "v_dims": per kept head, its original dimensions."""
    if not hasattr(layer, "_dpq_kept"):
        layer._dpq_kept = {"heads": list(range(original_heads)), "ffn": list(range(original_ffn))}
    return layer._dpq_kept


def _set_head_geometry(attention, heads: int, size: int) -> None:
    """The head count and head size an attention module uses (its forward reshapes to (..., -1, head size))."""
    if hasattr(attention, "n_heads"):  # DistilBERT
        attention.n_heads = heads
    else:
        attention.num_attention_heads = heads
        attention.all_head_size = heads * size
    attention.attention_head_size = size


def keep_heads(model, layer_idx: int, keep: torch.Tensor) -> None:
    """Keep only the heads `keep` (current numbering, ascending) of one layer; may be empty."""
    layer = encoder_layers(model)[layer_idx]
    p = block_parts(layer)
    d = head_size(p)
    keep = torch.as_tensor(keep, dtype=torch.long)
    rows = (keep[:, None] * d + torch.arange(d)[None, :]).reshape(-1)
    for linear in (p.query, p.key, p.value):
        slice_linear(linear, rows, dim=0)
    slice_linear(p.attn_out, rows, dim=1)
    _set_head_geometry(p.attention, len(keep), d)
    oh, _, of, _ = original_sizes(model.config)
    kept = kept_record(layer, oh, of)
    kept["heads"] = [kept["heads"][i] for i in keep.tolist()]
    for key in ("qk_dims", "v_dims"):
        if key in kept:
            kept[key] = [kept[key][i] for i in keep.tolist()]


def keep_head_dims(model, layer_idx: int, qk_keep, v_keep) -> None:
    """Narrow every head of one layer to d' dimensions: `qk_keep` / `v_keep` are [heads, d'] (current numbering within
    each head, ascending per row): the query/key dimensions and the value dimensions each head keeps. The module's
    `scaling` is left as it is (1/sqrt of the original head size), so the result equals the wider head with the other
    dimensions zeroed."""
    layer = encoder_layers(model)[layer_idx]
    p = block_parts(layer)
    n, d = num_heads(p), head_size(p)
    qk_keep = torch.as_tensor(qk_keep, dtype=torch.long)
    v_keep = torch.as_tensor(v_keep, dtype=torch.long)
    if qk_keep.dim() != 2 or qk_keep.shape[0] != n or qk_keep.shape != v_keep.shape:
        raise ValueError(f"layer {layer_idx}: query/key keep {tuple(qk_keep.shape)} and value keep "
                         f"{tuple(v_keep.shape)} must both be [{n} heads, kept dimensions] (every head has one size)")
    offsets = (torch.arange(n) * d)[:, None]
    qk_rows, v_rows = (qk_keep + offsets).reshape(-1), (v_keep + offsets).reshape(-1)
    slice_linear(p.query, qk_rows, dim=0)
    slice_linear(p.key, qk_rows, dim=0)
    slice_linear(p.value, v_rows, dim=0)
    slice_linear(p.attn_out, v_rows, dim=1)
    _set_head_geometry(p.attention, n, qk_keep.shape[1])
    oh, od, of, _ = original_sizes(model.config)
    kept = kept_record(layer, oh, of)
    for key, keep in (("qk_dims", qk_keep), ("v_dims", v_keep)):
        before = kept.get(key) or [list(range(od)) for _ in range(n)]
        kept[key] = [[before[h][i] for i in row] for h, row in enumerate(keep.tolist())]


def keep_ffn_neurons(model, layer_idx: int, keep: torch.Tensor) -> None:
    """Keep only the FFN neurons `keep` (current numbering, ascending) of one layer."""
    layer = encoder_layers(model)[layer_idx]
    p = block_parts(layer)
    keep = torch.as_tensor(keep, dtype=torch.long)
    slice_linear(p.ffn_in, keep, dim=0)
    slice_linear(p.ffn_out, keep, dim=1)
    oh, _, of, _ = original_sizes(model.config)
    kept = kept_record(layer, oh, of)
    kept["ffn"] = [kept["ffn"][i] for i in keep.tolist()]


def _slice_norm(norm: nn.LayerNorm, index: torch.Tensor) -> None:
    """Keep the features `index` of a LayerNorm (it then normalises over those alone)."""
    index = index.to(norm.weight.device)
    for name in ("weight", "bias"):
        old = getattr(norm, name)
        if old is not None:
            kept = old.detach().index_select(0, index).clone()
            setattr(norm, name, nn.Parameter(kept, requires_grad=old.requires_grad))
    norm.normalized_shape = (len(index),)


def keep_hidden_dims(model, keep: torch.Tensor) -> None:
    """Keep only the hidden dimensions `keep` (current numbering, ascending) of the residual stream, in every module
    that reads or writes it: the embeddings (word, position, token type) and their LayerNorm; in every block the
    input columns of query, key, value and the first FFN Linear, the output rows of the attention-output and second FFN
    Linear, and both LayerNorms; the input columns of the layer before the classifier (`head_dense_name`, or the
    classifier itself when there is none). The LayerNorms then normalise over the kept dimensions only, so this is
    NOT the model with the other dimensions zeroed (CoFi's hidden pruning, Xia et al. 2022, does the same).
    Bookkeeping of the original indices kept: `_dpq_kept_hidden` on the embeddings module (not saved)."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    embeddings = embeddings_module(model)
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        table = getattr(embeddings, name, None)
        if isinstance(table, nn.Embedding):
            old = table.weight
            table.weight = nn.Parameter(old.detach().index_select(1, keep.to(old.device)).clone(),
                                        requires_grad=old.requires_grad)
            table.embedding_dim = len(keep)
    _slice_norm(embeddings.LayerNorm, keep)
    for layer in encoder_layers(model):
        p = block_parts(layer)
        for linear in (p.query, p.key, p.value, p.ffn_in):
            slice_linear(linear, keep, dim=1)
        for linear in (p.attn_out, p.ffn_out):
            slice_linear(linear, keep, dim=0)
        _slice_norm(p.attn_norm, keep)
        _slice_norm(p.out_norm, keep)
    slice_linear(model.get_submodule(head_dense_name(model) or classifier_name(model)), keep, dim=1)
    before = getattr(embeddings, "_dpq_kept_hidden", None) or list(range(original_sizes(model.config)[3]))
    embeddings._dpq_kept_hidden = [before[i] for i in keep.tolist()]


def _count_within(value, low: int, high: int) -> bool:
    """A layout entry is an int (not a bool) in low..high."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def validate_layout(model, layout) -> None:
    """Raise ValueError unless `layout` has one head count and one FFN width per layer (and, optionally, one head size
    per layer, at least 1), each within the model's."""
    layers = encoder_layers(model)
    current = get_layout(model)
    current["head_size"] = head_sizes(model)
    keys = ("heads", "ffn", "head_size") if isinstance(layout, dict) and "head_size" in layout else ("heads", "ffn")
    for key in keys:
        values = layout.get(key) if isinstance(layout, dict) else None
        if not isinstance(values, (list, tuple)) or len(values) != len(layers):
            raise ValueError(
                f"bad pruning layout {layout!r}: expected {{'heads': [...], 'ffn': [...]}} (and optionally "
                f"'head_size': [...]) with one entry per layer ({len(layers)} layers)"
            )
        low = 1 if key == "head_size" else 0
        for i, (want, have) in enumerate(zip(values, current[key])):
            if not _count_within(want, low, have):
                raise ValueError(f"bad pruning layout: layer {i} {key}={want!r}, the model has {have}")
    if isinstance(layout, dict) and "hidden" in layout:
        want, have = layout["hidden"], hidden_size(model)
        if not _count_within(want, 1, have):
            raise ValueError(f"bad pruning layout: hidden={want!r}, the model has {have} hidden dimensions")


def shrink_to_layout(model, layout: dict) -> None:
    """Shrink a model in place to `layout`, keeping the FIRST heads / neurons / head dimensions of each layer and the
    first hidden dimensions (a skeleton whose weights the saved state dict then overwrites), and record the layout in
    `model.config`."""
    validate_layout(model, layout)
    current = get_layout(model)
    sizes = head_sizes(model)
    for i in range(len(current["heads"])):
        if layout["heads"][i] < current["heads"][i]:
            keep_heads(model, i, torch.arange(layout["heads"][i]))
        if "head_size" in layout and layout["head_size"][i] < sizes[i]:
            keep = torch.arange(layout["head_size"][i]).expand(layout["heads"][i], -1)
            keep_head_dims(model, i, keep, keep)
        if layout["ffn"][i] < current["ffn"][i]:
            keep_ffn_neurons(model, i, torch.arange(layout["ffn"][i]))
    if layout.get("hidden", hidden_size(model)) < hidden_size(model):
        keep_hidden_dims(model, torch.arange(layout["hidden"]))
    setattr(model.config, LAYOUT_KEY, get_layout(model))


# ---------------------------------------------------------------------------------------------------------------
# bitsandbytes: saveable / loadable 4-bit and 8-bit modules (built lazily: importing this file never imports bnb)


def quiet_transformers() -> None:
    """transformers logs errors only (no warnings about unused weights or remote code) when the project loads."""
    import transformers  # in the body: importing this file stays cheap

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def import_bitsandbytes():
    """bitsandbytes, imported on first use (its import logs a harmless line about the `kernels` package)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return importlib.import_module("bitsandbytes")


def _quant_stats(state_dict: dict, prefix: str) -> dict:
    """The `weight.<stat>` entries bnb saves beside a 4-bit weight (absmax, quant_map, packed quant_state, ...)."""
    stat_prefix = prefix + "weight."
    return {key[len(stat_prefix):]: state_dict[key] for key in list(state_dict) if key.startswith(stat_prefix)}


def module_device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _load_prequantized_4bit(module, state_dict, prefix) -> list:
    """Replace `module.weight` by the saved 4-bit codes + statistics (no re-quantization); the keys it used."""
    Params4bit = import_bitsandbytes().nn.Params4bit

    weight = state_dict.get(prefix + "weight")
    stats = _quant_stats(state_dict, prefix)
    if weight is None or not stats:
        return []  # not a pre-quantized entry: nn.Module's loader reports what is missing or mismatched
    device = module_device(module)
    module.weight = Params4bit.from_prequantized(
        data=weight.detach().clone(), quantized_stats=dict(stats), requires_grad=False, device=device, module=module
    )
    return [prefix + "weight." + name for name in stats]


def _accept_stat_keys(used: list, unexpected_keys: list) -> None:
    """nn.Module reports `weight.<stat>` keys as unexpected (it expects a submodule named `weight`); the ones a
    module consumed are not."""
    for key in used:
        if key in unexpected_keys:
            unexpected_keys.remove(key)


def _save_4bit(module, destination, prefix, keep_vars) -> None:
    """Weight codes, then the quantization statistics as `weight.<stat>` (bnb's own packed format)."""
    nn.Module._save_to_state_dict(module, destination, prefix, keep_vars)
    quant_state = getattr(module.weight, "quant_state", None)
    if quant_state is None:
        raise RuntimeError(f"{prefix}weight is not quantized yet: move the module with .to(device) first")
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise RuntimeError(
            f"{prefix}weight was repacked by bnb's AVX512-BF16 path; saving it would corrupt the checkpoint"
        )
    for key, value in quant_state.as_dict(packed=True).items():
        destination[prefix + "weight." + key] = value if keep_vars else value.detach()


def _make_classes():
    """The saveable subclasses, built on first use so that importing this module does not import bitsandbytes."""
    bnb = import_bitsandbytes()
    Int8Params = bnb.nn.Int8Params

    class QuantLinear4bit(bnb.nn.Linear4bit):
        """bnb `Linear4bit` that never takes the AVX512-BF16 repack path and loads pre-quantized state."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.support_avx512bf16_for_cpu = False

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
            used = _load_prequantized_4bit(self, state_dict, prefix)
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
            _accept_stat_keys(used, unexpected)

    class QuantEmbedding4bit(bnb.nn.Embedding4bit):
        """bnb `Embedding4bit` (blockwise NF4/FP4 rows) that can be saved and reloaded."""

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            _save_4bit(self, destination, prefix, keep_vars)

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
            used = _load_prequantized_4bit(self, state_dict, prefix)
            nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected,
                                            errors)
            _accept_stat_keys(used, unexpected)

    class QuantEmbedding8bit(bnb.nn.Embedding8bit):
        """bnb `Embedding8bit` (int8 per row, fp32 row absmax `SCB`) that can be saved, reloaded and moved."""

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            scb = getattr(self.weight, "SCB", None)
            if scb is None:
                raise RuntimeError(f"{prefix}weight is not quantized yet: move the module with .to(device) first")
            nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
            destination[prefix + "weight.SCB"] = scb if keep_vars else scb.detach()

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
            weight = state_dict.get(prefix + "weight")
            scb = state_dict.get(prefix + "weight.SCB")
            used = []
            if weight is not None and scb is not None and weight.dtype == torch.int8:
                device = module_device(self)
                data = weight.detach().clone().to(device)
                self.weight = Int8Params(
                    data, requires_grad=False, has_fp16_weights=False, CB=data, SCB=scb.detach().clone().to(device)
                )
                used = [prefix + "weight.SCB"]
            nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected,
                                            errors)
            _accept_stat_keys(used, unexpected)

        def _apply(self, fn, recurse=True):
            # nn.Module moves `weight.data` but not the row scales bnb keeps as an attribute of the parameter
            super()._apply(fn, recurse)
            scb = getattr(self.weight, "SCB", None)
            if scb is not None and scb.device != self.weight.device:
                self.weight.SCB = scb.to(self.weight.device)
            if getattr(self.weight, "CB", None) is not None:
                self.weight.CB = self.weight.data
            return self

    return QuantLinear4bit, QuantEmbedding4bit, QuantEmbedding8bit


_CLASSES = None


def quant_classes():
    """(QuantLinear4bit, QuantEmbedding4bit, QuantEmbedding8bit), built on first use."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _make_classes()
    return _CLASSES


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


def check_settings(settings) -> None:
    """Raise ValueError for quantization settings this loader cannot rebuild."""
    if not isinstance(settings, dict) or settings.get("library") != "bitsandbytes":
        library = settings.get("library") if isinstance(settings, dict) else settings
        raise ValueError(f"unsupported quantization library {library!r} in config.{QUANT_KEY}")
    if settings.get("compute_dtype") not in COMPUTE_DTYPES:
        raise ValueError(f"config.{QUANT_KEY}: unsupported compute_dtype {settings.get('compute_dtype')!r}")
    if settings.get("embedding_bits") not in (4, 8, 32):
        raise ValueError(f"config.{QUANT_KEY}: unsupported embedding_bits {settings.get('embedding_bits')!r}")


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
    """Make a saved folder loadable without this project: copy this file's own source to `<folder>/modeling_dpq.py`
    and add `auto_map` (the class for the config's family) to `<folder>/config.json` (other entries kept).
    Returns the path of the copied file."""
    folder = Path(folder)
    config_file = folder / "config.json"
    data = json.loads(config_file.read_text(encoding="utf-8"))
    data["auto_map"] = {**(data.get("auto_map") or {}), **auto_map_for(data)}
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    target = folder / CODE_FILE
    shutil.copyfile(Path(__file__), target)
    return target
