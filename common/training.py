"""Training and evaluation, through Hugging Face Accelerate: the project's one training loop.

The same loop runs on CPU, on one GPU, and as several processes: `torchrun --nproc_per_node N <stage>` (CPU: gloo;
GPUs: NCCL) or `accelerate launch --multi_gpu --num_processes N <stage>` on GPUs. `evaluate` is the one accuracy
function every stage uses. `train` is AdamW with linear warmup and decay, a tqdm bar with the live loss, held-out
evaluation `evals_per_epoch` times per epoch, and the best held-out state restored at the end. A `TrainHook` plugs
into it (every step; it may change the model's structure, and the loop then rebuilds the optimizer,
the schedule and the data-parallel wrapper): gradual pruning (`common.pruning.schedule.gradual_prune`) is one.
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
        from accelerate import Accelerator  # in the body: slow to import, only needed here

        # cpu=True on a machine without CUDA: under torchrun that makes a multi-process (gloo) run; without it
        # Accelerate 1.15 sees one process per launch (../shared/docs/stack-notes.md, "Several processes on CPU")
        _ACCELERATOR = Accelerator(cpu=not torch.cuda.is_available())
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


def correct_rows(model, loader) -> torch.Tensor:
    """Whether `model` gets each row of the loader's dataset right (bool, in row order)."""
    return predict_logits(model, loader).argmax(-1) == loader.dataset.labels


def evaluate(model, loader) -> float:
    """Accuracy of `model` on every row of the loader's dataset."""
    return correct_rows(model, loader).float().mean().item()


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
    best_correct: torch.Tensor = None  # held-out rows the best state gets right (bool)
    last_correct: torch.Tensor = None  # the same for the last check (the last step: the state keep="last" leaves)
    best_state: dict = None  # keep="last" only: the best held-out state, for the caller to weigh against the last


class TrainHook:
    """What a caller plugs into `train` (this base class does nothing). Each method gets the `TrainLoop`.

    - `on_start(loop)`: after the model, optimizer and data are prepared, before the first step;
    - `on_step(loop) -> bool`: after every optimizer step; True means the model's STRUCTURE changed (parameters
      added, removed or resized): `train` then rebuilds AdamW and the lr schedule (continuing at this step) for the
      new parameters and prepares the model again (a data-parallel wrapper must be rebuilt around new tensors);
    - `on_end(loop)`: after the last step, before the best held-out state is restored;
    - `postfix(loop) -> dict | None`: what the progress bar shows after this step (None: loss and lr).
    `common.pruning.schedule.GradualPruning` is one (importance accumulation, pruning events, frontier branches).
    """

    def on_start(self, loop) -> None:
        pass

    def on_step(self, loop) -> bool:
        return False

    def on_end(self, loop) -> None:
        pass

    def postfix(self, loop):
        return None


@dataclass
class TrainLoop:
    """The state of one `train` call, as hooks see it. `model` is what Accelerate prepared (a DistributedDataParallel
    wrapper under several processes); `unwrapped` is the model itself, the one to inspect, prune or copy."""

    accelerator: object
    model: torch.nn.Module
    loader: object = None  # the prepared training batches
    optimizer: object = None
    scheduler: object = None
    lr: float = 0.0
    weight_decay: float = 0.0
    steps_per_epoch: int = 0  # batches per epoch on THIS process (the data is split between processes)
    total_steps: int = 0
    warmup_steps: int = 0
    epoch: int = 0
    step: int = 0
    batch: dict = None  # this step's training batch (this process's), as the loss saw it
    loss: float = None  # this step's loss (this process's batch)
    running_loss: float = None  # its moving average over the epoch so far (shown, and recorded at held-out checks)

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def build_optimizer(self) -> None:
        """AdamW and the linear schedule (continuing at the current step) for the model's current parameters, and
        the model prepared again (DDP wrapper rebuilt) with them."""
        model = self.unwrapped
        optimizer = make_optimizer(model, self.lr, self.weight_decay)
        self.scheduler = linear_schedule(optimizer, self.total_steps, self.warmup_steps, start_step=self.step)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)


