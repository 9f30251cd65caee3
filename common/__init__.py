"""Shared code for the Distill-Prune-Quantize stage scripts.

Modules are named by what they do: paths (stage -> folder map), config (constants and KEY=VALUE
overrides), stage (atomic stage folders, metadata.json, logging, seeding), data (SST-2), modeling (presets
and the one loader), training (Accelerate loop and evaluation), distillation, pruning, quantization, flops,
report.
"""
