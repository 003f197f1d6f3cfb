"""Evaluate a VAR checkpoint: class-balanced samples -> FID, IS, precision, recall (JSON).

Examples:
  # the paper's setting (50 per class = 50,000 images), 8 GPUs:
  torchrun --nproc_per_node 8 -m var_train.cli eval --var var_d16.pth --vae vae_ch160v4096z32.pth \\
      --reference VIRTUAL_imagenet256_labeled.npz --inception-weights weights-inception-2015-12-05-6726825d.pth \\
      --out eval/d16
  # the digits demo, scored with its own classifier:
  var-train eval --var runs/demo/export/var.safetensors --vae runs/demo/tokenizer/vae.safetensors \\
      --reference runs/demo/fid_stats.npz --feature-extractor runs/demo/classifier.safetensors --out eval/demo

Writes <out>/samples/*.png, <out>/samples.npz (arr_0 uint8 NHWC: the input of OpenAI's ADM evaluator)
and <out>/results.json. Run it again with the same --out to resume: finished samples are kept.
Images depend on --seed and --batch-size, not on the number of processes.

--var: a reference .pth, our .safetensors, or a training run / checkpoint directory.
--reference: a stats .npz from `var-train fid-stats`, an ADM reference batch .npz (mu/sigma and/or
arr_0 images) or an image folder. Without it only IS (and class accuracy) are reported.
The Inception weights are never downloaded: pass --inception-weights or put the file in
$TORCH_HOME/hub/checkpoints/.
"""

from __future__ import annotations

import argparse
import json

NAME = "eval"
HELP = "sample a checkpoint and compute FID / IS / precision / recall (distributed, resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--var", required=True, help="VAR: .pth (reference layout), .safetensors, or a run/checkpoint dir")
    parser.add_argument("--vae", required=True, help="VQVAE checkpoint (.pth or .safetensors) used to decode")
    parser.add_argument("--out", required=True, help="output folder (samples, samples.npz, results.json)")
    parser.add_argument("--reference", default=None,
                        help="reference: stats .npz (var-train fid-stats), ADM reference batch .npz, or image folder")
    parser.add_argument("--per-class", type=int, default=50, help="samples per class (default 50: 50,000 on ImageNet)")
    parser.add_argument("--num-samples", type=int, default=None, help="total samples (overrides --per-class)")
    parser.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance at the last scale (default 1.5)")
    parser.add_argument("--top-k", type=int, default=900, help="top-k filtering, 0 = off (default 900)")
    parser.add_argument("--top-p", type=float, default=0.96, help="top-p filtering, 0 = off (default 0.96)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per sampling batch (default 32)")
    parser.add_argument("--feature-extractor", default="inception",
                        help="'inception' (default) or a classifier checkpoint from train_classifier")
    parser.add_argument("--inception-weights", default=None,
                        help="path of weights-inception-2015-12-05-6726825d.pth (default: $TORCH_HOME/hub/checkpoints/)")
    parser.add_argument("--no-precision-recall", dest="precision_recall", action="store_false",
                        help="skip precision/recall (they need per-image reference features)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda:LOCAL_RANK if available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from var_train.evaluation.standalone import EvalSettings, evaluate_checkpoint
    from var_train.parallel import destroy_distributed, init_distributed

    info = init_distributed()
    settings = EvalSettings(per_class=args.per_class, num_samples=args.num_samples, cfg=args.cfg, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                            feature_extractor=args.feature_extractor, inception_weights=args.inception_weights,
                            precision_recall=args.precision_recall)
    try:
        report = evaluate_checkpoint(args.var, args.vae, args.out, args.reference, settings,
                                     device=args.device or info.device, progress=not args.quiet)
    finally:
        destroy_distributed()
    if info.is_main:
        shown = {k: report[k] for k in ("fid", "inception_score", "precision", "recall", "class_accuracy",
                                        "num_samples", "images_per_second") if k in report}
        print(json.dumps(shown, indent=2))
        print(f"results: {args.out}/results.json; ADM-evaluator input: {report['samples_npz']}")
    return 0
