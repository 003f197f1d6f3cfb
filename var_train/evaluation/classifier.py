"""A small CNN classifier as a feature extractor, for data sets Inception does not describe well.

FID and IS computed with Inception features mean little on 64px handwritten digits; a classifier
trained on the data set itself gives features (its penultimate layer) that separate the classes,
logits for an Inception-Score-like measure, and per-class accuracy of generated images ("is the
generated 3 recognised as a 3?"). The numbers are comparable only between runs scored by the same
checkpoint (the extractor name recorded in reference statistics includes the file's hash).

    summary = train_classifier("data/digits", "runs/classifier.safetensors")   # CPU, seconds
    extractor = ClassifierFeatureExtractor.load("runs/classifier.safetensors")
    class_accuracy(extractor, images_uint8, labels)  # {"class_accuracy": 0.93, "class_accuracy/0": ...}

Registered as a feature-extractor kind: `build_feature_extractor(path)` of an existing file loads it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from var_train.data.images import IMAGE_EXTENSIONS, class_folders, list_image_files, read_image_rgb
from var_train.errors import MismatchError, MissingInputError
from var_train.models.checkpoint_io import build_from_record, metadata_json, read_weights, write_weights

from .features import ExtractedFeatures, ExtractorKind, FeatureExtractor, register_extractor, to_uint8_images
from .metrics import ClassAccuracy

CONFIG_METADATA_KEY = "classifier_config"


class SmallCNN(nn.Module):
    """Three conv stages (conv-BN-ReLU, 2x2 max-pool) at `input_size`, global average pool, a
    hidden layer whose activations are the features, and a linear classification head."""

    def __init__(self, num_classes: int, input_size: int = 16, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.input_size = input_size

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.body = nn.Sequential(stage(3, width), stage(width, 2 * width), stage(2 * width, 4 * width),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(4 * width, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_classes)

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.float().div(127.5).sub(1)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              antialias=True, align_corners=False)
        return x

    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.hidden(self.body(self.preprocess(images_uint8)))
        return features, self.head(features)


@dataclass
class ClassifierConfig:
    num_classes: int
    class_names: list[str]
    input_size: int = 16  # images are resized to this before the CNN (the digits are 8x8 scans)
    width: int = 32
    feature_dim: int = 128
    resolution: int = 64  # side of the images it was trained on


class ClassifierFeatureExtractor(FeatureExtractor):
    def __init__(self, config: ClassifierConfig, name_suffix: str = "untrained"):
        super().__init__()
        self.config = config
        self.network = SmallCNN(config.num_classes, config.input_size, config.width, config.feature_dim)
        self.num_features = config.feature_dim
        self.num_logits = config.num_classes
        self.name = f"small-cnn-classifier-{name_suffix}"
        self.eval()

    def extract(self, images: torch.Tensor) -> ExtractedFeatures:
        features, logits = self.network(images)
        return ExtractedFeatures(features.float(), logits.float())

    @classmethod
    def load(cls, path: str | Path) -> "ClassifierFeatureExtractor":
        path = Path(path)
        state, metadata = read_weights(path)
        if CONFIG_METADATA_KEY not in metadata:
            raise MismatchError(f"{path} is not a classifier checkpoint written by train_classifier "
                                f"(no {CONFIG_METADATA_KEY!r} in its metadata)")
        config = build_from_record(ClassifierConfig, metadata_json(path, metadata, CONFIG_METADATA_KEY), path)
        extractor = cls(config, _file_digest(path))
        extractor.network.load_state_dict(state, strict=True)
        extractor.network.requires_grad_(False)
        return extractor.eval()

    def save(self, path: str | Path) -> Path:
        return write_weights(self.network.state_dict(), path, {CONFIG_METADATA_KEY: json.dumps(asdict(self.config))})


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


# -- data ------------------------------------------------------------------------------------------
def read_image_folder(root: str | Path, resolution: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """An ImageFolder (`<root>/<class>/*.png`) -> (uint8 images (N, 3, R, R), labels (N,), class
    names). Images not R x R are resized (bicubic) to it; R defaults to the first image's side."""
    class_dirs = class_folders(root)
    images, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        try:
            files = list_image_files(class_dir)
        except ValueError:  # an empty class folder: the error below names the whole root if all are
            continue
        for file in files:
            image = read_image_rgb(file)
            resolution = resolution or image.width
            if image.size != (resolution, resolution):
                image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
            images.append(np.asarray(image))
            labels.append(label)
    if not images:
        raise MissingInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return pixels, torch.tensor(labels), [d.name for d in class_dirs]


