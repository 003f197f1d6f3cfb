"""`var-train eval`: a checkpoint -> N class-balanced samples -> FID, IS, precision, recall as JSON.

Layout of `out_dir`:
    samples/000000_c0000.png ...   one PNG per sample: global index, class
    samples.npz                    `arr_0` uint8 (N, H, W, 3) + `arr_1` labels: what ADM's evaluator reads
    results.json                   metrics, settings, checkpoints, timings

Sample i has class i % num_classes. The global list is cut into batches of `batch_size`; batch b
is generated with a generator seeded by (seed, b) and by rank b % world_size, so the images do not
depend on the number of processes (they do on `batch_size`, which is recorded). Resumable: a
batch whose PNGs all exist is not generated again (PNGs are written under a temporary name and
renamed, so a killed run never leaves a half-written one behind).
"""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from numpy.lib import format as npy_format
from PIL import Image
from tqdm.auto import tqdm

from .features import build_feature_extractor
from .metrics import GenerativeMetrics
from .reference_stats import load_reference
from .sampling import RankPlan, batch_generator, class_balanced_labels, generate_batch

RESULTS_FILE = "results.json"
SAMPLES_DIR = "samples"
SAMPLES_NPZ = "samples.npz"


@dataclass
class EvalSettings:
    per_class: int = 50                  # 50 x 1000 classes = the paper's 50,000
    num_samples: int | None = None       # overrides per_class
    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    seed: int = 0
    batch_size: int = 32
    feature_extractor: str = "inception"
    inception_weights: str | None = None
    precision_recall: bool = True
    feature_batch_size: int = 100


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def load_var_any(path: str | Path):
    """A VAR from a reference .pth, our .safetensors, or a training checkpoint directory (a run
    directory, its `checkpoints/` or one `step-*` directory: consolidated on this process)."""
    from var_train.models.checkpoint_io import load_state_dict_strict, load_var

    path = Path(path)
    if path.is_dir():
        from var_train.checkpoint import consolidated_state_dict
        from var_train.models import VAR

        state, config = consolidated_state_dict(path)
        model = VAR(**config)
        load_state_dict_strict(model, state, str(path))
        return model
    return load_var(path)


def sample_path(samples_dir: Path, index: int, label: int) -> Path:
    return samples_dir / f"{index:06d}_c{label:04d}.png"


