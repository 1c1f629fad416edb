"""The training loop: soft Dice + BCE on logits, AdamW, a decaying learning rate, and the checkpoint
kept by a validation metric (AJI of the real post-processing by default).

Validation uses only the "select" images of each dataset (see ``configs/datasets.yaml``); the
"report" images are never seen here, so numbers reported on them are not tuned to them.

Resumable: every validation (and a stop by time budget or ``until_step``) writes
``<out>.state.safetensors`` (model, optimiser, random state) and ``<out>.state.json`` (step, best
score, history); a rerun with the same ``--out`` continues from there, exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from ..config import TrainConfig
from ..errors import ConfigError
from ..evaluate.metrics import pair_counts
from ..evaluate.protocol import primary_metric
from ..model.checkpoint import checkpoint_stem, load_checkpoint, packaged_weights, save_checkpoint
from ..model.cpu_heap import retain_freed_memory
from ..model.grunet import GRUNet, GRUNetConfig
from ..model.predictor import available_cores, choose_device, cpu_has_native_bf16
from ..model.training_form import TrainingGRUNet
from ..postprocess import PostprocessParams, label_nuclei
from .augment import brightness_contrast, random_blur, random_dihedral, random_scale_edge, resize_crop, stain_jitter
from .data import Sample, distance_target, load_dataset
from .tune import INSTANCE_OBJECTIVE_EXCLUDES

log = logging.getLogger(__name__)

_AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class TrainingData:
    train: list[Sample]
    val: list[Sample]
    sources: list[dict[str, Any]] = field(default_factory=list)

    @property
    def select(self) -> list[Sample]:
        """Validation images that choose the checkpoint and tune post-processing."""
        return [s for s in self.val if s.split == "select"]

    @property
    def report(self) -> list[Sample]:
        """Validation images used only for reported numbers."""
        return [s for s in self.val if s.split == "report"]


def load_training_data(
    folders: list[Path], cfg: TrainConfig, labels_dir: str | None = None, mpp: float | None = None
) -> TrainingData:
    data = TrainingData([], [])
    for folder in folders:
        train, val, spec = load_dataset(Path(folder), cfg.mpp, labels_dir, mpp)
        data.train += train
        data.val += val
        data.sources.append(
            {
                "dataset": spec.name,
                "labels": spec.labels_dir,
                "mpp": spec.mpp,
                "licence": spec.licence,
                "train_images": [s.name for s in train],
                "validation_images": [s.name for s in val],
                "select_images": [s.name for s in val if s.split == "select"],
                "report_images": [s.name for s in val if s.split == "report"],
            }
        )
    if not data.train:
        raise ConfigError(
            f"{', '.join(str(f) for f in folders)}: no training images (all are validation images or none exist)"
        )
    return data


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 - soft Dice over the whole batch flattened together (the published dice_loss)."""
    intersection = (prob * target).sum()
    return 1 - (2 * intersection + eps) / (prob.sum() + target.sum() + eps)


def segmentation_loss(
    logits: torch.Tensor, fg: torch.Tensor, dist: torch.Tensor | None, distance_weight: float
) -> torch.Tensor:
    fg_logit = logits[:, :1].float()
    loss = soft_dice_loss(torch.sigmoid(fg_logit), fg) + F.binary_cross_entropy_with_logits(fg_logit, fg)
    if dist is not None:
        pred = torch.sigmoid(logits[:, 1:2].float())
        loss = loss + distance_weight * F.mse_loss(pred, dist) * 10  # distance errors are small in magnitude
    return loss


# --- learning rate --------------------------------------------------------------------------------


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """The rate for optimiser step ``step`` (0-based): linear warm-up to ``lr``, then the schedule.

    cosine: from ``lr`` down to ``lr_min`` at ``max_steps``; step: ``lr * step_gamma ** k`` after
    ``k * step_every`` steps past the warm-up; constant: ``lr``."""
    warmup = cfg.warmup_steps
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    after = step - warmup
    if cfg.schedule == "cosine":
        progress = min(1.0, after / max(1, cfg.max_steps - warmup))
        return cfg.lr_min + (cfg.lr - cfg.lr_min) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        return cfg.lr * cfg.step_gamma ** (after // cfg.step_every)
    return cfg.lr


# --- speed settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeedSettings:
    device: torch.device
    amp: str  # bf16 | fp16 | fp32
    channels_last: bool
    threads: int | None  # CPU only

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return _AMP_DTYPES[self.amp]

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.amp_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "amp": self.amp,
            "channels_last": self.channels_last,
            "threads": self.threads,
        }


