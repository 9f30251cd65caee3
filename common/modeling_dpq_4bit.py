"""The bitsandbytes modules of 4-bit folders: shipped with modeling_dpq.py into every pruned or 4-bit model folder.

SELF-CONTAINED like modeling_dpq.py: the standard library and torch when imported, bitsandbytes on first use
(through `importlib`, so that importing this file, or transformers' remote-code check, never needs it). bitsandbytes
0.50 can neither save its embedding modules nor load pre-quantized `Linear4bit` state outside transformers' quantizer;
the three small subclasses made by `quant_classes()` add exactly that, and `Linear4bit` never takes bnb's AVX512-BF16
CPU repack path (slower, and a checkpoint saved after it ran is corrupt).
"""

import importlib
import logging

import torch
from torch import nn

QUANT_KEY = "dpq_quantization"  # the config attribute with a 4-bit model's bitsandbytes settings
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_settings(settings) -> None:
    """Raise ValueError for quantization settings this loader cannot rebuild."""
    if not isinstance(settings, dict) or settings.get("library") != "bitsandbytes":
        library = settings.get("library") if isinstance(settings, dict) else settings
        raise ValueError(f"unsupported quantization library {library!r} in config.{QUANT_KEY}")
    if settings.get("compute_dtype") not in COMPUTE_DTYPES:
        raise ValueError(f"config.{QUANT_KEY}: unsupported compute_dtype {settings.get('compute_dtype')!r}")
    if settings.get("embedding_bits") not in (4, 8, 32):
        raise ValueError(f"config.{QUANT_KEY}: unsupported embedding_bits {settings.get('embedding_bits')!r}")


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
