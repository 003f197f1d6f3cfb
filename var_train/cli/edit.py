"""Zero-shot in-painting, out-painting and class-conditional editing of one image.

Examples:
  # in-paint a box (pixels of the input image, x1/y1 exclusive) as class 207
  var-train edit --var var_d16.pth --vae vae_ch160v4096z32.pth --image dog.jpg \\
      --box 64,64,192,192 --class 207 --out edited.png
  # out-paint: a mask image whose white pixels are regenerated (here: everything but the centre)
  var-train edit --var var_d16.pth --vae vae_ch160v4096z32.pth --image dog.jpg --mask border.png \\
      --class 207 --samples 4 --out outpainted.png

The image (and the mask, the same way) is resized so its shorter side is the model's resolution
and centre-cropped. At every scale the tokens outside the mask are the image's own; only the
masked ones are sampled (with classifier-free guidance towards --class; --class null samples them
unconditionally). Writes OUT (one edit, or a row of --samples edits) and OUT's stem + "-compare.png":
input | mask | edits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from var_train.command_line import device_name, positive_int

from .sampling_options import add_model_arguments, add_sampling_arguments, sampling_settings

NAME = "edit"
HELP = "in-paint / out-paint / class-conditionally edit an image with a trained VAR (zero-shot)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--image", required=True, help="the image to edit")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--mask", help="mask image, same size as --image: white (>127) = regenerate")
    where.add_argument("--box", help="x0,y0,x1,y1 in the input image's pixels: the region to regenerate")
    parser.add_argument("--class", dest="class_id", default="null",
                        help="class id of the regenerated region, or 'null' for the unconditional class (default)")
    parser.add_argument("--samples", type=positive_int, default=1, help="number of edits to draw (default 1)")
    add_sampling_arguments(parser)  # --cfg --top-k --top-p --seed --batch-size --precision, as `sample`
    parser.add_argument("--device", type=device_name, default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--allow-vae-mismatch", action="store_true",
                        help="warn instead of refusing a VAE whose vocabulary or z channels differ from the VAR's, "
                             "or whose codebook differs from the one the VAR was trained with")


def _square(image, resolution: int, resample):
    """Shorter side to `resolution`, then a centre crop (the same geometry for image and mask)."""
    from torchvision.transforms import functional as TF

    image = TF.resize(image, resolution, interpolation=resample)
    return TF.center_crop(image, [resolution, resolution])


def prepare_inputs(image_path: str, resolution: int, mask_path: str | None = None,
                   box: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> image (1, 3, R, R) in [-1, 1], mask (1, R, R) bool (True = regenerate)."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from var_train.data.images import read_image_rgb

    image = read_image_rgb(image_path)
    if mask_path is not None:
        mask = Image.open(mask_path).convert("L")
        if mask.size != image.size:
            raise ValueError(f"the mask is {mask.size[0]}x{mask.size[1]} pixels, the image {image.size[0]}x{image.size[1]}")
    else:
        try:
            x0, y0, x1, y1 = (int(v) for v in box.split(","))
        except ValueError:
            raise ValueError(f"--box must be x0,y0,x1,y1 (integers), got {box!r}") from None
        width, height = image.size
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"--box {box} is not inside the {width}x{height} image (x1, y1 are exclusive)")
        mask = Image.new("L", image.size, 0)
        mask.paste(255, (x0, y0, x1, y1))
    pixels = TF.to_tensor(_square(image, resolution, InterpolationMode.LANCZOS)).mul(2).sub(1).unsqueeze(0)
    mask = TF.pil_to_tensor(_square(mask, resolution, InterpolationMode.NEAREST))[0] > 127
    return pixels.clamp(-1, 1), mask.unsqueeze(0)


def run(args: argparse.Namespace) -> int:
    from torchvision.utils import make_grid, save_image

    from var_train.checkpoint import load_var_any
    from var_train.compatibility import check_sampling_inputs, training_vae_of
    from var_train.errors import UserError
    from var_train.models.checkpoint_io import load_vae
    from var_train.models.editing import edit_images

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        if args.samples < 1:
            raise ValueError(f"--samples must be at least 1, got {args.samples}")
        for path in (args.vae, args.image, args.mask):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"file not found: {path}")
        if not Path(args.var).exists():  # a file, or a run / checkpoint directory
            raise FileNotFoundError(f"not found: {args.var}")
        var = load_var_any(args.var).to(device).eval()
        check_sampling_inputs(var.config, args.vae, args.allow_vae_mismatch, trained_with=training_vae_of(args.var))
        vae = load_vae(args.vae, patch_nums=list(var.patch_nums)).to(device).eval()
        if args.class_id == "null":
            label = var.num_classes
        elif args.class_id.isdigit() and int(args.class_id) < var.num_classes:
            label = int(args.class_id)
        else:
            raise ValueError(f"--class must be 0..{var.num_classes - 1} or null, got {args.class_id!r}")
        image, mask = prepare_inputs(args.image, vae.resolution, args.mask, args.box)
        settings = sampling_settings(args)
    except UserError:
        raise
    except (FileNotFoundError, ValueError) as error:  # a bad file or argument: one line, exit 2
        raise UserError(str(error)) from error
    batch = args.samples
    pieces = []
    for start in range(0, batch, args.batch_size):  # edit i draws from (seed, i): batch-size independent
        rows = min(args.batch_size, batch - start)
        edited, _, _ = edit_images(var, vae, image.to(device).expand(rows, -1, -1, -1), mask.expand(rows, -1, -1),
                                   torch.full((rows,), label, dtype=torch.long), settings, first_index=start)
        pieces.append(edited.float().cpu() / 255)
    edited = torch.cat(pieces)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(edited[0] if batch == 1 else make_grid(edited, nrow=batch, padding=2), out)
    original = image[0].add(1).div(2).cpu()
    shaded = original * (1 - 0.6 * mask[0].float())  # the masked region darkened
    compare = out.with_name(out.stem + "-compare.png")
    save_image(make_grid(torch.cat([original[None], shaded[None], edited]), nrow=batch + 2, padding=2), compare)
    print(f"wrote {out} ({batch} edit{'s' if batch > 1 else ''}, class {args.class_id}, "
          f"{mask.float().mean().item():.0%} of the pixels regenerated); comparison: {compare}")
    return 0
