"""LoRA subject adapters: a subject finetuned in minutes, stored in megabytes, merged at load.

DreamPose gets its quality from finetuning on the subject; a full finetune writes a whole model folder (a
3.4 GB UNet copy at SD 1.5 size). A LoRA finetune (Hu et al., arXiv 2106.09685; trained with peft) learns a
low-rank update ``W + (alpha / rank) * B @ A`` of chosen UNet layers (and, optionally, of the VAE decoder's
convolutions), and trains the adapter's two small Linear layers fully. A *subject folder* holds only that::

    subject.json              LoraSettings, the base model's fingerprint, how it was trained
    unet_lora.safetensors     "<module>.lora_A" (rank, in[, kh, kw]) and "<module>.lora_B" (out, rank[, 1, 1])
    adapter.safetensors       the adapter's weights (linear1, vae2clip)
    decoder_lora.safetensors  the VAE decoder's update (only when trained with it)

:func:`apply_subject` merges it into a loaded base model (no per-step cost), after checking that the folder
was made for that base model (:func:`model_fingerprint`: a hash of the base folder's weights, not its
path). peft is needed to train, not to merge.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from .settings import check_choice, check_float, check_int
from .utils import DreamPoseError, PathLike, dataclass_from_dict, read_json

if TYPE_CHECKING:  # pragma: no cover
    from .model import DreamPoseModel

logger = logging.getLogger(__name__)

SUBJECT_CONFIG = "subject.json"
UNET_LORA = "unet_lora.safetensors"
DECODER_LORA = "decoder_lora.safetensors"
ADAPTER_WEIGHTS = "adapter.safetensors"
SUBJECT_FORMAT = 1
#: which UNet layers get a LoRA update
TARGETS = ("attention", "attention+conv")


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA finetune's shape.

    Attributes:
        rank: the update's rank r (>= 1).
        alpha: the update's scale numerator (``alpha / rank``; default: the rank, a scale of 1).
        targets: "attention" (the q, k, v and output projections of every attention block; the default)
            or "attention+conv" (also both 3 x 3 convolutions of every resnet block). Measured on held-out
            subjects (docs/quality.md): the convolutions make the UNet's LoRA 3.5x larger at SD 1.5 size,
            add no appearance, and cost pose-following.
        decoder: also adapt the VAE decoder (its convolutions), in the decoder phase.
    """

    rank: int = 4
    alpha: float | None = None
    targets: str = "attention"
    decoder: bool = False

    def __post_init__(self) -> None:
        check_int("lora rank", self.rank, 1)
        if self.alpha is not None:
            check_float("lora alpha", self.alpha, 0.0, low_open=True)
        check_choice("lora targets", self.targets, TARGETS)

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def unet_targets(unet: nn.Module, targets: str) -> list[str]:
    """Names of the UNet's modules a LoRA of ``targets`` adapts (Linear projections of attention; with
    "conv", also the resnets' 3 x 3 Conv2d)."""
    check_choice("lora targets", targets, TARGETS)
    names = []
    for name, module in unet.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and (leaf in ("to_q", "to_k", "to_v") or name.endswith("to_out.0")):
            names.append(name)
        elif targets == "attention+conv" and isinstance(module, nn.Conv2d) and leaf in ("conv1", "conv2") and (
                ".resnets." in name):
            names.append(name)
    return names


def decoder_targets(decoder: nn.Module) -> list[str]:
    """Names of the VAE decoder's 3 x 3 convolutions (its resnets', the mid block's, conv_in and conv_out)."""
    return [name for name, m in decoder.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


def lora_parameters(module: nn.Module, names: list[str], rank: int) -> int:
    """Parameters of rank-``rank`` LoRA factors of ``module``'s layers ``names`` (A: rank x fan-in, B: out x
    rank), counted from the layers' shapes (``module`` without LoRA layers; the meta device will do)."""
    total = 0
    for name in names:
        w = module.get_submodule(name).weight
        total += rank * (w.shape[1] * (w[0, 0].numel() if w.dim() == 4 else 1) + w.shape[0])
    return total


def mark_trainable(module: nn.Module, lora: bool) -> None:
    """Train all of ``module``, or (``lora``) only its injected LoRA factors."""
    if not lora:
        module.requires_grad_(True)
        return
    for name, p in module.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)


