"""Real 4-bit weights with bitsandbytes: quantize a BERT / DistilBERT classifier, save it, load it back.

What is stored in what precision (defaults; `precision_map(model)` reports the real numbers per part):

  part                                                  stored as
  every Linear of the transformer blocks (attention     bnb `Linear4bit`: NF4 (or FP4) codes, 2 per byte, one fp32
  q, k, v, out; FFN in, out)                            absmax per block of 64 weights (8-bit absmax with double
                                                        quantization); bias in the compute dtype
  head dense: BERT `pooler.dense`, DistilBERT           the same 4-bit (`quantize_head=False` keeps it fp32)
  `pre_classifier`
  final `classifier` (hidden -> 2)                      fp32 (770 weights; a 2-way 4-bit layer fails on CPU)
  word embeddings (11.7M of the MiniLM student's        `embedding_bits=8`: bnb `Embedding8bit`, int8 per row +
  17.4M parameters)                                     fp32 row scale; `4`: bnb `Embedding4bit` in the same
                                                        quant_type; `32`: left fp32
  position / token-type embeddings, LayerNorms, other   fp32
  biases

Layers pruned to nothing (a block that kept no attention head) have no weights and stay as they are.

Compute: each 4-bit weight is dequantized on the fly to `compute_dtype` and multiplied with bnb's default CPU path
(dequantize + torch matmul), so a 4-bit model runs the same matmuls as its fp32 twin: 4-bit saves disk and memory,
not FLOPs. With compute_dtype float32 the per-forward dequantization costs ~2% at batch 32 and ~10% at batch 1 on
MiniLM-sized layers; bfloat16 (bnb's usual `bnb_4bit_compute_dtype`) makes the matmuls themselves faster on CPUs
with AVX512-BF16 and on GPUs (`resolve_compute_dtype("auto", device)` picks it where it is native).

CPU trap (docs/stack-notes.md): on CPUs with AVX512-BF16, bnb's `Linear4bit` repacks its weight on the first eval
forward; that path is ~2x slower than fp32, needs out_features divisible by 32, and a checkpoint saved afterwards
is corrupted. Every 4-bit layer made here has `support_avx512bf16_for_cpu = False` (`check_quantized` verifies
it, `save_quantized` refuses a repacked weight), so save -> reload is bit-exact.

Devices: the same code runs on CUDA. `quantize_model` quantizes on the device the model is on (bnb quantizes a
weight when it is moved with `.to(device)`); a loaded or quantized model moves with `model.to("cuda")`.

Saved folder (`save_quantized`): config.json (`config.dpq_quantization` = the settings, plus `dpq_layout` for a
pruned model), model.safetensors (4-bit codes + quantization statistics + the rest) and the tokenizer.
`common.modeling.load_model(folder)` sees `dpq_quantization` and calls `load_quantized(folder)`: skeleton from the
config, shrunk to the pruned layout if there is one, quantized modules swapped in, then the saved codes and
statistics loaded strictly (nothing is re-quantized).

bitsandbytes 0.50.2 cannot save its embedding modules (`_save_to_state_dict` raises NotImplementedError) and has no
loader for pre-quantized `Linear4bit` state outside transformers' quantizer; the three small subclasses below add
exactly that.
"""

from pathlib import Path

import torch
from torch import nn

QUANT_TYPES = ("nf4", "fp4")
EMBEDDING_BITS = (4, 8, 32)
BLOCKSIZE = 64  # bnb's default block for 4-bit weights: one absmax per 64 weights
BLOCKSIZES = (32, 64, 128, 256)
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHTS_NAME = "model.safetensors"


def _bnb():
    """bitsandbytes, imported on first use (its import logs a harmless line about the `kernels` package)."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


def _quant_stats(state_dict: dict, prefix: str) -> dict:
    """The `weight.<stat>` entries bnb saves beside a 4-bit weight (absmax, quant_map, packed quant_state, ...)."""
    stat_prefix = prefix + "weight."
    return {key[len(stat_prefix):]: state_dict[key] for key in list(state_dict) if key.startswith(stat_prefix)}


def _module_device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _load_prequantized_4bit(module, state_dict, prefix) -> list:
    """Replace `module.weight` by the saved 4-bit codes + statistics (no re-quantization); the keys it used."""
    Params4bit = _bnb().nn.Params4bit

    weight = state_dict.get(prefix + "weight")
    stats = _quant_stats(state_dict, prefix)
    if weight is None or not stats:
        return []  # not a pre-quantized entry: nn.Module's loader reports what is missing or mismatched
    device = _module_device(module)
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
    bnb = _bnb()
    from bitsandbytes.nn import Int8Params

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
                device = _module_device(self)
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
    """(QuantLinear4bit, QuantEmbedding4bit, QuantEmbedding8bit)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _make_classes()
    return _CLASSES


# ---------------------------------------------------------------------------------------------------------------
# which modules are quantized


def head_dense_name(model) -> str | None:
    """The hidden->hidden layer before the classifier: BERT's pooler dense, DistilBERT's pre_classifier."""
    if hasattr(model, "distilbert"):
        return "pre_classifier"
    if getattr(model.bert, "pooler", None) is not None:
        return "bert.pooler.dense"
    return None


