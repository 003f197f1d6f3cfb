"""Zero-shot editing (teacher-forced tokens outside the mask) and unconditional sampling."""

from __future__ import annotations

import torch
from PIL import Image

from tests.models.tiny import tiny_models
from var_train.cli import main
from var_train.models.checkpoint_io import save_model, save_reference_layout
from var_train.models.editing import box_mask, edit_images, masks_per_scale
from var_train.models.sampling import SamplingSettings


def _images(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 64, 64, generator=generator) * 2 - 1


def test_scale_masks_of_the_right_half():
    # Hand-written: 64 px, x >= 32 masked. A token is regenerated if any pixel it covers is masked;
    # on the 3x3 grid the middle column covers pixels 21..42, so it overlaps the mask.
    masks = masks_per_scale(box_mask(64, (32, 0, 64, 64)), (1, 2, 3, 4))
    expected = [[1], [0, 1, 0, 1], [0, 1, 1] * 3, [0, 0, 1, 1] * 4]
    assert [m[0].int().tolist() for m in masks] == expected


def test_all_zeros_mask_reproduces_the_image_tokens_exactly():
    vae, var = tiny_models()
    images = _images()
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    settings = SamplingSettings(cfg=3.0, top_k=0, top_p=0.0, seed=5, precision="fp32")
    edited, tokens, own = edit_images(var, vae, images, mask, torch.tensor([1, 10]), settings)
    assert len(tokens) == 4
    for k, (got, want) in enumerate(zip(tokens, own)):
        assert torch.equal(got, want), k
    assert torch.equal(edited, vae.tokens_to_uint8_image(own))


def test_tokens_outside_the_mask_are_the_image_tokens_at_every_scale():
    vae, var = tiny_models()
    images = _images()
    mask = box_mask(64, (16, 16, 48, 48), batch=2)
    settings = SamplingSettings(cfg=1.5, top_k=0, top_p=0.0, seed=1, precision="fp32")
    _, tokens, own = edit_images(var, vae, images, mask, torch.tensor([2, 7]), settings)
    inside_any = 0
    for k, (got, want, inside) in enumerate(zip(tokens, own, masks_per_scale(mask, var.patch_nums))):
        assert torch.equal(got[~inside], want[~inside]), k
        inside_any += int((got[inside] != want[inside]).sum())
    assert inside_any > 0  # the masked tokens were sampled, not copied
    # Reproducible: the same seed gives the same edit.
    _, again, _ = edit_images(var, vae, images, mask, torch.tensor([2, 7]), settings)
    assert all(torch.equal(a, b) for a, b in zip(tokens, again))


def test_edit_command_with_a_box_and_with_a_mask_image(tmp_path):
    vae, var = tiny_models()
    var_path = save_model(var, tmp_path / "var.safetensors")
    vae_path = save_reference_layout(vae, tmp_path / "vae.pth")  # the released layout, 4 scales
    image_path = tmp_path / "in.png"
    Image.fromarray((torch.rand(80, 100, 3) * 255).byte().numpy()).save(image_path)
    out = tmp_path / "edited.png"
    code = main(["edit", "--var", str(var_path), "--vae", str(vae_path), "--image", str(image_path),
                 "--box", "10,10,60,50", "--class", "3", "--samples", "3", "--top-k", "5", "--out", str(out)])
    assert code == 0
    assert Image.open(out).size == (3 * 64 + 4 * 2, 64 + 2 * 2)  # a row of 3 edits
    assert Image.open(tmp_path / "edited-compare.png").size[0] == 5 * 64 + 6 * 2
    mask_path = tmp_path / "mask.png"
    mask = Image.new("L", (100, 80), 255)
    mask.paste(0, (20, 20, 80, 60))  # out-painting: keep the centre
    mask.save(mask_path)
    code = main(["edit", "--var", str(var_path), "--vae", str(vae_path), "--image", str(image_path),
                 "--mask", str(mask_path), "--out", str(tmp_path / "out.png")])
    assert code == 0 and Image.open(tmp_path / "out.png").size == (64, 64)


def test_edit_command_refuses_a_box_outside_the_image(tmp_path, capsys):
    vae, var = tiny_models()
    var_path, vae_path = save_model(var, tmp_path / "var.safetensors"), save_model(vae, tmp_path / "vae.safetensors")
    image_path = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(image_path)
    code = main(["edit", "--var", str(var_path), "--vae", str(vae_path), "--image", str(image_path),
                 "--box", "0,0,65,10", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "--box" in err[0]


def test_sample_the_null_class(tmp_path):
    vae, var = tiny_models()
    var_path, vae_path = save_model(var, tmp_path / "var.safetensors"), save_model(vae, tmp_path / "vae.safetensors")
    for flags, out in ((["--classes", "null"], tmp_path / "a"), (["--unconditional"], tmp_path / "b")):
        code = main(["sample", "--var", str(var_path), "--vae", str(vae_path), *flags, "--per-class", "2",
                     "--top-k", "5", "--out", str(out)])
        assert code == 0
        assert sorted(p.name for p in out.glob("0*.png")) == ["0010_0000.png", "0010_0001.png"]
    assert Image.open(tmp_path / "a" / "0010_0001.png").tobytes() == Image.open(tmp_path / "b" / "0010_0001.png").tobytes()
