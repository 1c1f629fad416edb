"""The training loop: soft Dice + BCE on logits, AdamW, best checkpoint by validation soft Dice.

Resumable: every validation writes ``<out>.state.safetensors`` (model, optimiser, random state) and
``<out>.state.json`` (step, best score, history); a rerun with the same ``--out`` continues from there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..config import TrainConfig
from ..errors import ConfigError
from ..model.checkpoint import checkpoint_paths, save_checkpoint
from ..model.grunet import GRUNet, GRUNetConfig
from ..model.predictor import choose_device
from .augment import random_dihedral, stain_jitter
from .data import Sample, distance_target, load_dataset

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    train: list[Sample]
    val: list[Sample]
    sources: list[dict[str, Any]] = field(default_factory=list)


def load_training_data(folders: list[Path], cfg: TrainConfig, labels_dir: str | None = None, mpp: float | None = None) -> TrainingData:
    data = TrainingData([], [])
    for folder in folders:
        train, val, spec = load_dataset(Path(folder), cfg.mpp, labels_dir, mpp)
        data.train += train
        data.val += val
        data.sources.append({
            "dataset": spec.name, "labels": spec.labels_dir, "mpp": spec.mpp, "licence": spec.licence,
            "train_images": [s.name for s in train], "validation_images": [s.name for s in val],
        })
    if not data.train:
        raise ConfigError(f"{', '.join(str(f) for f in folders)}: no training images (all are validation images or none exist)")
    return data


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 - soft Dice over the whole batch flattened together (the published dice_loss)."""
    intersection = (prob * target).sum()
    return 1 - (2 * intersection + eps) / (prob.sum() + target.sum() + eps)


def segmentation_loss(logits: torch.Tensor, fg: torch.Tensor, dist: torch.Tensor | None, distance_weight: float) -> torch.Tensor:
    fg_logit = logits[:, :1].float()
    loss = soft_dice_loss(torch.sigmoid(fg_logit), fg) + F.binary_cross_entropy_with_logits(fg_logit, fg)
    if dist is not None:
        pred = torch.sigmoid(logits[:, 1:2].float())
        loss = loss + distance_weight * F.mse_loss(pred, dist) * 10  # distance errors are small in magnitude
    return loss


class CropSampler:
    """Random crops from images resident on the training device, area-weighted, seeded."""

    def __init__(self, samples: list[Sample], crop: int, device: torch.device, with_distance: bool) -> None:
        self.crop = crop
        self.images, self.fgs, self.dists = [], [], []
        for s in samples:
            image, labels = s.image, s.labels
            pad_h, pad_w = max(0, crop - image.shape[0]), max(0, crop - image.shape[1])
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
            h, w = self.images[i].shape[1:]
            y = int(torch.randint(0, h - self.crop + 1, (1,), generator=generator))
            x = int(torch.randint(0, w - self.crop + 1, (1,), generator=generator))
            sl = (slice(y, y + self.crop), slice(x, x + self.crop))
            images.append(self.images[i][(slice(None), *sl)])
            fgs.append(self.fgs[i][sl][None])
            if self.dists:
                dists.append(self.dists[i][sl][None])
        tensors = [torch.stack(images).float() / 255, torch.stack(fgs).float()]
        if dists:
            tensors.append(torch.stack(dists).float())
        tensors = random_dihedral(tensors, generator)
        return tensors[0], tensors[1], (tensors[2] if dists else None)


@torch.no_grad()
def validate(model: GRUNet, samples: list[Sample], device: torch.device, autocast) -> dict[str, float]:
    """Soft Dice (published metric) and Dice at 0.5, pooled over all validation pixels."""
    model.eval()
    inter = total = hard_inter = hard_total = 0.0
    for s in samples:
        h, w = s.labels.shape
        image = np.pad(s.image, ((0, (-h) % 16), (0, (-w) % 16), (0, 0)), constant_values=255)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255).to(device)
        with autocast():
            prob = torch.sigmoid(model(x)[0, 0].float())[:h, :w]
        fg = torch.from_numpy(s.labels > 0).float().to(device)
        inter += float((prob * fg).sum())
        total += float(prob.sum() + fg.sum())
        hard = (prob > 0.5).float()
        hard_inter += float((hard * fg).sum())
        hard_total += float(hard.sum() + fg.sum())
    model.train()
    return {"soft_dice": 2 * inter / max(total, 1e-7), "dice": 2 * hard_inter / max(hard_total, 1e-7)}


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = min(1.0, step / max(1, cfg.max_steps))
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
    return cfg.lr


