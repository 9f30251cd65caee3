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

CPU trap (../shared/docs/stack-notes.md): on CPUs with AVX512-BF16, bnb's `Linear4bit` repacks its weight on the
first eval forward; that path is ~2x slower than fp32, needs out_features divisible by 32, and a checkpoint saved
afterwards is corrupted. Every 4-bit layer made here has `support_avx512bf16_for_cpu = False` (`check_quantized`
verifies it, `save_quantized` refuses a repacked weight), so save -> reload is bit-exact.

Devices: the same code runs on CUDA. `quantize_model` quantizes on the device the model is on (bnb quantizes a
weight when it is moved with `.to(device)`); a loaded or quantized model moves with `model.to("cuda")`.

Saved folder (`save_quantized`): config.json (`config.dpq_quantization` = the settings, plus `dpq_layout` for a
pruned model, plus `auto_map`), model.safetensors (4-bit codes + quantization statistics + the rest), the tokenizer,
and `modeling_dpq.py` + `modeling_dpq_4bit.py`, verbatim copies of the project's loader: with them the folder loads outside this project with
`AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)` (torch, transformers and
bitsandbytes needed), giving the same logits as `common.modeling.load_model(folder)`.
`load_model` sees `dpq_quantization` and calls `load_quantized(folder)`, which runs the one loader in
common/modeling_dpq.py (`load_folder`: skeleton from the config, shrunk to the pruned layout if there is one,
quantized placeholders swapped in, then the saved codes and statistics loaded strictly: nothing is re-quantized)
and then `check_quantized`.

bitsandbytes 0.50.2 cannot save its embedding modules (`_save_to_state_dict` raises NotImplementedError) and has no
loader for pre-quantized `Linear4bit` state outside transformers' quantizer; three small subclasses add exactly
that. They live in common/modeling_dpq_4bit.py (`quant_classes()`); the module swap in common/modeling_dpq.py
(`swap_in_quantized_modules`) that both `quantize_model` (from the real fp32 weights) and the loader (empty
placeholders) use.
"""

import importlib.metadata as md
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from common.modeling_dpq import (classifier_name, head_dense_name, linear_targets, load_folder, quiet_transformers,
                                 ship_code, swap_in_quantized_modules, word_embedding_name)
from common.modeling_dpq_4bit import COMPUTE_DTYPES, QUANT_KEY, import_bitsandbytes

QUANT_TYPES = ("nf4", "fp4")
EMBEDDING_BITS = (4, 8, 32)
BLOCKSIZE = 64  # bnb's default block for 4-bit weights: one absmax per 64 weights
BLOCKSIZES = (32, 64, 128, 256)
WEIGHTS_NAME = "model.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# quantize


def make_settings(quant_type="nf4", double_quant=False, compute_dtype=torch.float32, embedding_bits=8,
                  quantize_head=True, blocksize=BLOCKSIZE) -> dict:
    """The JSON record stored as `config.dpq_quantization`; `load_quantized` rebuilds the model from it."""
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
        return bool(import_bitsandbytes().functional.has_avx512bf16())
    return False


def resolve_compute_dtype(name: str, device) -> str:
    """"auto" -> "bfloat16" where the device has native bf16 matmuls, else "float32"; other names unchanged."""
    if name != "auto":
        return name
    return "bfloat16" if native_bf16(device) else "float32"


def quantize_model(model, quant_type="nf4", double_quant=False, compute_dtype=torch.float32, embedding_bits=8,
                   quantize_head=True, blocksize=BLOCKSIZE):
    """Quantize a BERT / DistilBERT classifier (unpruned or pruned) IN PLACE on its current device; returns it.

    Every Linear of the transformer blocks (and, with `quantize_head`, BERT's pooler dense / DistilBERT's
    pre_classifier) becomes a 4-bit bnb Linear4bit; the word embeddings become 8-bit or 4-bit
    (`embedding_bits`, 32 = leave fp32); the classifier and everything else stay fp32. The settings are recorded
    in `model.config.dpq_quantization`. The model is left in eval mode (4-bit layers are for inference).
    """
    if getattr(model.config, QUANT_KEY, None):
        raise ValueError("this model is already quantized")
    settings = make_settings(quant_type, double_quant, compute_dtype, embedding_bits, quantize_head, blocksize)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model.float()
    swap_in_quantized_modules(model, settings, copy_weights=True)
    setattr(model.config, QUANT_KEY, settings)
    model.eval()
    check_quantized(model)
    return model


# ---------------------------------------------------------------------------------------------------------------
# checks and reports


def check_quantized(model) -> None:
    """Raise if a target Linear is not 4-bit, the classifier is not full precision, or a layer can repack on CPU."""
    bnb = import_bitsandbytes()
    settings = getattr(model.config, QUANT_KEY, None)
    if not settings:
        raise ValueError("model has no dpq_quantization settings in its config")
    problems = []
    for name in linear_targets(model, settings):
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
    classifier = model.get_submodule(classifier_name(model))
    if type(classifier) is not nn.Linear or classifier.weight.dtype not in (torch.float32, torch.float16,
                                                                              torch.bfloat16):
        problems.append(f"classifier: {type(classifier).__name__} {classifier.weight.dtype}, expected full precision")
    if problems:
        raise RuntimeError("quantized model is not as expected:\n  " + "\n  ".join(problems))


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def precision_map(model) -> dict:
    """Per part of the model: how many weights it represents, how it is stored, and its bytes in the state dict."""
    bnb = import_bitsandbytes()
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
    classifier = classifier_name(model)
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
        if key.startswith(classifier + "."):
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
    """Write a self-contained quantized folder (config with auto_map + model.safetensors + tokenizer +
    modeling_dpq.py); return weight bytes."""
    check_quantized(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # clone: bnb shares some statistics tensors between layers, which safetensors refuses to write
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    model.config.save_pretrained(str(folder))
    ship_code(folder)  # modeling_dpq.py + auto_map: loadable with trust_remote_code=True, without this project
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return (folder / WEIGHTS_NAME).stat().st_size


def load_quantized(folder, device=None):
    """Rebuild a folder written by `save_quantized` with the one loader (`common.modeling_dpq.load_folder`: skeleton
    from config -> pruned layout -> quantized placeholders -> the saved 4-bit state, loaded strictly and exactly),
    then `check_quantized`. Eval mode, on CPU unless `device` is given."""
    from transformers import AutoConfig  # in the body: slow to import, only needed here

    quiet_transformers()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a model folder")
    config = AutoConfig.from_pretrained(str(folder))
    settings = getattr(config, QUANT_KEY, None)
    if not settings:
        raise ValueError(f"{folder} is not a quantized folder (no {QUANT_KEY} in config.json)")
    model = load_folder(folder, config=config)  # refuses settings it cannot rebuild (library, dtype, bits)
    check_quantized(model)
    if device is not None:
        model.to(device)
    return model.eval()