def _augment(images: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random translations by up to `max_shift` pixels (padding with the border colour), so the
    classifier also recognises the slightly off-centre digits a generator produces."""
    if max_shift <= 0:
        return images
    padded = F.pad(images.float(), (max_shift,) * 4, mode="replicate")
    size = images.shape[-1]
    out = torch.empty_like(images)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + size, dx:dx + size].round().to(images.dtype)
    return out


@dataclass
class ClassifierSummary:
    path: Path
    train_accuracy: float
    val_accuracy: float
    num_train: int
    num_val: int
    epochs: int
    seconds: float


def train_classifier(image_folder: str | Path, out_path: str | Path, *, epochs: int = 8, batch_size: int = 64,
                     lr: float = 3e-3, val_fraction: float = 0.1, seed: int = 0, input_size: int = 16,
                     width: int = 32, feature_dim: int = 128, max_shift: int = 3,
                     device: str | torch.device = "cpu", progress: bool = True) -> ClassifierSummary:
    """Train the small CNN on an ImageFolder and save it (safetensors with its config).

    A seeded `val_fraction` of the images is held out and its accuracy reported; on the 1,797
    64px digits of `var-prep demo-data` this takes well under a minute on one CPU core and
    reaches 98-100% held-out accuracy (measured: 100% of 180 held-out images in 12 s)."""
    started = time.perf_counter()
    images, labels, class_names = read_image_folder(image_folder)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    num_val = int(round(val_fraction * len(images)))
    val_idx, train_idx = order[:num_val], order[num_val:]
    config = ClassifierConfig(num_classes=len(class_names), class_names=class_names, input_size=input_size,
                              width=width, feature_dim=feature_dim, resolution=images.shape[-1])
    torch.manual_seed(seed)
    extractor = ClassifierFeatureExtractor(config)
    network = extractor.network.to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(train_idx) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    from tqdm.auto import tqdm

    bar = tqdm(total=epochs * steps_per_epoch, desc="classifier", unit="step", disable=not progress)
    for _ in range(epochs):
        network.train()  # the network, not the extractor: the extractor pins itself to eval mode
        permutation = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for start in range(0, len(permutation), batch_size):
            batch = permutation[start:start + batch_size]
            x = _augment(images[batch], generator, max_shift).to(device)
            _, logits = network(x)
            loss = F.cross_entropy(logits, labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    network.eval().requires_grad_(False)

    def accuracy(index: torch.Tensor) -> float:
        if len(index) == 0:
            return float("nan")
        return class_accuracy(extractor, images[index], labels[index])["class_accuracy"]

    path = extractor.save(out_path)
    return ClassifierSummary(path=path, train_accuracy=accuracy(train_idx), val_accuracy=accuracy(val_idx),
                             num_train=len(train_idx), num_val=num_val, epochs=epochs,
                             seconds=time.perf_counter() - started)


@torch.no_grad()
def class_accuracy(extractor: FeatureExtractor, images: torch.Tensor, labels: torch.Tensor,
                   class_names: list[str] | None = None, batch_size: int = 256) -> dict[str, float]:
    """How often `extractor`'s classifier recognises each image as its intended class (the
    `ClassAccuracy` metric over a set of images held in memory, on this process).

    -> {"class_accuracy": overall, "class_accuracy/<name>": per class (only classes present)}.
    `images` uint8 or [0, 1] float (N, 3, H, W); `labels` (N,) the classes they were generated for."""
    if extractor.num_logits is None:
        raise ValueError(f"{extractor.name} has no classifier head, so no class accuracy")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if class_names is None:
        class_names = getattr(getattr(extractor, "config", None), "class_names", None)
    metric = ClassAccuracy(extractor.num_logits, class_names=class_names, per_class=True, synchronised=False)
    for start in range(0, len(images), batch_size):
        batch = slice(start, start + batch_size)
        metric.update(extractor(to_uint8_images(images[batch])), None, labels[batch].cpu())
    return metric.compute()


register_extractor(ExtractorKind(
    name="classifier", accepts=lambda spec: Path(spec).is_file(),
    build=lambda spec, inception_weights=None: ClassifierFeatureExtractor.load(spec),
    description="an existing classifier checkpoint (a .safetensors file written by "
                "var_train.evaluation.classifier.train_classifier)"))