def _write_png(image_hwc: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(image_hwc).save(tmp, format="PNG")
    tmp.replace(path)


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def generate_samples(var, vae, labels: torch.Tensor, samples_dir: Path, settings: EvalSettings,
                     device: torch.device, progress: bool = True) -> dict:
    """Write the PNGs this rank is responsible for (batches b with b % world == rank); skip
    batches already complete. -> {"generated": n, "skipped": n, "seconds": s} for this rank."""
    rank, world = _rank_and_world()
    samples_dir.mkdir(parents=True, exist_ok=True)
    num_batches = -(-len(labels) // settings.batch_size)
    mine = list(range(rank, num_batches, world))
    generated = skipped = 0
    started = time.perf_counter()
    bar = tqdm(total=len(mine) * settings.batch_size, unit="img", desc=f"sampling (rank {rank}/{world})",
               disable=not (progress and rank == 0))
    for batch in mine:
        indices = list(range(batch * settings.batch_size, min(len(labels), (batch + 1) * settings.batch_size)))
        paths = [sample_path(samples_dir, i, int(labels[i])) for i in indices]
        if all(p.is_file() for p in paths):
            skipped += len(indices)
            bar.update(settings.batch_size)
            continue
        # Every batch is sampled at full size (the last padded), so a sample's noise depends only
        # on (seed, batch index), not on how many processes share the work.
        batch_labels = torch.zeros(settings.batch_size, dtype=torch.long)
        batch_labels[:len(indices)] = labels[indices]
        images = generate_batch(var, vae.quantize, vae, batch_labels.to(device), cfg=settings.cfg,
                                top_k=settings.top_k, top_p=settings.top_p,
                                generator=batch_generator(device, settings.seed, batch), decode_rows=len(indices))
        for image, path in zip(images.permute(0, 2, 3, 1).cpu().numpy(), paths):
            _write_png(image, path)
        generated += len(indices)
        bar.update(settings.batch_size)
        elapsed = time.perf_counter() - started
        bar.set_postfix(images_per_s=f"{generated * world / max(elapsed, 1e-9):.2f} (all ranks)")
    bar.close()
    return {"generated": generated, "skipped": skipped, "seconds": time.perf_counter() - started}


def write_samples_npz(samples_dir: Path, labels: torch.Tensor, out_path: Path) -> Path:
    """Stream every PNG, in index order, into `arr_0` (N, H, W, 3) uint8 plus `arr_1` labels,
    without holding all images in memory (50,000 256px images are 9.8 GB)."""
    first = _read_png(sample_path(samples_dir, 0, int(labels[0])))
    shape = (len(labels), *first.shape)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as stream:
            npy_format.write_array_header_2_0(stream, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for index, label in enumerate(labels.tolist()):
                image = _read_png(sample_path(samples_dir, index, label))
                if image.shape != first.shape:
                    raise ValueError(f"sample {index} has shape {image.shape}, sample 0 {first.shape}")
                stream.write(np.ascontiguousarray(image).tobytes())
        with archive.open("arr_1.npy", "w") as stream:
            npy_format.write_array(stream, labels.numpy().astype(np.int64))
    tmp.replace(out_path)
    return out_path


def score_samples(samples_dir: Path, labels: torch.Tensor, metrics: GenerativeMetrics, num_classes: int,
                  batch_size: int, progress: bool = True) -> dict[str, float]:
    """Every rank scores a contiguous slice of the PNGs; one gather at the end."""
    rank, world = _rank_and_world()
    plan = RankPlan.make(len(labels), batch_size, rank, world)
    correct = torch.zeros(2, dtype=torch.float64)
    for batch in tqdm(range(plan.num_batches), desc="scoring", unit="batch", disable=not (progress and rank == 0)):
        indices = plan.batch_indices(batch)
        if len(indices) == 0:
            continue
        pixels = np.stack([_read_png(sample_path(samples_dir, int(i), int(labels[i]))) for i in indices])
        extracted = metrics.update(torch.from_numpy(pixels).permute(0, 3, 1, 2), indices)
        if extracted.logits is not None and extracted.logits.shape[1] == num_classes:
            hits = (extracted.logits.argmax(dim=1).cpu() == labels[indices]).sum().item()
            correct += torch.tensor([hits, len(indices)], dtype=torch.float64)
    results = metrics.compute()
    if metrics.extractor.num_logits == num_classes:
        if world > 1:
            moved = correct.to(metrics.device)
            dist.all_reduce(moved)
            correct = moved.cpu()
        results["class_accuracy"] = float(correct[0] / correct[1])
    return results


def evaluate_checkpoint(var_path: str | Path, vae_path: str | Path, out_dir: str | Path,
                        reference: str | Path | None = None, settings: EvalSettings | None = None, *,
                        device: torch.device | str | None = None, progress: bool = True) -> dict:
    """Sample, write PNGs + ADM `.npz`, score; collective when a process group exists (run it on
    every rank). Returns the results dict (also written to `<out_dir>/results.json` by rank 0)."""
    settings = settings or EvalSettings()
    from var_train.models.checkpoint_io import load_vae

    started = time.perf_counter()
    rank, world = _rank_and_world()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(out_dir)
    samples_dir = out_dir / SAMPLES_DIR
    # Fail on a bad reference or missing Inception weights before spending hours sampling.
    extractor = build_feature_extractor(settings.feature_extractor, inception_weights=settings.inception_weights,
                                        device=device)
    reference_stats = None
    if reference is not None:
        reference_stats = load_reference(reference, extractor, need_features=settings.precision_recall,
                                         batch_size=settings.feature_batch_size, progress=progress)
    metrics = GenerativeMetrics(extractor, reference_stats,
                                precision_recall=settings.precision_recall and reference_stats is not None,
                                device=device)
    var = load_var_any(var_path).to(device).eval()
    vae = load_vae(vae_path, patch_nums=list(var.patch_nums)).to(device).eval()
    num_samples = settings.num_samples or settings.per_class * var.num_classes
    labels = class_balanced_labels(num_samples, var.num_classes)

    num_classes = var.num_classes
    sampling = generate_samples(var, vae, labels, samples_dir, settings, device, progress)
    del var
    _barrier()  # every PNG exists from here on
    scored_started = time.perf_counter()
    results = score_samples(samples_dir, labels, metrics, num_classes, settings.feature_batch_size, progress)
    if rank == 0:
        write_samples_npz(samples_dir, labels, out_dir / SAMPLES_NPZ)
    totals = torch.tensor([sampling["generated"], sampling["skipped"]], dtype=torch.float64)
    sampling_seconds = torch.tensor([sampling["seconds"]], dtype=torch.float64)
    if world > 1:
        moved, slowest = totals.to(metrics.device), sampling_seconds.to(metrics.device)
        dist.all_reduce(moved)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # ranks sample concurrently: the slowest sets the time
        totals, sampling_seconds = moved.cpu(), slowest.cpu()
    report = {
        **results,
        "num_samples": num_samples,
        "generated_now": int(totals[0]), "reused_from_previous_run": int(totals[1]),
        "sampling_seconds": float(sampling_seconds),
        "images_per_second": float(totals[0] / sampling_seconds) if totals[0] else None,
        "scoring_seconds": time.perf_counter() - scored_started,
        "total_seconds": time.perf_counter() - started,
        "world_size": world,
        "var": str(var_path), "vae": str(vae_path), "reference": str(reference) if reference else None,
        "feature_extractor": extractor.name,
        "settings": asdict(settings),
        "samples_npz": str(out_dir / SAMPLES_NPZ),
    }
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / (RESULTS_FILE + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(out_dir / RESULTS_FILE)
    _barrier()
    return report
