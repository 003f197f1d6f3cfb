"""Evaluate a VAR checkpoint: class-balanced samples -> FID, IS, precision, recall (JSON).

Examples:
  # the paper's setting (50 per class = 50,000 images), 8 GPUs:
  torchrun --nproc_per_node 8 -m var_train.cli eval --var var_d16.pth --vae vae_ch160v4096z32.pth \\
      --reference VIRTUAL_imagenet256_labeled.npz --inception-weights weights-inception-2015-12-05-6726825d.pth \\
      --out eval/d16
  # the digits demo, scored with its own classifier:
  var-train eval --var demo_out/var.safetensors --vae demo_out/tokenizer/vae.safetensors \\
      --reference demo_out/reference_stats.npz --feature-extractor demo_out/classifier.safetensors --out eval/demo

Writes <out>/samples/*.png, <out>/samples.npz (arr_0 uint8 NHWC: the input of OpenAI's ADM evaluator)
and <out>/results.json. Run it again with the same --out to resume: finished samples are kept.
Sample i's random draws follow from (--seed, i): images depend neither on --batch-size nor on the
number of processes.

--var: a reference .pth, our .safetensors, or a training run / checkpoint directory.
--reference: a stats .npz from `var-train fid-stats`, an ADM reference batch .npz (mu/sigma and/or
arr_0 images) or an image folder. Without it only IS (and class accuracy) are reported.
The Inception weights are never downloaded: pass --inception-weights or put the file in
$TORCH_HOME/hub/checkpoints/.
"""

from __future__ import annotations

import argparse
import json

from var_train.command_line import device_name, positive_int

from .sampling_options import add_model_arguments, add_sampling_arguments, sampling_settings

NAME = "eval"
HELP = "sample a checkpoint and compute FID / IS / precision / recall (distributed, resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser,
                        vae_help="VQVAE checkpoint (.pth or .safetensors) used to decode")
    parser.add_argument("--out", required=True, help="output folder (samples, samples.npz, results.json)")
    parser.add_argument("--reference", default=None,
                        help="reference: stats .npz (var-train fid-stats), ADM reference batch .npz, or image folder")
    parser.add_argument("--per-class", type=positive_int, default=50, help="samples per class (default 50: 50,000 on ImageNet)")
    parser.add_argument("--num-samples", type=positive_int, default=None, help="total samples (overrides --per-class)")
    add_sampling_arguments(parser)
    parser.add_argument("--feature-extractor", default="inception",
                        help="'inception' (default) or a classifier .safetensors (e.g. the demo's)")
    parser.add_argument("--inception-weights", default=None,
                        help="path of weights-inception-2015-12-05-6726825d.pth (default: $TORCH_HOME/hub/checkpoints/)")
    parser.add_argument("--no-precision-recall", dest="precision_recall", action="store_false",
                        help="skip precision/recall (they need per-image reference features)")
    parser.add_argument("--device", type=device_name, default=None, help="cuda, cpu, ... (default: cuda:LOCAL_RANK if available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--no-log-to-run", dest="log_to_run", action="store_false",
                        help="when --var is a training run or checkpoint directory, do not append the results to "
                             "that run (its metrics.jsonl as eval_checkpoint/*, and its W&B run, resumed)")
    parser.add_argument("--allow-vae-mismatch", action="store_true",
                        help="warn instead of refusing a VAE whose vocabulary or z channels differ from the VAR's, "
                             "or whose codebook differs from the one the VAR was trained with")


def run(args: argparse.Namespace) -> int:
    from var_train.evaluation.standalone import EvalSettings, evaluate_checkpoint
    from var_train.parallel import destroy_distributed, init_distributed

    info = init_distributed()
    settings = EvalSettings(sampling_settings(args), per_class=args.per_class, num_samples=args.num_samples,
                            batch_size=args.batch_size,
                            feature_extractor=args.feature_extractor, inception_weights=args.inception_weights,
                            precision_recall=args.precision_recall)
    try:
        report = evaluate_checkpoint(args.var, args.vae, args.out, args.reference, settings,
                                     device=args.device or info.device, progress=not args.quiet,
                                     allow_vae_mismatch=args.allow_vae_mismatch)
    finally:
        destroy_distributed()
    if info.is_main:
        shown = {k: report[k] for k in ("fid", "inception_score", "precision", "recall", "class_accuracy",
                                        "num_samples", "images_per_second") if k in report}
        print(json.dumps(shown, indent=2))
        print(f"results: {args.out}/results.json; ADM-evaluator input: {report['samples_npz']}")
        if args.log_to_run:
            _log_into_training_run(args.var, args.out, report)
    return 0


TABLE_ROWS = 32


def _log_into_training_run(var: str, out: str, report: dict) -> None:
    """Append the scores (at the checkpoint's step) and the first samples to the training run they
    came from, when --var is one of its directories: metrics.jsonl and the run's own W&B run."""
    from pathlib import Path

    import numpy as np
    import torch

    from var_train.checkpoint import read_metadata, resolve_checkpoint
    from var_train.data.images import read_image_array
    from var_train.evaluation.grid import labelled_grid
    from var_train.logging import run_dir_of_checkpoint, training_run_logger

    run_dir = run_dir_of_checkpoint(var)
    if run_dir is None:
        return
    step = int(read_metadata(resolve_checkpoint(var))["step"])
    metrics = {f"eval_checkpoint/{k}": float(v) for k, v in report.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    paths = sorted((Path(out) / "samples").glob("*.png"))[:TABLE_ROWS]
    labels = [int(p.stem.rsplit("_c", 1)[1]) for p in paths]
    class_names = _class_names(run_dir)
    with training_run_logger(run_dir) as logger:
        logger.log(step, metrics, console=False)
        if paths:
            images = torch.from_numpy(np.stack([read_image_array(p) for p in paths])).permute(0, 3, 1, 2)
            captions = [class_names[c] if class_names and c < len(class_names) else str(c) for c in labels]
            logger.log_samples(step, "eval_checkpoint/samples", images, labels, class_names,
                               grid=labelled_grid(images, captions, per_row=min(8, len(images))))
    print(f"logged into the training run {run_dir} at step {step} (metrics.jsonl"
          + (", W&B run " + logger.run_id if logger.run_id else "") + ")")


def _class_names(run_dir) -> list[str] | None:
    """The class names of the run's training shards (None when they cannot be read)."""
    try:
        import yaml

        from var_train.data.sources import read_shard_manifest

        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        return list(read_shard_manifest(config["data"]["train_shards"]).class_names)
    except Exception:  # noqa: BLE001 -- names are a nicety: class ids are shown instead
        return None
