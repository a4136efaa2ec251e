"""Training: stage 1 (base model on a video dataset), stage 2 (one subject) and the VAE-decoder finetune.

See docs/training.md. ``train_stage1`` and ``finetune`` run on one device or, under ``accelerate launch``,
on several (DDP).
"""

from .config import FinetuneConfig, Stage1Config
from .finetune import finetune
from .stage1 import train_stage1

__all__ = ["FinetuneConfig", "Stage1Config", "finetune", "train_stage1"]