def _state_paths(out: Path) -> tuple[Path, Path]:
    base, _ = checkpoint_paths(out)
    stem = base.with_suffix("")
    return stem.with_name(stem.name + ".state.safetensors"), stem.with_name(stem.name + ".state.json")


def save_training_state(out: Path, model: GRUNet, optimizer: torch.optim.Optimizer, generator: torch.Generator, info: dict) -> None:
    """Model + optimiser tensors in safetensors, counters in JSON (no pickle); written atomically."""
    tensor_path, json_path = _state_paths(out)
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


def load_training_state(out: Path, model: GRUNet, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> dict | None:
    tensor_path, json_path = _state_paths(out)
    if not (tensor_path.exists() and json_path.exists()):
        return None
    tensors = load_file(str(tensor_path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state = optimizer.state_dict()
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state["state"].setdefault(int(index), {})[key] = value.to(next(model.parameters()).device) if key != "step" else value
    optimizer.load_state_dict(state)
    generator.set_state(tensors["rng.sampler"])
    torch.set_rng_state(tensors["rng.torch"])
    return json.loads(json_path.read_text())


def train(folders: list[Path], out: Path, cfg: TrainConfig, labels_dir: str | None = None, mpp: float | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train GRU-Net and write the best checkpoint (by validation soft Dice) to ``out``."""
    start = time.monotonic()
    torch.manual_seed(cfg.seed)
    device = choose_device(cfg.device)
    data = load_training_data(folders, cfg, labels_dir, mpp)
    val = data.val or data.train[:1]
    arch = GRUNetConfig(base_filters=cfg.base_filters, attention_width=cfg.attention_width, aux_distance_head=cfg.aux_distance_head)
    model = GRUNet(arch).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = CropSampler(data.train, cfg.crop, device, cfg.aux_distance_head)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[cfg.amp] if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    info = load_training_state(out, model, optimizer, generator) or {"step": 0, "best": -1.0, "history": []}
    if info["step"]:
        log.info("resuming %s from step %d (best soft Dice %.4f)", out, info["step"], info["best"])
    metadata = {
        "mpp": cfg.mpp, "patch_size": cfg.crop, "threshold": 0.5, "trained": True,
        "training": {"config": asdict(cfg), "data": data.sources},
    }
    bar = tqdm(total=cfg.max_steps, initial=info["step"], disable=not progress, desc="train", unit="step")
    running = info["history"][-1]["loss"] if info["history"] else None  # a resumed run continues the smoothed loss
    while info["step"] < cfg.max_steps:
        if cfg.max_minutes is not None and time.monotonic() - start > cfg.max_minutes * 60:
            log.info("time budget of %.1f min reached at step %d", cfg.max_minutes, info["step"])
            break
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(info["step"], cfg)
        images, fg, dist = sampler.sample(cfg.batch_size, generator)
        images = stain_jitter(images, cfg.colour_jitter, generator)
        with autocast():
            logits = model(images)
        loss = segmentation_loss(logits, fg, dist, cfg.distance_weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        info["step"] += 1
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        bar.update(1)
        if info["step"] % cfg.val_every == 0 or info["step"] == cfg.max_steps:
            scores = validate(model, val, device, autocast)
            info["history"].append({"step": info["step"], "loss": running, **scores,
                                    "minutes": (time.monotonic() - start) / 60})
            if scores["soft_dice"] > info["best"]:
                info["best"] = scores["soft_dice"]
                metadata["training"].update(step=info["step"], validation=scores)
                save_checkpoint(out, model, metadata)
            save_training_state(out, model, optimizer, generator, info)
            bar.set_postfix(loss=f"{running:.3f}", val_dice=f"{scores['soft_dice']:.3f}")
    bar.close()
    if info["best"] < 0:  # stopped before the first validation: keep what there is
        scores = validate(model, val, device, autocast)
        info["best"] = scores["soft_dice"]
        metadata["training"].update(step=info["step"], validation=scores)
        save_checkpoint(out, model, metadata)
        save_training_state(out, model, optimizer, generator, info)
    info["minutes"] = (time.monotonic() - start) / 60
    return info
