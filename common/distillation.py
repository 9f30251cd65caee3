"""Knowledge distillation: the student built from teacher layers, the KD loss, and cached teacher logits.

- `student_from_teacher_layers` builds a shallower model of the teacher's family from chosen teacher layers
  (DistilBERT took every other layer of BERT), copying embeddings, those layers, pooler and classifier, and checks
  the copy.
- `kd_loss`: alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * cross-entropy.
- `kd_loss_fn` with an `IntermediateDistillation` adds TinyBERT's task-distillation terms (stage 2:
  INTERMEDIATE_WEIGHT): each student layer's hidden states and attention probabilities against those of the teacher
  layer it maps to (`intermediate_layer_map`), the teacher running live on every batch with eager attention.
- `with_joined_inputs`: the training set plus longer inputs made of two training rows joined end to end, labelled by
  the teacher (stage 8: AUGMENT_PAIRS).
- `teacher_logits_for`: the teacher's logits on a dataset, computed once and cached on disk under a key made
  of the teacher folder's content (sha256 of its weights and config), the token ids and labels, and the
  tokenization settings. A cache whose key or shape does not match, or that cannot be read, is rebuilt with
  a log line saying why; it is never used silently.
"""

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common.config import ConfigError
from common.data import concatenated_pairs, joined, make_loader, model_inputs
from common.modeling import load_model
from common.modeling_dpq import config_sizes, family_of
from common.stage import is_main_process, logger
from common.training import make_accelerator, model_device, predict_logits


def student_from_teacher_layers(teacher, layers):
    """A classifier of the teacher's family with `layers` (teacher layer indices) of `teacher`, weights copied and
    checked (where the blocks live and how the config counts layers: common.modeling_dpq.FAMILIES)."""
    family = family_of(teacher)
    n = config_sizes(teacher.config)["layers"]
    layers = list(layers)
    if not layers or any(not 0 <= i < n for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"student layers {layers} must be distinct indices of the teacher's {n} layers")
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    setattr(config, family.layers_key, len(layers))
    config.dpq_student_layers = layers
    student = type(teacher)(config)
    teacher_state = teacher.state_dict()
    blocks = f"{family.encoder}.layer."
    mapping = {}
    for key in student.state_dict():
        if key.startswith(blocks):
            index, rest = key[len(blocks):].split(".", 1)
            mapping[key] = f"{blocks}{layers[int(index)]}.{rest}"
        else:
            mapping[key] = key
    student.load_state_dict({k: teacher_state[v].clone() for k, v in mapping.items()}, strict=True)
    student_state = student.state_dict()
    for key, source in mapping.items():
        if not torch.equal(student_state[key], teacher_state[source]):
            raise AssertionError(f"student weight {key} differs from teacher weight {source}")
    return student.to(next(teacher.parameters()).device)


def kd_loss(student_logits, teacher_logits, labels, temperature: float = 2.0, alpha: float = 0.5):
    """Soft-target KL at temperature T (scaled by T^2) weighted alpha, plus hard-label CE weighted 1-alpha,
    averaged over the batch."""
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                    F.log_softmax(teacher_logits / temperature, dim=-1), reduction="batchmean", log_target=True)
    soft = soft * temperature ** 2
    if alpha < 1.0:
        soft = alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)
    return soft


def kd_loss_fn(teacher_logits: torch.Tensor, temperature: float, alpha: float,
               intermediate: "IntermediateDistillation | None" = None):
    """A training loss_fn(model, batch) that looks up the cached teacher logits by batch["idx"]; with
    `intermediate`, plus its weighted hidden-state and attention terms (the teacher runs on the batch)."""

    extra = {"output_hidden_states": True, "output_attentions": True} if intermediate else {}

    def loss_fn(model, batch):
        inputs = model_inputs(batch)
        out = model(**inputs, **extra)
        target = teacher_logits[batch["idx"].cpu()].to(out.logits.device)
        loss = kd_loss(out.logits, target, batch["labels"], temperature, alpha)
        return loss + intermediate.loss(out, inputs) if intermediate else loss

    return loss_fn