def require_peft() -> None:
    """Raise DreamPoseError unless peft (what LoRA training needs) imports."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise DreamPoseError("LoRA training needs peft: pip install 'dreampose-rt[lora]' (rendering a subject "
                             "folder does not)") from None


def add_lora(module: nn.Module, names: list[str], settings: LoraSettings, seed: int = 0) -> None:
    """Inject trainable LoRA layers (peft) into ``module``'s ``names``: B starts at zero (the module computes
    what it did), A at peft's default initialisation (seeded)."""
    require_peft()
    from peft import LoraConfig, inject_adapter_in_model

    if not names:
        raise DreamPoseError("no layer to adapt")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha if settings.alpha is not None else settings.rank,
                        target_modules=names, lora_dropout=0.0, bias="none", init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, module)


def lora_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors of a module with injected layers: "<name>.lora_A", "<name>.lora_B" (fp32, CPU)."""
    out = {}
    for name, m in module.named_modules():
        a, b = getattr(m, "lora_A", None), getattr(m, "lora_B", None)
        if isinstance(a, nn.ModuleDict) and "default" in a:
            out[f"{name}.lora_A"] = a["default"].weight.detach().float().cpu().contiguous()
            out[f"{name}.lora_B"] = b["default"].weight.detach().float().cpu().contiguous()
    return out


def remove_lora(module: nn.Module) -> None:
    """Replace every injected LoRA layer by its base layer again (the update is dropped, not merged)."""
    for name, m in list(module.named_modules()):
        base = getattr(m, "base_layer", None)
        if base is not None and hasattr(m, "lora_A"):
            parent, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, leaf, base)


@torch.no_grad()
def merge_lora(module: nn.Module, weights: dict[str, torch.Tensor], scale: float, source: str,
               rank: int | None = None) -> int:
    """Add ``scale * B @ A`` to each adapted layer's weight in place (Linear: A (r, in), B (out, r); Conv2d:
    A (r, in, kh, kw), B (out, r, 1, 1)). ``rank``: the rank every pair must have. Errors name ``source``
    and the layer. Returns the number of layers updated."""
    odd = sorted(k for k in weights if not k.endswith((".lora_A", ".lora_B")))
    if odd:
        raise DreamPoseError(f"{source}: {odd[0]} is not a LoRA factor (<layer>.lora_A or <layer>.lora_B)")
    names = sorted({k.rsplit(".", 1)[0] for k in weights})
    for name in names:
        a, b = weights.get(f"{name}.lora_A"), weights.get(f"{name}.lora_B")
        if a is None or b is None:
            raise DreamPoseError(f"{source}: {name} has only one of lora_A and lora_B (the file is incomplete)")
        if a.dim() not in (2, 4) or b.dim() != a.dim() or a.shape[0] != b.shape[1] or (
                b.dim() == 4 and b.shape[2:] != (1, 1)) or (rank is not None and a.shape[0] != rank):
            raise DreamPoseError(f"{source}: {name}'s factors A {tuple(a.shape)} and B {tuple(b.shape)} are not a "
                                 f"rank-{rank if rank is not None else a.shape[0]} pair")
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            raise DreamPoseError(f"{source}: the model has no layer {name} (a subject of another architecture)") from None
        w = layer.weight
        if a.dim() != w.dim():
            raise DreamPoseError(f"{source}: {name} is a {type(layer).__name__} with a {w.dim()}-D weight, its factors "
                                 f"are {a.dim()}-D")
        if isinstance(layer, nn.Linear):
            delta = b @ a
        elif isinstance(layer, nn.Conv2d):
            delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])
        else:
            raise DreamPoseError(f"{source}: {name} is a {type(layer).__name__}, not a Linear or Conv2d")
        if delta.shape != w.shape:
            raise DreamPoseError(f"{source}: {name}'s update is {tuple(delta.shape)}, its weight {tuple(w.shape)}")
        if not bool(torch.isfinite(delta).all()):
            raise DreamPoseError(f"{source}: {name}'s update holds non-finite values")
        w.add_((delta * scale).to(device=w.device, dtype=w.dtype))
    return len(names)


#: the parts of a model folder the loader reads (dreampose.model.DreamPoseModel.from_pretrained)
_MODEL_PARTS = ("unet", "vae", "image_encoder", "adapter", "scheduler")
#: dreampose.json's rendering defaults: changing them changes no weight
_SAMPLING_DEFAULTS = ("s_image", "s_pose", "num_inference_steps")


def _config_bytes(path: Path, top: bool) -> bytes:
    """A config's content without what a re-save changes (keys "_name_or_path", "_diffusers_version",
    "transformers_version", ...) and, for the top-level dreampose.json (``top``), the rendering defaults."""
    import json

    data = read_json(path)
    skip = _SAMPLING_DEFAULTS if top else ()
    kept = {k: v for k, v in data.items() if not k.startswith("_") and not k.endswith("_version") and k not in skip}
    return json.dumps(kept, sort_keys=True).encode()


def model_fingerprint(folder: PathLike) -> str:
    """A hash of what a model folder's loader reads: each part's weights and configs, by content (not the
    folder's path, not what a re-save rewrites, not the rendering defaults, and nothing else in the folder:
    a subject or engine folder kept inside it does not count). What a subject folder records of its base."""
    from .model import CONFIG_NAME

    folder = Path(folder)
    files = [folder / CONFIG_NAME] + sorted(
        f for part in _MODEL_PARTS if (folder / part).is_dir() for f in (folder / part).iterdir()
        if f.is_file() and f.suffix in (".safetensors", ".json"))
    h = hashlib.sha256()
    for f in files:
        if not f.is_file():
            raise DreamPoseError(f"{f}: not found (is {folder} a DreamPose model folder?)")
        h.update(f.relative_to(folder).as_posix().encode() + b"\0")
        if f.suffix == ".json":
            h.update(_config_bytes(f, top=f.parent == folder))
        else:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class SubjectInfo:
    """What a subject folder's subject.json says: the LoRA settings, the base model's fingerprint (and the
    folder it was trained from, for messages), and how it was trained."""

    lora: LoraSettings
    base_fingerprint: str
    base_model: str = ""
    trained: dict = dataclasses.field(default_factory=dict)
    format_version: int = SUBJECT_FORMAT

    @classmethod
    def load(cls, folder: PathLike) -> "SubjectInfo":
        folder = Path(folder)
        if not folder.is_dir():
            raise DreamPoseError(f"{folder}: subject folder not found")
        path = folder / SUBJECT_CONFIG
        if not path.is_file():
            raise DreamPoseError(f"{folder}: not a subject folder (no {SUBJECT_CONFIG}); make one with "
                                 "`dreampose-rt finetune --lora-rank R`")
        data = read_json(path)
        if data.get("format_version") != SUBJECT_FORMAT:
            raise DreamPoseError(f"{path}: subject format {data.get('format_version')!r} is not {SUBJECT_FORMAT}")
        lora = dataclass_from_dict(LoraSettings, data.get("lora", {}), f"{path} [lora]")
        return cls(lora=lora, base_fingerprint=str(data.get("base_fingerprint", "")),
                   base_model=str(data.get("base_model", "")), trained=dict(data.get("trained", {})))

    def to_dict(self) -> dict:
        return {"format_version": self.format_version, "lora": self.lora.to_dict(),
                "base_fingerprint": self.base_fingerprint, "base_model": self.base_model, "trained": self.trained}


def apply_subject(model: "DreamPoseModel", subject: PathLike, base_fingerprint: str) -> SubjectInfo:
    """Merge a subject folder into ``model`` (its base, loaded from the folder of ``base_fingerprint``): the
    UNet's (and decoder's) LoRA updates into their weights, the adapter's weights replaced. A folder made
    for another base model is refused with one line."""
    from .model import check_finite, load_state_dict_checked, read_safetensors

    folder = Path(subject)
    info = SubjectInfo.load(folder)
    if info.base_fingerprint != base_fingerprint:
        raise DreamPoseError(f"{folder}: this subject was trained on another base model ({info.base_model or '?'}, "
                             f"fingerprint {info.base_fingerprint}; this base is {base_fingerprint}); finetune it "
                             "on this base, or load the base it was made for")

    def read(name: str) -> dict[str, torch.Tensor]:
        path = folder / name
        if not path.is_file():
            raise DreamPoseError(f"{path}: not found (the subject folder is incomplete)")
        state, _ = read_safetensors(folder, name, "subject")
        check_finite(state, str(path))
        return state

    n = merge_lora(model.unet, read(UNET_LORA), info.lora.scale, str(folder / UNET_LORA), info.lora.rank)
    adapter = read(ADAPTER_WEIGHTS)
    load_state_dict_checked(model.adapter, {k: v.to(model.adapter.linear1.weight.dtype) for k, v in adapter.items()},
                            str(folder / ADAPTER_WEIGHTS))
    if info.lora.decoder:
        n += merge_lora(model.vae.decoder, read(DECODER_LORA), info.lora.scale, str(folder / DECODER_LORA),
                        info.lora.rank)
    logger.info("subject %s: merged %d LoRA layer(s) (rank %d) into the base model", folder, n, info.lora.rank)
    return info


def save_subject(folder: PathLike, model: "DreamPoseModel", info: SubjectInfo,
                 inputs: Iterable[PathLike | None] = ()) -> Path:
    """Write the subject folder of a model with injected LoRA layers (:func:`add_lora`): the UNet's (and,
    with ``info.lora.decoder``, the VAE decoder's) LoRA factors, the adapter's weights and subject.json,
    atomically (``folder`` must be new, empty or an earlier finetune's output). Returns the folder."""
    from safetensors.torch import save_file

    from .outputs import atomic_dir
    from .utils import write_json

    folder = Path(folder)
    unet = lora_weights(model.unet)
    if not unet:
        raise DreamPoseError("the model's UNet has no LoRA layers to save")
    with atomic_dir(folder, "finetune", inputs) as tmp:
        save_file(unet, str(tmp / UNET_LORA))
        save_file({k: v.detach().float().cpu().contiguous() for k, v in model.adapter.state_dict().items()},
                  str(tmp / ADAPTER_WEIGHTS))
        if info.lora.decoder:
            save_file(lora_weights(model.vae.decoder), str(tmp / DECODER_LORA))
        write_json(tmp / SUBJECT_CONFIG, info.to_dict())
    return folder


def subject_bytes(folder: PathLike) -> int:
    """The size of a subject folder's weights (bytes)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def training_memory(model: "DreamPoseModel", settings: LoraSettings | None, param_bytes: int = 2,
                    optimizer_state_bytes: int = 8) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state of a subject finetune of ``model`` (its UNet and
    adapter phase): every weight stored at ``param_bytes`` (fp16: 2), the trained ones with fp32 gradients
    and ``optimizer_state_bytes`` per trained parameter (AdamW's two fp32 moments: 8; an 8-bit AdamW: 2).
    ``settings`` None: a full finetune (every UNet and adapter parameter trained). Activations are not
    counted (they depend on the batch, the resolution and gradient checkpointing). ``model``: without LoRA
    layers (the base model the finetune starts from)."""
    if any(hasattr(m, "lora_A") for m in model.unet.modules()):
        raise DreamPoseError("training_memory counts a base model; this one already holds LoRA layers")
    frozen = sum(p.numel() for n in ("vae", "image_encoder") for p in getattr(model, n).parameters())
    unet = sum(p.numel() for p in model.unet.parameters())
    adapter = sum(p.numel() for p in model.adapter.parameters())
    if settings is None:
        trained = unet + adapter
    else:
        trained = adapter + lora_parameters(model.unet, unet_targets(model.unet, settings.targets), settings.rank)
    stored = (frozen + unet + adapter) * param_bytes + (trained - adapter if settings else 0) * 4
    return {"parameters": stored, "gradients": trained * 4, "optimizer_state": trained * optimizer_state_bytes,
            "trained_parameters": trained}


__all__ = ["LoraSettings", "SubjectInfo", "TARGETS", "add_lora", "apply_subject", "decoder_targets", "lora_parameters",
           "lora_weights", "mark_trainable", "merge_lora", "model_fingerprint", "remove_lora", "require_peft",
           "save_subject", "subject_bytes", "training_memory", "unet_targets"]
