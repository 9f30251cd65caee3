"""Training and evaluation, through Hugging Face Accelerate.

The same loop runs on CPU, on one GPU, and under `accelerate launch` on several GPUs. `evaluate` is the one
accuracy function every stage uses. `train` is AdamW with linear warmup and decay, a tqdm bar with the live
loss, held-out evaluation `evals_per_epoch` times per epoch, and the best held-out state restored at the end.
"""

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.data import model_inputs
from common.stage import logger

_ACCELERATOR = None


def make_accelerator():
    """One Accelerator per process (Accelerate keeps global state; creating it twice is an error)."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from accelerate import Accelerator

        _ACCELERATOR = Accelerator()
    return _ACCELERATOR


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_logits(model, loader, desc: str = None) -> torch.Tensor:
    """Logits for every row of the loader's dataset, in row order ([N, 2], on CPU); a bar when `desc`."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    n = len(loader.dataset)
    out = None
    for batch in tqdm(loader, desc=desc, dynamic_ncols=True, disable=desc is None):
        logits = model(**{k: v.to(device) for k, v in model_inputs(batch).items()}).logits.float().cpu()
        if out is None:
            out = torch.zeros((n, logits.shape[-1]))
        out[batch["idx"]] = logits
    model.train(was_training)
    return out


def evaluate(model, loader) -> float:
    """Accuracy of `model` on every row of the loader's dataset."""
    logits = predict_logits(model, loader)
    return (logits.argmax(-1) == loader.dataset.labels).float().mean().item()


def cross_entropy_loss(model, batch) -> torch.Tensor:
    return F.cross_entropy(model(**model_inputs(batch)).logits, batch["labels"])


def make_optimizer(model, lr: float, weight_decay: float):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def linear_schedule(optimizer, total_steps: int, warmup_steps: int, start_step: int = 0):
    """Linear warmup to the base lr, then linear decay to 0 at total_steps."""

    def factor(step):
        step += start_step
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainResult:
    best_accuracy: float = -1.0
    best_step: int = -1
    history: list = field(default_factory=list)  # dicts: step, epoch, loss, heldout_accuracy


def train(model, train_loader, heldout_loader, loss_fn=cross_entropy_loss, *, epochs: int, lr: float,
          weight_decay: float = 0.01, warmup_ratio: float = 0.06, evals_per_epoch: int = 1,
          max_grad_norm: float = 1.0, desc: str = "train") -> TrainResult:
    """Fine-tune `model` in place; the best held-out state is restored at the end."""
    accelerator = make_accelerator()
    optimizer = make_optimizer(model, lr, weight_decay)
    steps_per_epoch = len(train_loader)
    total = steps_per_epoch * epochs
    scheduler = linear_schedule(optimizer, total, math.ceil(total * warmup_ratio))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_at = {round(steps_per_epoch * (k + 1) / evals_per_epoch) for k in range(evals_per_epoch)}
    result = TrainResult()
    best_state = None
    step = 0
    for epoch in range(epochs):
        model.train()
        running = None
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", dynamic_ncols=True,
                   disable=not accelerator.is_local_main_process)
        for i, batch in enumerate(bar, start=1):
            loss = loss_fn(model, batch)
            accelerator.backward(loss)
            if max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if i in eval_at:
                accuracy = evaluate(accelerator.unwrap_model(model), heldout_loader)
                result.history.append({"step": step, "epoch": epoch + 1, "loss": round(running, 5),
                                       "heldout_accuracy": round(accuracy, 5)})
                logger.info(f"[{desc}] step {step}: loss {running:.4f}, held-out accuracy {accuracy:.4f}")
                if accuracy > result.best_accuracy:
                    result.best_accuracy, result.best_step = accuracy, step
                    best_state = copy.deepcopy(accelerator.unwrap_model(model).state_dict())
                model.train()
    model = accelerator.unwrap_model(model)
    if best_state is not None:
        model.load_state_dict(best_state)
        logger.info(f"[{desc}] kept step {result.best_step} (held-out accuracy {result.best_accuracy:.4f})")
    accelerator.free_memory()
    return result
