"""Training configurations: frozen dataclasses, saved as JSON beside every run and in every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Type, TypeVar

from ..settings import check_float, check_int
from ..utils import DreamPoseError, PathLike, dataclass_from_dict, read_json, write_json

if TYPE_CHECKING:  # pragma: no cover
    from ..lora import LoraSettings

T = TypeVar("T")

MIXED_PRECISIONS = ("no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine", "linear")
PIXEL_LOSSES = ("l1", "mse")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the learning-rate schedule (paper: betas (0.9, 0.999), weight decay 1e-2, eps 1e-8, grad clip 1.0)."""

    lr: float = 5e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        check_float("lr", self.lr, 0.0, low_open=True)
        if len(self.betas) != 2 or not all(0.0 <= check_float("betas", b) < 1.0 for b in self.betas):
            raise DreamPoseError(f"betas must be two numbers in [0, 1), got {self.betas}")
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("eps", self.eps, 0.0, low_open=True)
        check_float("grad_clip", self.grad_clip, 0.0)
        check_int("warmup_steps", self.warmup_steps, 0)
        if self.schedule not in LR_SCHEDULES:
            raise DreamPoseError(f"lr schedule must be one of {LR_SCHEDULES}, got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise DreamPoseError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(frozen=True)
class RunConfig:
    """What every long run needs: precision, memory, checkpoints, logging."""

    seed: int = 0
    mixed_precision: str = "no"  # "no", "bf16" or "fp16"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500  # optimizer steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 3  # the newest K checkpoints are kept (0: all)
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise DreamPoseError(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}")
        check_int("seed", self.seed, 0)
        check_int("checkpoint_every", self.checkpoint_every, 0)
        check_int("keep_checkpoints", self.keep_checkpoints, 0)
        check_int("log_every", self.log_every, 1)


@dataclass(frozen=True)
class Stage1Config:
    """Stage 1: the base model on a video dataset (UNet + adapter trained; VAE and CLIP frozen).

    Defaults are the paper's: lr 5e-6, a global batch of 16 (micro_batch_size per device times gradient
    accumulation times devices), 5 epochs, dropout 5% null pose / 5% null image / 5% both per sample.

    Attributes:
        data: a UBC-layout dataset folder, or "synth" for SynthFashion generated on the fly (synth_* sizes).
        output_dir: the run folder: config.json, checkpoints/, metrics.jsonl, model/ (the final model folder).
        base_model: a DreamPose model folder to start from; or sd_dir + clip_dir (a fresh model from local
            Stable Diffusion and CLIP folders); or "tiny" (the tiny random model, for tests and smoke runs).
        height, width: training resolution (0: the base model's; must then equal it).
        batch_size: global batch per optimizer step. micro_batch_size: samples per device per forward.
        epochs: passes over the target frames; max_steps > 0 overrides it.
        window: "real" (the 5-frame window around the target) or "copies" (the release's 5 copies).
        ema_decay: keep an EMA of the trained weights (0: off); the final model then has the EMA weights.
        target_latents: "sample" (a draw from the VAE posterior, as SD trains) or "mean".
        num_workers: data loader worker processes.
    """

    data: str = "synth"
    output_dir: str = "runs/stage1"
    base_model: str = "tiny"
    sd_dir: str = ""
    clip_dir: str = ""
    height: int = 0
    width: int = 0
    batch_size: int = 16
    micro_batch_size: int = 1
    epochs: float = 5.0
    max_steps: int = 0
    window: str = "real"
    p_drop_pose: float = 0.05
    p_drop_image: float = 0.05
    p_drop_both: float = 0.05
    ema_decay: float = 0.0
    target_latents: str = "sample"
    num_workers: int = 0
    synth_videos: int = 16
    synth_frames: int = 16
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size, 1)
        check_int("micro_batch_size", self.micro_batch_size, 1)
        check_int("height", self.height, 0)
        check_int("width", self.width, 0)
        check_int("max_steps", self.max_steps, 0)
        check_int("num_workers", self.num_workers, 0)
        check_int("synth_videos", self.synth_videos, 1)
        check_int("synth_frames", self.synth_frames, 1)
        for name in ("p_drop_pose", "p_drop_image", "p_drop_both"):
            if not 0.0 <= check_float(name, getattr(self, name)) <= 1.0:
                raise DreamPoseError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.p_drop_pose + self.p_drop_image + self.p_drop_both > 1.0:
            raise DreamPoseError("p_drop_pose + p_drop_image + p_drop_both must be at most 1")
        if self.window not in ("real", "copies"):
            raise DreamPoseError(f"window must be 'real' or 'copies', got {self.window!r}")
        check_float("epochs", self.epochs, 0.0, low_open=True)
        check_float("ema_decay", self.ema_decay)
        if self.target_latents not in ("sample", "mean"):
            raise DreamPoseError(f"target_latents must be 'sample' or 'mean', got {self.target_latents!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise DreamPoseError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.max_steps < 0 or self.epochs <= 0:
            raise DreamPoseError("epochs must be > 0 and max_steps >= 0")


@dataclass(frozen=True)
class AugmentConfig:
    """The one random geometric transform of stage 2: zoom (a crop) by a factor in [min_scale, max_scale]
    and a shift of up to max_shift of the image size beyond what the crop allows."""

    min_scale: float = 1.0
    max_scale: float = 1.25
    max_shift: float = 0.05

    def __post_init__(self) -> None:
        for name in ("min_scale", "max_scale", "max_shift"):
            check_float(name, getattr(self, name))
        if not 0 < self.min_scale <= self.max_scale:
            raise DreamPoseError(f"need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}")
        if not 0 <= self.max_shift < 0.5:
            raise DreamPoseError(f"max_shift must be in [0, 0.5), got {self.max_shift}")


@dataclass(frozen=True)
class FinetuneConfig:
    """Stage 2 on one subject: UNet + adapter (no dropout), then the VAE decoder alone with a pixel loss.

    Attributes:
        images: the subject's images (front, back, ...). poses: one pose per image (a (2, H, W) .npy,
            an IUV image, or a (1, 2, H, W) .npy); empty: ``<image stem>_densepose.npy`` beside each image.
        base_model: the model folder to finetune. output_dir: the finetuned model folder.
        work_dir: checkpoints and logs (default: ``<output_dir>.work``).
        unet_steps / unet_lr: the first phase (paper: 500 steps at 1e-5).
        decoder_steps / decoder_lr: the second phase (paper: 1500 steps at 5e-5).
        pixel_loss: "l1" or "mse"; lpips: a TorchScript perceptual loss ((x, y) in [-1, 1] -> distance)
            used only when given (local weights), weighted by lpips_weight.
        decoder_crop: fraction of the latent size decoded per step (small crops; 1.0 = whole image).
        lora_rank: 0: full finetuning, a complete model folder out. R >= 1: LoRA of rank R
            (dreampose.lora): the UNet's ``lora_targets`` layers get a trained low-rank update, the adapter
            trains fully, and the output is a subject folder holding only those weights.
        lora_alpha: the update's scale numerator (0: the rank, a scale of 1).
        lora_targets: "attention" (default) or "attention+conv" (docs/quality.md has their measured effect).
        lora_decoder: with LoRA, the decoder phase trains a LoRA of the VAE decoder's convolutions
            (without it, a LoRA finetune has no decoder phase).
    """

    images: tuple[str, ...] = ()
    poses: tuple[str, ...] = ()
    base_model: str = ""
    output_dir: str = ""
    work_dir: str = ""
    batch_size: int = 1
    unet_steps: int = 500
    unet_lr: float = 1e-5
    decoder_steps: int = 1500
    decoder_lr: float = 5e-5
    pixel_loss: str = "l1"
    lpips: str = ""
    lpips_weight: float = 1.0
    decoder_crop: float = 0.5
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: str = "attention"
    lora_decoder: bool = False
    augment: AugmentConfig = AugmentConfig()
    optim: OptimConfig = OptimConfig(lr=1e-5)
    run: RunConfig = RunConfig(checkpoint_every=250)

    def __post_init__(self) -> None:
        if not self.images:
            raise DreamPoseError("finetune needs at least one subject image")
        if self.poses and len(self.poses) != len(self.images):
            raise DreamPoseError(f"give one pose per image: {len(self.images)} images, {len(self.poses)} poses")
        if self.pixel_loss not in PIXEL_LOSSES:
            raise DreamPoseError(f"pixel_loss must be one of {PIXEL_LOSSES}, got {self.pixel_loss!r}")
        check_int("unet_steps", self.unet_steps, 0)
        check_int("decoder_steps", self.decoder_steps, 0)
        check_int("batch_size", self.batch_size, 1)
        check_float("unet_lr", self.unet_lr, 0.0, low_open=True)
        check_float("decoder_lr", self.decoder_lr, 0.0, low_open=True)
        check_float("lpips_weight", self.lpips_weight, 0.0)
        check_float("decoder_crop", self.decoder_crop)
        if not 0 < self.decoder_crop <= 1:
            raise DreamPoseError(f"decoder_crop must be in (0, 1], got {self.decoder_crop}")
        check_int("lora_rank", self.lora_rank, 0)
        check_float("lora_alpha", self.lora_alpha, 0.0)
        for name, value in (("lora_decoder", self.lora_decoder), ("lora_alpha", self.lora_alpha)):
            if value and not self.lora_rank:
                raise DreamPoseError(f"{name} needs lora_rank >= 1 (a LoRA finetune)")
        self.lora_settings()  # checks lora_targets

    def lora_settings(self) -> LoraSettings | None:
        """The LoRA shape of this finetune (None: a full finetune)."""
        from ..lora import LoraSettings

        if not self.lora_rank:
            return None
        return LoraSettings(rank=self.lora_rank, alpha=self.lora_alpha or None, targets=self.lora_targets,
                            decoder=self.lora_decoder)


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------
_NESTED = {"optim": OptimConfig, "run": RunConfig, "augment": AugmentConfig}


def config_to_dict(config: Any) -> dict:
    """A (nested) config dataclass -> a JSON-ready dict."""
    return dataclasses.asdict(config)


def config_from_dict(cls: Type[T], data: dict, source: str = "config") -> T:
    """The inverse of config_to_dict; unknown keys are an error naming ``source``."""
    data = dict(data)
    for name, sub in _NESTED.items():
        if name in data and isinstance(data[name], dict):
            data[name] = dataclass_from_dict(sub, data[name], f"{source} [{name}]")
    return dataclass_from_dict(cls, data, source)


def save_config(config: Any, path: PathLike) -> None:
    write_json(path, {"kind": type(config).__name__, **config_to_dict(config)})


def load_config(cls: Type[T], path: PathLike) -> T:
    data = read_json(path)
    kind = data.pop("kind", cls.__name__)
    if kind != cls.__name__:
        raise DreamPoseError(f"{path}: holds a {kind}, expected a {cls.__name__}")
    return config_from_dict(cls, data, str(Path(path)))