def encoder_linear_names(model) -> list:
    """Names of every Linear inside the transformer blocks (attention q/k/v/out, FFN in/out)."""
    from common.flops import encoder_module_name

    encoder = encoder_module_name(model)  # raises TypeError for anything but BERT / DistilBERT
    return [
        name
        for name, module in model.named_modules()
        if name.startswith(encoder + ".") and isinstance(module, nn.Linear)
    ]


def word_embedding_name(model) -> str:
    return "bert.embeddings.word_embeddings" if hasattr(model, "bert") else "distilbert.embeddings.word_embeddings"


def _set_module(model, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# ---------------------------------------------------------------------------------------------------------------
# quantize


def make_settings(quant_type="nf4", double_quant=False, compute_dtype=torch.float32, embedding_bits=8,
                  quantize_head=True, blocksize=BLOCKSIZE) -> dict:
    """The JSON record stored as `config.dpq_quantization`; `load_quantized` rebuilds the model from it."""
    import importlib.metadata as md

    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type {quant_type!r}: use one of {QUANT_TYPES}")
    if embedding_bits not in EMBEDDING_BITS:
        raise ValueError(f"embedding_bits {embedding_bits!r}: use one of {EMBEDDING_BITS}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize!r}: use one of {BLOCKSIZES}")
    if isinstance(compute_dtype, torch.dtype):
        compute_dtype = str(compute_dtype).replace("torch.", "")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype {compute_dtype!r}: use one of {tuple(COMPUTE_DTYPES)}")
    return {
        "library": "bitsandbytes",
        "bitsandbytes_version": md.version("bitsandbytes"),
        "quant_type": quant_type,
        "double_quant": bool(double_quant),
        "blocksize": int(blocksize),
        "compute_dtype": compute_dtype,
        "embedding_bits": int(embedding_bits),
        "quantize_head": bool(quantize_head),
        "classifier": "fp32",
    }


def native_bf16(device) -> bool:
    """Whether `device` runs bf16 matmuls natively: CUDA with bf16 support, or a CPU with AVX512-BF16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(_bnb().functional.has_avx512bf16())
    return False


def resolve_compute_dtype(name: str, device) -> str:
    """"auto" -> "bfloat16" where the device has native bf16 matmuls, else "float32"; other names unchanged."""
    if name != "auto":
        return name
    return "bfloat16" if native_bf16(device) else "float32"


def _linear_targets(model, settings: dict) -> list:
    names = encoder_linear_names(model)
    head = head_dense_name(model)
    if settings["quantize_head"] and head is not None:
        names.append(head)
    return names


def _swap_in_quantized_modules(model, settings: dict, copy_weights: bool) -> None:
    """Replace the target modules by bnb modules. copy_weights: take the fp32 weights and quantize them on the
    model's device; else leave empty placeholders on CPU for `load_state_dict` to fill with saved 4-bit state."""
    bnb = _bnb()
    Params4bit = bnb.nn.Params4bit
    QuantLinear4bit, QuantEmbedding4bit, QuantEmbedding8bit = quant_classes()
    device = _module_device(model)
    compute_dtype = COMPUTE_DTYPES[settings["compute_dtype"]]
    for name in _linear_targets(model, settings):
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


def _quantize_on(module: nn.Module, device) -> nn.Module:
    """bnb quantizes a weight when it is moved to a device; on CUDA this is where the 4-bit codes are made."""
    return module.to(device)


def quantize_model(model, quant_type="nf4", double_quant=False, compute_dtype=torch.float32, embedding_bits=8,
                   quantize_head=True, blocksize=BLOCKSIZE):
    """Quantize a BERT / DistilBERT classifier (unpruned or pruned) IN PLACE on its current device; returns it.

    Every Linear of the transformer blocks (and, with `quantize_head`, BERT's pooler dense / DistilBERT's
    pre_classifier) becomes a 4-bit bnb Linear4bit; the word embeddings become 8-bit or 4-bit
    (`embedding_bits`, 32 = leave fp32); the classifier and everything else stay fp32. The settings are recorded
    in `model.config.dpq_quantization`. The model is left in eval mode (4-bit layers are for inference).
    """
    from common.modeling import QUANT_KEY

    if getattr(model.config, QUANT_KEY, None):
        raise ValueError("this model is already quantized")
    settings = make_settings(quant_type, double_quant, compute_dtype, embedding_bits, quantize_head, blocksize)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model.float()
    _swap_in_quantized_modules(model, settings, copy_weights=True)
    setattr(model.config, QUANT_KEY, settings)
    model.eval()
    check_quantized(model)
    return model


# ---------------------------------------------------------------------------------------------------------------
# checks and reports


def check_quantized(model) -> None:
    """Raise if a target Linear is not 4-bit, the classifier is not full precision, or a layer can repack on CPU."""
    from common.modeling import QUANT_KEY

    bnb = _bnb()
    settings = getattr(model.config, QUANT_KEY, None)
    if not settings:
        raise ValueError("model has no dpq_quantization settings in its config")
    problems = []
    for name in _linear_targets(model, settings):
        module = model.get_submodule(name)
        if isinstance(module, bnb.nn.Linear4bit):
            if module.support_avx512bf16_for_cpu:
                problems.append(f"{name}: support_avx512bf16_for_cpu is on (corrupting CPU repack path)")
            if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
                problems.append(f"{name}: weight was repacked for AVX512-BF16")
            if not getattr(module.weight, "bnb_quantized", False):
                problems.append(f"{name}: weight not quantized")
        elif not (isinstance(module, nn.Linear) and module.weight.numel() == 0):
            problems.append(f"{name}: {type(module).__name__}, expected a 4-bit Linear4bit")
    classifier = model.classifier
    if type(classifier) is not nn.Linear or classifier.weight.dtype not in (torch.float32, torch.float16,
                                                                              torch.bfloat16):
        problems.append(f"classifier: {type(classifier).__name__} {classifier.weight.dtype}, expected full precision")
    if problems:
        raise RuntimeError("quantized model is not as expected:\n  " + "\n  ".join(problems))


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def precision_map(model) -> dict:
    """Per part of the model: how many weights it represents, how it is stored, and its bytes in the state dict."""
    from common.modeling import QUANT_KEY

    bnb = _bnb()
    settings = getattr(model.config, QUANT_KEY)
    state = model.state_dict()
    parts = {}

    def add(part, storage, params, keys):
        entry = parts.setdefault(part, {"storage": storage, "parameters": 0, "bytes": 0})
        if storage not in entry["storage"].split("; "):
            entry["storage"] += "; " + storage  # e.g. biases: compute dtype in 4-bit layers, fp32 elsewhere
        entry["parameters"] += params
        entry["bytes"] += _tensor_bytes(state[k] for k in keys)
        done.update(keys)

    done = set()

    def four_bit(double_quant: bool) -> str:
        absmax = "8-bit (double quant)" if double_quant else "fp32"
        return f"{settings['quant_type']} 4-bit, blocksize {settings['blocksize']}, absmax {absmax}"

    head = head_dense_name(model)
    embedding = word_embedding_name(model)
    def weight_keys(name):  # the weight and its quantization statistics (`weight.absmax`, `weight.SCB`, ...)
        return [k for k in state if k == f"{name}.weight" or k.startswith(f"{name}.weight.")]

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            part = "head_dense_weights" if name == head else "encoder_linear_weights"
            add(part, four_bit(settings["double_quant"]), module.in_features * module.out_features,
                weight_keys(name))
        elif name == embedding and settings["embedding_bits"] != 32:
            storage = "int8 per row + fp32 row scale" if settings["embedding_bits"] == 8 else four_bit(False)
            add("word_embeddings", storage, module.num_embeddings * module.embedding_dim, weight_keys(name))
    for key, tensor in state.items():
        if key in done or tensor.numel() == 0:  # empty: a block whose heads were all pruned
            continue
        if key.startswith("classifier."):
            part = "classifier"
        elif "LayerNorm" in key or "layer_norm" in key:
            part = "layer_norms"
        elif key.endswith(".bias"):
            part = "biases"
        elif key == f"{embedding}.weight":
            part = "word_embeddings"
        elif key == f"{head}.weight":
            part = "head_dense_weights"
        elif "embeddings" in key:
            part = "position_and_token_type_embeddings"
        else:
            part = "other"
        add(part, str(tensor.dtype).replace("torch.", ""), tensor.numel(), [key])
    return dict(sorted(parts.items()))


# ---------------------------------------------------------------------------------------------------------------
# save / load


def save_quantized(model, tokenizer, folder) -> int:
    """Write a self-contained quantized folder (config + model.safetensors + tokenizer); return weight bytes."""
    from safetensors.torch import save_file

    check_quantized(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # clone: bnb shares some statistics tensors between layers, which safetensors refuses to write
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    model.config.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return (folder / WEIGHTS_NAME).stat().st_size


def load_quantized(folder, device=None):
    """Rebuild a folder written by `save_quantized`: skeleton from config -> pruned layout -> quantized modules ->
    the saved 4-bit state, loaded strictly and exactly. Eval mode, on CPU unless `device` is given."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from common.modeling import LAYOUT_KEY, QUANT_KEY, quiet_transformers, read_state_dict

    quiet_transformers()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a model folder")
    config = AutoConfig.from_pretrained(str(folder))
    settings = getattr(config, QUANT_KEY, None)
    if not settings:
        raise ValueError(f"{folder} is not a quantized folder (no {QUANT_KEY} in config.json)")
    if settings.get("library") != "bitsandbytes":
        raise ValueError(f"{folder}: unsupported quantization library {settings.get('library')!r}")
    model = AutoModelForSequenceClassification.from_config(config)
    layout = getattr(config, LAYOUT_KEY, None)
    if layout:
        from common.pruning import apply_layout

        apply_layout(model, layout)
    _swap_in_quantized_modules(model, settings, copy_weights=False)
    model.load_state_dict(read_state_dict(folder), strict=True)
    check_quantized(model)
    if device is not None:
        model.to(device)
    return model.eval()