def resolve_speed(cfg: TrainConfig, native_bf16: Callable[[], bool] = cpu_has_native_bf16) -> SpeedSettings:
    """``auto`` values for the device: on CPU bf16 autocast only where bf16 is native (emulated bf16
    is slower than float32), channels-last always (oneDNN's layout); on CUDA bf16 in NCHW."""
    device = choose_device(cfg.device)
    amp = str(cfg.amp)
    layout = cfg.channels_last
    if device.type == "cpu":
        if amp == "auto":
            amp = "bf16" if native_bf16() else "fp32"
        channels_last = True if layout == "auto" else bool(layout)
        threads: int | None = cfg.threads or available_cores()
    else:
        if amp == "auto":
            amp = "bf16"
        channels_last = False if layout == "auto" else bool(layout)
        threads = cfg.threads
    if amp not in _AMP_DTYPES:
        raise ConfigError(f"amp: {cfg.amp!r} is not one of auto, bf16, fp16, fp32")
    return SpeedSettings(device, amp, channels_last, threads)


# --- data -----------------------------------------------------------------------------------------


class CropSampler:
    """Random crops from images resident on the training device, area-weighted, seeded.

    Each crop is cut from a window ``random_scale_edge`` px wide and resized to ``crop`` (scale
    augmentation), then flipped/rotated; colour augmentation is applied to the batch later."""

    def __init__(
        self, samples: list[Sample], crop: int, device: torch.device, with_distance: bool, scale: bool = True
    ) -> None:
        self.crop = crop
        self.scale = scale
        # the largest source window, so that every image can supply it
        self.pad_to = random_scale_edge(crop, torch.Generator().manual_seed(0), (1.25, 1.25)) if scale else crop
        self.images: list[torch.Tensor] = []
        self.fgs: list[torch.Tensor] = []
        self.dists: list[torch.Tensor] = []
        for s in samples:
            image, labels = s.image, s.labels
            pad_h, pad_w = max(0, self.pad_to - image.shape[0]), max(0, self.pad_to - image.shape[1])
            if pad_h or pad_w:  # small images are padded with reflected tissue
                image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
                labels = np.pad(labels, ((0, pad_h), (0, pad_w)), mode="reflect")
            self.images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().to(device))
            self.fgs.append(torch.from_numpy((labels > 0).astype(np.uint8)).to(device))
            if with_distance:
                self.dists.append(torch.from_numpy(distance_target(labels)).half().to(device))
        areas = torch.tensor([float(im.shape[1] * im.shape[2]) for im in self.images])
        self.weights = areas / areas.sum()

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator).tolist()
        images, fgs, dists = [], [], []
        for i in idx:
            edge = random_scale_edge(self.crop, generator) if self.scale else self.crop
            h, w = self.images[i].shape[1:]
            y = int(torch.randint(0, h - edge + 1, (1,), generator=generator))
            x = int(torch.randint(0, w - edge + 1, (1,), generator=generator))
            sl = (slice(y, y + edge), slice(x, x + edge))
            targets = [(self.fgs[i][sl][None], True)]
            if self.dists:
                targets.append((self.dists[i][sl][None], False))
            image, resized = resize_crop(self.images[i][(slice(None), *sl)].float() / 255, targets, self.crop)
            images.append(image.clamp(0, 1))
            fgs.append(resized[0])
            if self.dists:
                dists.append(resized[1])
        tensors = [torch.stack(images), torch.stack(fgs)]
        if dists:
            tensors.append(torch.stack(dists))
        tensors = random_dihedral(tensors, generator)
        return tensors[0], tensors[1], (tensors[2] if dists else None)