def train(model, train_loader, heldout_loader, loss_fn=cross_entropy_loss, *, epochs: int, lr: float,
          weight_decay: float = 0.01, warmup_ratio: float = 0.06, evals_per_epoch: int = 1,
          max_grad_norm: float = 1.0, desc: str = "train", hook: TrainHook | None = None,
          keep: str = "best") -> TrainResult:
    """Fine-tune `model` in place; the best held-out state is restored at the end (`evals_per_epoch` held-out
    checks per epoch; 0 = none, the model is left as the last step made it). keep="last": the model is left as the
    last step made it (the last check is the last step) and the best state comes back in `result.best_state`.

    The one training loop of the project. Accelerate prepares the model, AdamW and the training batches: under
    several processes each process trains on its share of the batches and gradients are averaged. The lr
    schedule (linear warmup and decay) counts this process's steps, so it spans the run however many processes
    there are. Held-out accuracy is measured by every process on the whole held-out set (the models are
    identical), so every process takes the same decisions; the running loss shown and recorded is this process's
    (its own batches). `hook` (a TrainHook) sees every step and may change the model's structure (gradual pruning).
    """
    if keep not in ("best", "last"):
        raise ValueError(f"keep must be 'best' or 'last', got {keep!r}")
    accelerator = make_accelerator()
    hook = hook or TrainHook()
    loader = accelerator.prepare(train_loader)
    steps_per_epoch = len(loader)
    total = steps_per_epoch * epochs
    loop = TrainLoop(accelerator, model, loader, lr=lr, weight_decay=weight_decay, steps_per_epoch=steps_per_epoch,
                     total_steps=total, warmup_steps=math.ceil(total * warmup_ratio))
    loop.build_optimizer()
    eval_at = {round(steps_per_epoch * (k + 1) / evals_per_epoch) for k in range(evals_per_epoch)}
    result = TrainResult()
    best_state = None
    hook.on_start(loop)
    for epoch in range(epochs):
        loop.epoch = epoch + 1
        loop.running_loss = None
        loop.model.train()
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", dynamic_ncols=True,
                   disable=not accelerator.is_local_main_process)
        for i, batch in enumerate(bar, start=1):
            loss = loss_fn(loop.model, batch)
            accelerator.backward(loss)
            if max_grad_norm:
                accelerator.clip_grad_norm_(loop.model.parameters(), max_grad_norm)
            loop.optimizer.step()
            loop.scheduler.step()
            loop.optimizer.zero_grad(set_to_none=True)
            loop.step += 1
            loop.loss = value = loss.item()
            loop.batch = batch
            loop.running_loss = value if loop.running_loss is None else 0.98 * loop.running_loss + 0.02 * value
            if hook.on_step(loop):
                loop.build_optimizer()
                loop.model.train()
            bar.set_postfix(hook.postfix(loop) or {"loss": f"{loop.running_loss:.4f}",
                                                    "lr": f"{loop.scheduler.get_last_lr()[0]:.2e}"})
            if i in eval_at:
                correct = correct_rows(loop.unwrapped, heldout_loader)
                accuracy = correct.float().mean().item()
                result.last_correct = correct
                result.history.append({"step": loop.step, "epoch": epoch + 1, "loss": round(loop.running_loss, 5),
                                       "heldout_accuracy": round(accuracy, 5)})
                logger.info(f"[{desc}] step {loop.step}: loss {loop.running_loss:.4f}, held-out accuracy "
                            f"{accuracy:.4f}")
                if accuracy > result.best_accuracy:
                    result.best_accuracy, result.best_step, result.best_correct = accuracy, loop.step, correct
                    best_state = copy.deepcopy(loop.unwrapped.state_dict())
                loop.model.train()
    hook.on_end(loop)
    model = loop.unwrapped
    if best_state is not None and keep == "best":
        model.load_state_dict(best_state)
        logger.info(f"[{desc}] kept step {result.best_step} (held-out accuracy {result.best_accuracy:.4f})")
    elif best_state is not None:
        result.best_state = best_state
    accelerator.free_memory()
    return result