def intermediate_layer_map(student, teacher) -> list:
    """Student layer i <- teacher layer map[i]: the teacher layers a student of `student_from_teacher_layers` was
    built from (config.dpq_student_layers, the minilm preset's (0, 2, 4)); otherwise evenly spaced, ending at the
    teacher's last layer ((i + 1) * n_teacher // n_student - 1: 6 of 12 layers -> 1, 3, ..., 11, the bert preset).
    Hidden size and heads must match the teacher's (both presets do: 384/12 and 768/12): no learned projection."""
    student_sizes, teacher_sizes = config_sizes(student.config), config_sizes(teacher.config)
    for key in ("hidden", "heads"):
        if student_sizes[key] != teacher_sizes[key]:
            raise ConfigError(f"intermediate-layer distillation needs the student's {key} ({student_sizes[key]}) to "
                             f"equal the teacher's ({teacher_sizes[key]}); set INTERMEDIATE_WEIGHT=0")
    n_student, n_teacher = student_sizes["layers"], teacher_sizes["layers"]
    layers = getattr(student.config, "dpq_student_layers", None)
    layers = list(layers) if layers else [(i + 1) * n_teacher // n_student - 1 for i in range(n_student)]
    if len(layers) != n_student or not all(0 <= j < n_teacher for j in layers):
        raise ValueError(f"teacher layers {layers} for a {n_student}-layer student of a {n_teacher}-layer teacher")
    return layers


def intermediate_loss(student_out, teacher_out, layer_map, attention_mask) -> torch.Tensor:
    """Sum over student layers i, against teacher layer layer_map[i], of the MSE between their hidden states (over
    non-pad tokens) plus the MSE between their attention probabilities (over the rows of non-pad tokens; pad
    columns are 0 in both). MSE rather than KL for the attention maps: TinyBERT's loss, on the probabilities
    transformers returns (not the raw scores); in training they carry the student's attention dropout. Both
    outputs need output_hidden_states and output_attentions (eager attention: `eager_attention`)."""
    if not student_out.attentions or not teacher_out.attentions:
        raise ValueError("no attention maps in the model outputs: run both models with eager attention")
    mask = attention_mask.to(student_out.hidden_states[0].dtype).unsqueeze(-1)  # [batch, tokens, 1]
    tokens = mask.sum()
    total = 0.0
    for i, j in enumerate(layer_map):
        student_hidden, teacher_hidden = student_out.hidden_states[i + 1], teacher_out.hidden_states[j + 1]
        total = total + ((student_hidden - teacher_hidden) ** 2 * mask).sum() / (tokens * student_hidden.shape[-1])
        student_attn, teacher_attn = student_out.attentions[i], teacher_out.attentions[j]  # [batch, heads, T, T]
        per_row = student_attn.shape[1] * student_attn.shape[-1]
        total = total + ((student_attn - teacher_attn) ** 2 * mask.unsqueeze(1)).sum() / (tokens * per_row)
    return total


@dataclass
class IntermediateDistillation:
    """`weight` * `intermediate_loss` against `teacher` (in eval mode, no gradient), run on each training batch."""

    teacher: torch.nn.Module
    layer_map: list
    weight: float

    def loss(self, student_out, inputs: dict) -> torch.Tensor:
        device = student_out.logits.device
        if model_device(self.teacher) != device:
            self.teacher.to(device)
        self.teacher.eval()
        with torch.no_grad():
            teacher_out = self.teacher(**inputs, output_hidden_states=True, output_attentions=True)
        return self.weight * intermediate_loss(student_out, teacher_out, self.layer_map, inputs["attention_mask"])


@contextmanager
def eager_attention(*models):
    """Eager attention in `models` for the block (sdpa returns no attention maps in transformers 5), their own
    implementation back afterwards (it is not saved in config.json either way)."""
    before = [model.config._attn_implementation for model in models]
    for model in models:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        for model, implementation in zip(models, before):
            model.set_attn_implementation(implementation)


def folder_fingerprint(folder) -> str:
    """sha256 over a model folder's weight files and config (its content, not its name or date)."""
    digest = hashlib.sha256()
    folder = Path(folder)
    files = sorted(folder.glob("model*.safetensors")) + [folder / "config.json"]
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def data_fingerprint(encoded) -> str:
    digest = hashlib.sha256()
    for ids in encoded.input_ids:
        digest.update(json.dumps(ids).encode())
    digest.update(encoded.labels.numpy().tobytes())
    return digest.hexdigest()


def teacher_logits_for(teacher_folder, encoded, cache_dir, batch_size: int = 128, tokenization: dict = None):
    """Teacher logits [N, C] for every row of `encoded`, from the on-disk cache when its key matches.

    Under several processes the main process computes and caches them first; the others then read its cache
    (only the main process writes it)."""
    with make_accelerator().main_process_first():
        return _teacher_logits(teacher_folder, encoded, cache_dir, batch_size, tokenization)


def _teacher_logits(teacher_folder, encoded, cache_dir, batch_size: int, tokenization: dict | None):
    key_parts = {
        "teacher": folder_fingerprint(teacher_folder),
        "data": data_fingerprint(encoded),
        "tokenization": tokenization or {},
        "rows": len(encoded),
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    cache_dir = Path(cache_dir)
    path = cache_dir / f"teacher_logits_{key}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached["key"] == key and cached["logits"].shape[0] == len(encoded):
                logger.info(f"teacher logits: reusing cache {path.name}")
                return cached["logits"]
            logger.warning(f"WARNING: teacher logits: cache {path} does not match (key or size); rebuilding")
        except Exception as err:  # a corrupt file of any kind: say so and rebuild
            logger.warning(f"WARNING: teacher logits: cache {path} unreadable "
                           f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); rebuilding")
    teacher = load_model(teacher_folder)
    if torch.cuda.is_available():
        teacher.to("cuda")
    logger.info(f"teacher logits: computing for {len(encoded)} rows (cached afterwards)")
    logits = predict_logits(teacher, make_loader(encoded, batch_size), desc="teacher logits")
    if is_main_process():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        torch.save({"key": key, "key_parts": key_parts, "logits": logits}, tmp)
        os.replace(tmp, path)
    return logits


def with_joined_inputs(data: dict, logits, teacher_folder, cache_dir, n: int, seed: int, max_length: int) -> tuple:
    """(training set + `n` joined pairs of training rows, the teacher logits of both): the pairs
    (`common.data.concatenated_pairs`, drawn with `seed`, the same for every training seed) are labelled by the
    teacher, its argmax as the hard label, their logits cached like the training set's. `data` is
    `encoded_splits(...)`, `logits` the teacher's on `data["train"]`."""
    extra = concatenated_pairs(data["train"], n, seed, max_length)
    key = dict(data["tokenization"], augment="concatenated_pairs", augment_seed=seed)
    extra_logits = teacher_logits_for(teacher_folder, extra, cache_dir, tokenization=key)
    extra.labels = extra_logits.argmax(-1)
    logger.info(f"training set: {len(data['train'])} rows + {len(extra)} joined pairs, labelled by the teacher "
                f"(median {sorted(extra.lengths)[len(extra) // 2]} tokens; {100 * extra.labels.float().mean():.1f}% "
                f"positive)")
    return joined(data["train"], extra), torch.cat([logits, extra_logits])