def augment_colour(images: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Stain (HED) jitter, then brightness/contrast and occasional blur; all skipped at colour_jitter 0."""
    if cfg.colour_jitter <= 0:
        return images
    images = stain_jitter(images, cfg.colour_jitter, generator)
    images = brightness_contrast(images, generator)
    return random_blur(images, generator)


# --- validation -----------------------------------------------------------------------------------


@torch.no_grad()
def predict_probability(model: nn.Module, image: np.ndarray, speed: SpeedSettings) -> np.ndarray:
    """Foreground probability (H, W) float32 of one whole image (padded with white to a multiple of 16)."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((0, (-h) % 16), (0, (-w) % 16), (0, 0)), constant_values=255)
    x = torch.from_numpy(padded).permute(2, 0, 1)[None].float().div(255).to(speed.device)
    if speed.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with speed.autocast():
        logits = model(x)
    return torch.sigmoid(logits[0, 0].float())[:h, :w].cpu().numpy()


def objective_mean(per_image: list[dict[str, Any]], key: str) -> float:
    """Mean of ``key`` over the images that steer instance metrics (not TNBC's merged labels);
    over all images when only such datasets are given. Dice-type keys use every image."""
    rows = per_image
    if key == "aji":
        steering = [m for m in per_image if m["dataset"] not in INSTANCE_OBJECTIVE_EXCLUDES]
        rows = steering or per_image
    return float(np.mean([m[key] for m in rows])) if rows else float("nan")


def validate(
    model: nn.Module, samples: list[Sample], speed: SpeedSettings, mpp: float, params: PostprocessParams
) -> dict[str, Any]:
    """AJI of ``label_nuclei`` (with ``params``) and Dice / soft Dice on ``samples`` at model resolution.

    Returns the means (AJI over the non-TNBC images, Dice and soft Dice over all) and per-dataset means."""
    was_training = model.training
    model.eval()
    per_image: list[dict[str, Any]] = []
    for s in samples:
        # a diverged model (non-finite outputs) scores as finding nothing instead of stopping the run
        prob = np.nan_to_num(predict_probability(model, s.image, speed), nan=0.0, posinf=1.0, neginf=0.0)
        labels = label_nuclei(prob, mpp, params)
        metrics = pair_counts(s.labels, labels, prob, params.threshold).metrics()
        per_image.append(
            {
                "dataset": s.dataset,
                "image": s.name,
                "aji": float(metrics["aji"]),
                "dice": float(metrics["dice"]),
                "soft_dice": float(metrics["soft_dice"]),
                "pq": float(metrics["pq"]),
            }
        )
    model.train(was_training)
    datasets: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(m["dataset"] for m in per_image):
        rows = [m for m in per_image if m["dataset"] == name]
        datasets[name] = {k: float(np.mean([m[k] for m in rows])) for k in ("aji", "dice", "soft_dice", "pq")}
    return {
        "aji": objective_mean(per_image, "aji"),
        "dice": objective_mean(per_image, "dice"),
        "soft_dice": objective_mean(per_image, "soft_dice"),
        "datasets": datasets,
        "images": [m["image"] for m in per_image],
    }


def worst_gain(datasets: dict[str, dict[str, float]], start: dict[str, dict[str, float]]) -> float:
    """The smallest gain over ``start`` among the datasets, each by its primary score (the protocol's)."""
    return min(scores[primary_metric(name)] - start[name][primary_metric(name)] for name, scores in datasets.items())


def selection_score(scores: dict[str, Any], start: dict[str, Any] | None, select_by: str) -> float:
    """What picks the kept checkpoint: a metric's mean, or the worst gain over the starting scores."""
    if select_by == "worst_gain":
        return worst_gain(scores["datasets"], (start or scores)["datasets"])
    return float(scores[select_by])


# --- state ----------------------------------------------------------------------------------------


def _state_paths(out: Path) -> tuple[Path, Path]:
    stem = checkpoint_stem(out)
    return stem.with_name(stem.name + ".state.safetensors"), stem.with_name(stem.name + ".state.json")


def _replace_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` beside ``path`` and rename it into place: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def candidates_dir(out: Path) -> Path:
    """Where ``keep_candidates`` writes each validated step's weights."""
    stem = checkpoint_stem(out)
    return stem.with_name(stem.name + ".candidates")


def run_arguments_path(out: Path) -> Path:
    stem = checkpoint_stem(out)
    return stem.with_name(stem.name + ".run.json")


def write_run_arguments(
    out: Path, folders: list[Path], cfg: TrainConfig, labels_dir: str | None, mpp: float | None
) -> None:
    """What ``train --resume OUT`` needs to continue the run: data, label folder, pixel size, config."""
    path = run_arguments_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    arguments = {
        "data": [str(Path(f).resolve()) for f in folders],
        "labels_dir": labels_dir,
        "mpp": mpp,
        "config": asdict(cfg),
    }
    _replace_json(path, arguments)


def read_run_arguments(out: Path) -> dict[str, Any]:
    """The arguments a run at ``out`` was started with (see ``write_run_arguments``)."""
    path = run_arguments_path(out)
    try:
        arguments = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--resume {out}: no run was started there ({path} is missing)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the run's arguments ({exc})") from None
    return arguments


PROGRESS_EVERY = 10  # steps between updates of <out>.progress.json (a run in the background has no bar)


def progress_path(out: Path) -> Path:
    stem = checkpoint_stem(out)
    return stem.with_name(stem.name + ".progress.json")


def write_progress(out: Path, info: dict[str, Any], lr: float, max_steps: int) -> None:
    """Where a run stands between validations: step, loss, rate, time per step, best so far."""
    path = progress_path(out)
    record = {
        "step": info["step"],
        "max_steps": max_steps,
        "running_loss": info.get("running_loss"),
        "lr": lr,
        "last_step_seconds": info.get("last_step_seconds"),
        "best": info["best"] if "best_step" in info else None,  # no -Infinity in the file
        "best_step": info.get("best_step"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _replace_json(path, record)


def save_training_state(
    out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator, info: dict
) -> None:
    """Model + optimiser tensors in safetensors, counters in JSON (no pickle); written atomically."""
    tensor_path, json_path = _state_paths(out)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.sampler"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tensor_path) + ".tmp")
    Path(str(json_path) + ".tmp").write_text(json.dumps(info, indent=2))
    os.replace(str(tensor_path) + ".tmp", tensor_path)
    os.replace(str(json_path) + ".tmp", json_path)


def load_training_state(
    out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator, form: str
) -> dict | None:
    """Restore a saved state into ``model`` (in the form named ``form``); None when there is none."""
    tensor_path, json_path = _state_paths(out)
    if not (tensor_path.exists() and json_path.exists()):
        return None
    info = json.loads(json_path.read_text())
    if info.get("form") != form:
        raise ConfigError(
            f"{json_path}: this training state was saved for model form {info.get('form') or 'published layout'!r}, "
            f"the config trains {form!r} (freeze_levels); continue with the config it was started with "
            "or train into another folder"
        )
    tensors = load_file(str(tensor_path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state = optimizer.state_dict()
    device = next(model.parameters()).device
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state["state"].setdefault(int(index), {})[key] = value.to(device) if key != "step" else value
    optimizer.load_state_dict(state)
    generator.set_state(tensors["rng.sampler"])
    torch.set_rng_state(tensors["rng.torch"])
    return info


# --- initial weights ------------------------------------------------------------------------------


def initial_model(cfg: TrainConfig) -> tuple[GRUNet, dict[str, Any]]:
    """A new GRU-Net from ``cfg``, or one loaded from ``init_weights`` ("packaged" or a checkpoint path).

    Returns the model and what the start was (source, sha256, its post-processing parameters)."""
    if cfg.init_weights is None:
        arch = GRUNetConfig(
            base_filters=cfg.base_filters, attention_width=cfg.attention_width, aux_distance_head=cfg.aux_distance_head
        )
        return GRUNet(arch), {"source": "random initialisation", "postprocess": {}}
    path = packaged_weights() if cfg.init_weights == "packaged" else Path(cfg.init_weights)
    if path is None:
        raise ConfigError("init_weights: 'packaged' was given but this installation has no packaged weights")
    bundle = load_checkpoint(path)  # raises CheckpointError naming the file when missing or damaged
    if abs(bundle.mpp - cfg.mpp) > 1e-6:
        raise ConfigError(
            f"init_weights: {path} was trained at {bundle.mpp} um/px but mpp is {cfg.mpp}; "
            f"set mpp: {bundle.mpp} or start from other weights"
        )
    arch = bundle.model.config
    if arch.aux_distance_head != cfg.aux_distance_head:
        raise ConfigError(
            f"init_weights: {path} has aux_distance_head {arch.aux_distance_head}, "
            f"the config asks for {cfg.aux_distance_head}"
        )
    model = bundle.model.float().train()
    return model, {
        "source": cfg.init_weights,
        "path": str(path),
        "sha256": bundle.sha256,
        "postprocess": dict(bundle.metadata.get("postprocess") or {}),
        "training": bundle.metadata.get("training"),
    }


# --- one step -------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """What an optimiser step needs: the model in its training form, the optimiser, the batches."""

    model: TrainingGRUNet
    optimizer: torch.optim.Optimizer
    sampler: CropSampler
    generator: torch.Generator
    speed: SpeedSettings
    cfg: TrainConfig
    scaler: torch.amp.GradScaler

    @property
    def form(self) -> str:
        """The layout of the saved training state: a state only continues in the same form."""
        frozen = ", attention frozen" if self.cfg.freeze_attention else ""
        return f"skips read once, {self.cfg.freeze_levels} frozen levels{frozen}"

    def step(self, lr: float) -> float:
        """One optimiser step on a fresh augmented batch at learning rate ``lr``; returns the loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images, fg, dist = self.sampler.sample(self.cfg.batch_size, self.generator)
        images = augment_colour(images, self.cfg, self.generator)
        if self.speed.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.speed.autocast():
            logits = self.model(images)
        loss = segmentation_loss(logits, fg, dist, self.cfg.distance_weight)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())


def start_training_run(cfg: TrainConfig, data: TrainingData) -> tuple[TrainingRun, dict[str, Any]]:
    """The model (from ``init_weights`` or new), in its training form, with a fresh optimiser and sampler,
    all seeded by ``cfg.seed``; also what the start was (see ``initial_model``)."""
    torch.manual_seed(cfg.seed)
    speed = resolve_speed(cfg)
    if speed.device.type == "cpu":
        retain_freed_memory()  # activations and gradients are re-allocated every step: no page faults
        if speed.threads:
            torch.set_num_threads(speed.threads)
    published, init = initial_model(cfg)
    model = TrainingGRUNet(published.to(speed.device).train(), cfg.freeze_levels, cfg.freeze_attention)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = CropSampler(data.train, cfg.crop, speed.device, cfg.aux_distance_head)
    scaler = torch.amp.GradScaler("cuda", enabled=speed.amp == "fp16" and speed.device.type == "cuda")
    return TrainingRun(model, optimizer, sampler, generator, speed, cfg, scaler), init


def describe_start(init: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint's JSON says of the weights its run started from (see ``initial_model``)."""
    start = {k: v for k, v in init.items() if k != "training"}
    if isinstance(init.get("training"), dict):
        start["previous_training"] = {k: init["training"].get(k) for k in ("step", "config")}
    return start


class StopRequests:
    """SIGTERM and Ctrl-C ask a run to stop after its current step, with its state saved (main thread
    only, where Python delivers signals); ``restore`` puts the previous handlers back."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


# --- the loop -------------------------------------------------------------------------------------


def train(
    folders: list[Path],
    out: Path,
    cfg: TrainConfig,
    labels_dir: str | None = None,
    mpp: float | None = None,
    progress: bool = True,
    until_step: int | None = None,
) -> dict[str, Any]:
    """Train GRU-Net; keep the checkpoint with the best ``select_by`` score on the select images in ``out``.

    ``until_step`` stops (with the state saved) before ``max_steps`` without changing the schedule, so
    a later call continues the same run exactly."""
    start = time.monotonic()
    data = load_training_data(folders, cfg, labels_dir, mpp)
    val = (data.val if cfg.validation_split == "all" else data.select) or data.train[:1]
    run, init = start_training_run(cfg, data)
    model, optimizer, generator, speed = run.model, run.optimizer, run.generator, run.speed
    params = PostprocessParams.from_dict(init["postprocess"]) if init["postprocess"] else PostprocessParams()
    if cfg.validation_threshold is not None:
        params = dataclasses.replace(params, threshold=cfg.validation_threshold)
    write_run_arguments(out, folders, cfg, labels_dir, mpp)

    info = load_training_state(out, model, optimizer, generator, run.form) or {
        "step": 0,
        "best": -math.inf,
        "history": [],
        "form": run.form,
        "init": describe_start(init),
    }
    # A resumed run started from the weights of its first start, even if "packaged" means others now.
    start_weights = info.get("init") or describe_start(init)
    if info["step"]:
        log.info("resuming %s from step %d (best %s %.4f)", out, info["step"], cfg.select_by, info["best"])
    metadata: dict[str, Any] = {
        "mpp": cfg.mpp,
        "patch_size": cfg.crop,
        "threshold": params.threshold,
        "trained": True,
        "postprocess": params.to_dict(),
        "training": {
            "config": asdict(cfg),
            "data": data.sources,
            "speed": speed.to_dict(),
            "form": run.form,
            "init": start_weights,
            "selection": {"metric": cfg.select_by, "split": cfg.validation_split, "postprocess": params.to_dict()},
        },
    }

    def checkpoint(scores: dict[str, Any], where: Path = out) -> None:
        metadata["training"].update(step=info["step"], validation={"split": cfg.validation_split, **scores})
        save_checkpoint(where, model.published_model(), metadata)

    def validate_and_keep(lr: float) -> dict[str, Any]:
        val_start = time.monotonic()
        scores = validate(model, val, speed, cfg.mpp, params)
        info["history"].append(
            {
                "step": info["step"],
                "loss": info.get("running_loss"),
                "lr": lr,
                **scores,
                "step_seconds": info.get("last_step_seconds"),
                "validation_seconds": time.monotonic() - val_start,
                "minutes": (time.monotonic() - start) / 60,
            }
        )
        log.info(
            "step %d loss %.4f lr %.2e select AJI %.4f Dice %.4f soft Dice %.4f",
            info["step"],
            info.get("running_loss") or float("nan"),
            lr,
            scores["aji"],
            scores["dice"],
            scores["soft_dice"],
        )
        start_scores = info["history"][0] if info["history"] else None
        score = info["history"][-1]["selection_score"] = selection_score(scores, start_scores, cfg.select_by)
        if cfg.keep_candidates:
            checkpoint(scores, candidates_dir(out) / f"step-{info['step']:06d}")
        if score > info["best"]:
            info["best"] = score
            info["best_step"] = info["step"]
            checkpoint(scores)
        save_training_state(out, model, optimizer, generator, info)
        return scores

    if info["step"] == 0 and not info["history"] and cfg.init_weights is not None:
        validate_and_keep(0.0)  # the starting weights compete too: a run that never improves keeps them
    lr = learning_rate(info["step"], cfg)
    stop_at = min(cfg.max_steps, until_step) if until_step is not None else cfg.max_steps
    bar = tqdm(total=cfg.max_steps, initial=info["step"], disable=not progress, desc="train", unit="step")
    running = info.get("running_loss")  # a resumed run continues the smoothed loss
    stepped = False
    stop = StopRequests()
    while info["step"] < stop_at:
        if stop.requested:
            log.info("%s at step %d: state saved, continue with train --resume", stop.requested, info["step"])
            break
        if cfg.max_minutes is not None and time.monotonic() - start > cfg.max_minutes * 60:
            log.info("time budget of %.1f min reached at step %d", cfg.max_minutes, info["step"])
            if stepped and info["history"] and info["history"][-1]["step"] != info["step"]:
                validate_and_keep(lr)  # the steps since the last validation compete too
            break
        stepped = True
        lr = learning_rate(info["step"], cfg)
        step_start = time.monotonic()
        value = run.step(lr)
        info["step"] += 1
        running = value if running is None else 0.95 * running + 0.05 * value
        info["running_loss"] = running
        info["last_step_seconds"] = time.monotonic() - step_start
        bar.update(1)
        if info["step"] % PROGRESS_EVERY == 0:
            write_progress(out, info, lr, cfg.max_steps)
        if info["step"] % cfg.val_every == 0 or info["step"] == cfg.max_steps:
            scores = validate_and_keep(lr)
            bar.set_postfix(
                loss=f"{running:.3f}", **{f"val_{cfg.select_by}": f"{info['history'][-1]['selection_score']:.3f}"}
            )
    bar.close()
    stop.restore()
    if stepped and (not info["history"] or info["history"][-1]["step"] != info["step"]):
        save_training_state(out, model, optimizer, generator, info)  # stopped between validations
    if "best_step" not in info:  # stopped before the first validation: keep what there is
        scores = validate(model, val, speed, cfg.mpp, params)
        info["best"] = selection_score(scores, None, cfg.select_by)
        info["best_step"] = info["step"]
        checkpoint(scores)
        save_training_state(out, model, optimizer, generator, info)
    info["minutes"] = (time.monotonic() - start) / 60
    return info
