"""The training loop shared by every stage: AdamW, LR schedule, gradient accumulation, clipping, EMA,
mixed precision and DDP through accelerate, checkpoints that resume exactly, progress and logs.

A stage supplies a trainable ``nn.Module`` (only its parameters with requires_grad are optimised), a
``batches(start)`` function giving this process's micro-batches from its ``start``-th sample on, and a
``loss_fn(module, batch, generator) -> scalar``. Randomness inside the loss (noise, timesteps) must come
from ``generator``, whose state is checkpointed; randomness of the data must be a pure function of the
sample position (see dreampose.data.dataset.PairSampler). Then a resumed run reproduces an
uninterrupted one step for step (on the CPU: the same losses, bit for bit).

Checkpoint folder ``<dir>/step_<N>/`` (written atomically; the newest K are kept)::

    model.safetensors        the trainable module's weights (fp32)
    ema.safetensors          the EMA weights (when EMA is on)
    optimizer.pt             AdamW state          scheduler.pt   LR scheduler state
    scaler.pt                fp16 gradient scaler state (fp16 only)
    rng.pt                   per process: python, numpy, torch CPU / CUDA RNG states and the loop's generator
    state.json               step, samples per process, world size, the stage's configs
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..outputs import atomic_dir
from ..utils import DreamPoseError, PathLike, atomic_file, read_json, write_json
from .config import OptimConfig, RunConfig

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------
def make_accelerator(run: RunConfig, cpu: bool = False):
    """An accelerate Accelerator for this run (one process, or one of several under ``accelerate launch``)."""
    from accelerate import Accelerator

    if run.mixed_precision == "fp16" and (cpu or not torch.cuda.is_available()):
        raise DreamPoseError("mixed_precision fp16 needs a CUDA device; use bf16 or no on the CPU")
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", run.mixed_precision) != run.mixed_precision \
            and state.get("num_processes", 1) == 1:
        # accelerate keeps one state per process; a second run in the same (single) process with another
        # precision (from Python, a notebook, a test session) starts from a fresh one
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=run.mixed_precision, cpu=cpu)


class LRLambda:
    """Learning-rate multiplier: linear warmup over ``warmup`` steps, then constant, cosine or linear decay to 0."""

    def __init__(self, schedule: str, warmup: int, total: int) -> None:
        self.schedule, self.warmup, self.total = schedule, int(warmup), max(int(total), 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        progress = min(max((step - self.warmup) / max(self.total - self.warmup, 1), 0.0), 1.0)
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress


class EMA:
    """Exponential moving average of a module's trainable parameters (fp32 shadow copies).

    decay_t = min(decay, (1 + t) / (10 + t)) at update t, so that early averages are not dominated by
    the initial weights.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into ``module``."""
        for n, p in module.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{n: t.cpu().contiguous() for n, t in self.shadow.items()}, "__updates__": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        self.updates = int(state.pop("__updates__"))
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise DreamPoseError(f"EMA state does not fit the model: {sorted(missing)[:5]}")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trim_metrics(path: Path, phase: str, step: int) -> None:
    """Drop the records of ``phase`` after ``step`` from a metrics.jsonl (a resumed run writes them again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if not (rec.get("phase") == phase and rec.get("step", 0) > step):
            kept.append(line)
    with atomic_file(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def list_checkpoints(folder: PathLike) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").is_file():
            try:
                found.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def trained_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of ``module``'s state dict that are trained parameters (requires_grad)."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in module.state_dict().items() if k in names}


def load_checkpoint_weights(path: PathLike, module: nn.Module, use_ema: bool = False,
                            trained_only: bool = False) -> None:
    """Load a checkpoint's weights (or its EMA weights) into ``module`` (the stage's trainable module).
    ``trained_only``: the checkpoint holds only the trained parameters (a LoRA finetune's); the frozen
    entries keep their values, and the checkpoint must hold exactly the trained ones."""
    from safetensors.torch import load_file

    from ..model import load_state_dict_checked

    path = Path(path)
    file = path / ("ema.safetensors" if use_ema else "model.safetensors")
    if not file.is_file():
        raise DreamPoseError(f"{file}: not found (is {path} a checkpoint{' with EMA' if use_ema else ''}?)")
    state = load_file(str(file))
    current = module.state_dict()
    if trained_only:
        trained = set(trained_state(module))
        if set(state) - {"__updates__"} != trained:
            raise DreamPoseError(f"{file}: holds {len(state)} tensors, not this run's {len(trained)} trained "
                                 "parameters (a checkpoint of another LoRA shape or of a full finetune?)")
    if use_ema or trained_only:
        state.pop("__updates__", None)
        state = {k: state.get(k, current[k]) for k in current}  # frozen entries keep their values
    load_state_dict_checked(module, state, str(file))


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
@dataclass
class LoopResult:
    """What a run did: per-step mean losses of the steps it ran, and the step it ended at."""

    losses: list[float] = field(default_factory=list)
    start_step: int = 0
    end_step: int = 0
    checkpoint: Path | None = None


class Trainer:
    """One optimisation phase (stage 1, the subject's UNet + adapter, or the VAE decoder).

    Args:
        accelerator: from make_accelerator.
        module: the trainable module (its requires_grad parameters are trained); not yet prepared.
        optim: AdamW and schedule. run: seed, precision, checkpoints, logging.
        checkpoint_dir: where step_<N>/ folders go.
        max_steps: optimizer steps of this phase. grad_accum: micro-batches per optimizer step.
        micro_batch_size: samples per micro-batch and process (for throughput and the data position).
        configs: JSON-ready dicts saved in every checkpoint (the stage's configs).
        ema_decay: 0 = off.
        name: for logs and the progress bar.
        trained_only: checkpoints hold only the trained parameters (a LoRA finetune: megabytes, not the
            frozen base model's copy).
    """

    def __init__(
        self,
        accelerator: Any,
        module: nn.Module,
        optim: OptimConfig,
        run: RunConfig,
        checkpoint_dir: PathLike,
        max_steps: int,
        grad_accum: int = 1,
        micro_batch_size: int = 1,
        configs: dict | None = None,
        ema_decay: float = 0.0,
        name: str = "train",
        trained_only: bool = False,
    ) -> None:
        self.acc = accelerator
        self.trained_only = trained_only
        self.module = module
        self.optim_cfg, self.run_cfg = optim, run
        self.checkpoint_dir = Path(checkpoint_dir)
        self.max_steps, self.grad_accum, self.micro_batch_size = int(max_steps), int(grad_accum), int(micro_batch_size)
        self.configs = configs or {}
        self.name = name
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise DreamPoseError(f"{name}: nothing to train (no parameter requires grad)")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, eps=optim.eps
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, LRLambda(optim.schedule, optim.warmup_steps, self.max_steps)
        )
        self.ema = EMA(module, ema_decay) if ema_decay > 0 else None
        rank = accelerator.process_index
        self.generator = torch.Generator(device=accelerator.device).manual_seed(run.seed * 1_000_003 + rank)
        self.step = 0
        self._prepared = False

    # ---- checkpoints ----------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        found = list_checkpoints(self.checkpoint_dir)
        return found[-1] if found else None

    def save_checkpoint(self) -> Path:
        """Write step_<N>/ atomically (main process; every process contributes its RNG state)."""
        from accelerate.utils import gather_object
        from safetensors.torch import save_file

        rng_all = gather_object([rng_state(self.generator)])
        path = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.step:07d}"
        if self.acc.is_main_process:
            module = self.acc.unwrap_model(self.ddp_module) if self._prepared else self.module
            with atomic_dir(path, "checkpoint") as tmp:
                weights = trained_state(module) if self.trained_only else module.state_dict()
                state = {k: v.detach().float().cpu().contiguous() for k, v in weights.items()}
                save_file(state, str(tmp / "model.safetensors"))
                if self.ema is not None:
                    save_file(self.ema.state_dict(), str(tmp / "ema.safetensors"))
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(self.lr_scheduler.state_dict(), tmp / "scheduler.pt")
                if self.acc.scaler is not None:
                    torch.save(self.acc.scaler.state_dict(), tmp / "scaler.pt")
                torch.save(rng_all, tmp / "rng.pt")
                write_json(tmp / "state.json", {
                    "name": self.name,
                    "step": self.step,
                    "max_steps": self.max_steps,
                    "samples_per_process": self.step * self.grad_accum * self.micro_batch_size,
                    "world_size": self.acc.num_processes,
                    "configs": self.configs,
                })
            self._prune()
            logger.info("%s: checkpoint %s", self.name, path)
        self.acc.wait_for_everyone()
        return path

    def _prune(self) -> None:
        keep = self.run_cfg.keep_checkpoints
        if keep > 0:
            for old in list_checkpoints(self.checkpoint_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: PathLike) -> None:
        """Restore weights, optimizer, scheduler, EMA, scaler, RNG states and step (before ``fit``)."""
        from safetensors.torch import load_file

        path = Path(path)
        state = read_json(path / "state.json")
        if state.get("name") != self.name:
            raise DreamPoseError(f"{path}: a checkpoint of {state.get('name')!r}, not of {self.name!r}")
        if state.get("max_steps") != self.max_steps:
            logger.warning("%s: checkpoint was made for %s steps, this run has %d", path, state.get("max_steps"), self.max_steps)
        expected = int(state["step"]) * self.grad_accum * self.micro_batch_size
        if state.get("samples_per_process", expected) != expected:
            raise DreamPoseError(
                f"{path}: saved with {state['samples_per_process']} samples per process at step {state['step']}; "
                f"this run's batch settings give {expected}: resume with the batch settings of the checkpoint"
            )
        if state.get("configs") is not None and state["configs"] != json.loads(json.dumps(self.configs)):
            differ = sorted(k for k in set(state["configs"]) | set(self.configs)
                            if state["configs"].get(k) != json.loads(json.dumps(self.configs.get(k))))
            logger.warning("%s: resuming with changed settings (%s); the result will differ from an "
                           "uninterrupted run", path, ", ".join(differ))
        load_checkpoint_weights(path, self.module, trained_only=self.trained_only)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
        self.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
        if self.ema is not None:
            if not (path / "ema.safetensors").is_file():
                raise DreamPoseError(f"{path}: no ema.safetensors, but this run keeps an EMA")
            self.ema.load_state_dict(load_file(str(path / "ema.safetensors")))
        if self.acc.scaler is not None and (path / "scaler.pt").is_file():
            self.acc.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
        rng_all = torch.load(path / "rng.pt", weights_only=False)
        if len(rng_all) == self.acc.num_processes:
            set_rng_state(rng_all[self.acc.process_index], self.generator)
        else:
            logger.warning("%s: saved by %d processes, resumed by %d: the random streams restart (not an exact resume)",
                           path, len(rng_all), self.acc.num_processes)
        self.step = int(state["step"])
        logger.info("%s: resumed from %s at step %d", self.name, path, self.step)

    # ---- training -------------------------------------------------------------------------------
    def prepare(self) -> None:
        self.ddp_module, self.optimizer = self.acc.prepare(self.module, self.optimizer)
        self._prepared = True

    def fit(
        self,
        batches: Callable[[int], Iterator[Any]],
        loss_fn: Callable[[nn.Module, Any, torch.Generator], torch.Tensor],
        metrics_file: PathLike | None = None,
    ) -> LoopResult:
        """Train from ``self.step`` to ``max_steps``. ``batches(start)`` yields this process's micro-batches
        from its ``start``-th sample; ``loss_fn(module, batch, generator)`` returns the mean loss of a batch."""
        from tqdm.auto import tqdm

        if self.step == 0 and list_checkpoints(self.checkpoint_dir):
            raise DreamPoseError(
                f"{self.checkpoint_dir} holds checkpoints of an earlier run; resume it (--resume) or write to "
                "another output folder (a fresh run here would mix the two)"
            )
        if not self._prepared:
            self.prepare()
        acc, run = self.acc, self.run_cfg
        if metrics_file is not None and acc.is_main_process:
            _trim_metrics(Path(metrics_file), self.name, self.step)
        result = LoopResult(start_step=self.step, end_step=self.step)
        if self.step >= self.max_steps:
            return result
        it = batches(self.step * self.grad_accum * self.micro_batch_size)
        samples_per_step = self.grad_accum * self.micro_batch_size * acc.num_processes
        bar = tqdm(total=self.max_steps, initial=self.step, desc=self.name, unit="step", dynamic_ncols=True,
                   disable=not (run.progress and acc.is_main_process))
        self.ddp_module.train()
        window_losses: list[float] = []
        t_window = time.perf_counter()
        try:
            while self.step < self.max_steps:
                total = torch.zeros((), device=acc.device)
                for k in range(self.grad_accum):
                    batch = next(it)
                    sync = k == self.grad_accum - 1
                    with contextlib.nullcontext() if sync else acc.no_sync(self.ddp_module):
                        loss = loss_fn(self.ddp_module, batch, self.generator)
                        acc.backward(loss / self.grad_accum)
                    total += loss.detach().float()
                grad_norm = None
                if self.optim_cfg.grad_clip > 0:
                    grad_norm = acc.clip_grad_norm_(self.params, self.optim_cfg.grad_clip)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(acc.unwrap_model(self.ddp_module))
                self.step += 1
                step_loss = float(acc.reduce(total / self.grad_accum, reduction="mean").item())
                if not math.isfinite(step_loss):
                    raise FloatingPointError(f"{self.name}: loss is {step_loss} at step {self.step}")
                result.losses.append(step_loss)
                window_losses.append(step_loss)
                lr = self.lr_scheduler.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                if self.step % run.log_every == 0 or self.step == self.max_steps:
                    elapsed = time.perf_counter() - t_window
                    record = {
                        "phase": self.name,
                        "step": self.step,
                        "loss": sum(window_losses) / len(window_losses),
                        "lr": lr,
                        "samples_per_s": len(window_losses) * samples_per_step / max(elapsed, 1e-9),
                        "s_per_step": elapsed / len(window_losses),
                        "grad_norm": None if grad_norm is None else float(grad_norm),
                    }
                    logger.info("%s step %d/%d: loss %.4f, lr %.2e, %.1f samples/s, %.2f s/step",
                                self.name, self.step, self.max_steps, record["loss"], lr,
                                record["samples_per_s"], record["s_per_step"])
                    if metrics_file is not None and acc.is_main_process:
                        with open(metrics_file, "a") as f:
                            f.write(json.dumps(record) + "\n")
                    window_losses, t_window = [], time.perf_counter()
                if (run.checkpoint_every and self.step % run.checkpoint_every == 0) or self.step == self.max_steps:
                    result.checkpoint = self.save_checkpoint()
        finally:
            bar.close()
        result.end_step = self.step
        return result

    def trained_module(self, use_ema: bool = True) -> nn.Module:
        """The trained module, unwrapped, with the EMA weights copied in when EMA is on and ``use_ema``."""
        module = self.acc.unwrap_model(self.ddp_module, keep_fp32_wrapper=False) if self._prepared else self.module
        if use_ema and self.ema is not None:
            self.ema.copy_to(module)
        return module
