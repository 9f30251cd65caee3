"""Shared code for the Distill-Prune-Quantize stage scripts.

Modules are named by what they do: paths (stage -> folder map), config (constants and KEY=VALUE
overrides), stage (atomic stage folders, metadata.json, logging, seeding, which process writes), data (SST-2),
modeling_dpq (model families, block anatomy, the one loader; self-contained), quantization, modeling (presets
and the project's entry points to the loader), flops, training (the one Accelerate loop, its hooks, evaluation),
distillation, pruning, export, stats, report. Module-level imports form no cycle (tests/test_architecture.py).
"""
