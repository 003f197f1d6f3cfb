import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from data_prep.preprocess import ReferenceTransform
from tests.conftest import reference_fixture_paths
from tests.data.extract_helpers import (load_fixture, random_images, read_records, run_extract, tiny_vae_checkpoint,
                                        to_uint8, write_image_folder)
from var_train.data.manifest import read_manifest
from var_train.models.checkpoint_io import save_model


def reference_pixels(path, resolution):
    """The reference's evaluation transform written out with PIL and numpy only."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    short = round(1.125 * resolution)
    if width <= height:
        size = (short, int(short * height / width))
    else:
        size = (int(short * width / height), short)
    image = image.resize(size, Image.Resampling.LANCZOS)
    top, left = int(round((size[1] - resolution) / 2)), int(round((size[0] - resolution) / 2))
    array = np.asarray(image, dtype=np.float32)[top:top + resolution, left:left + resolution] / 255.0
    return torch.from_numpy(array).permute(2, 0, 1) * 2 - 1


@pytest.mark.parametrize("fixture_path", reference_fixture_paths(), ids=lambda p: p.stem)
def test_extraction_through_files_gives_the_model_tokens(tmp_path, fixture_path):
    fixture, vae = load_fixture(fixture_path)
    # The reference fixture's tokens are what our VQVAE gives for its images...
    for ours, theirs in zip(vae.image_to_tokens(fixture["images"]), fixture["tokens"]):
        assert torch.equal(ours, theirs)
    # ... and the file path (8-bit PNG -> decode -> transform -> encode -> shard) gives exactly the
    # tokens of the model applied to the same decoded, transformed pixels.
    patch_nums = tuple(fixture["config"]["patch_nums"])
    resolution = 16 * patch_nums[-1]
    labels = fixture["labels"].tolist()
    paths = write_image_folder(tmp_path / "images", list(to_uint8(fixture["images"])), labels)
    checkpoint = save_model(vae, tmp_path / "vae.safetensors")
    run_extract(tmp_path / "images", checkpoint, tmp_path / "tokens", resolution, patch_nums, flip=True)
    manifest = read_manifest(tmp_path / "tokens")
    class_names = sorted({f"class{l}" for l in labels})
    assert manifest.num_records == len(paths) and manifest.class_names == class_names
    assert manifest.vocab_size == fixture["config"]["vocab_size"] and manifest.patch_nums == list(patch_nums)
    records = {r.key: r for r in read_records(tmp_path / "tokens")}
    for path, label in zip(paths, labels):
        pixels = reference_pixels(path, resolution)[None]
        expected = torch.cat(vae.image_to_tokens(pixels), 1)[0].numpy()
        expected_flip = torch.cat(vae.image_to_tokens(pixels.flip(-1)), 1)[0].numpy()
        record = next(r for key, r in records.items() if key.endswith(f"class{label}_{path.stem}"))
        np.testing.assert_array_equal(record.tokens, expected)
        np.testing.assert_array_equal(record.tokens_flip, expected_flip)
        assert class_names[record.label] == f"class{label}"


@pytest.mark.parametrize("size", [(100, 70), (70, 113), (101, 90), (64, 64), (300, 65)])
def test_preprocessing_matches_torchvision_resize_center_crop(tmp_path, size):
    width, height = size
    path = tmp_path / "image.png"
    Image.fromarray(random_images(1, height, width, seed=width)[0]).save(path)
    ours = ReferenceTransform(64)(Image.open(path).convert("RGB"))
    assert ours.shape == (1, 3, 64, 64)
    torchvision_pipeline = transforms.Compose([
        transforms.Resize(72, interpolation=transforms.InterpolationMode.LANCZOS),
        transforms.CenterCrop(64), transforms.ToTensor()])
    assert torch.equal(ours[0], torchvision_pipeline(Image.open(path).convert("RGB")) * 2 - 1)
    assert torch.equal(ours[0], reference_pixels(path, 64))


def test_random_crops_are_seeded_and_inside_the_image():
    transform = ReferenceTransform(64, crops=4, seed=1)
    boxes = transform.crop_boxes(72, 90, "key")
    assert boxes == ReferenceTransform(64, crops=4, seed=1).crop_boxes(72, 90, "key")
    assert boxes != ReferenceTransform(64, crops=4, seed=2).crop_boxes(72, 90, "key")
    assert all(0 <= top <= 8 and 0 <= left <= 26 for top, left in boxes)
    assert len(set(boxes)) > 1


def test_bad_inputs_are_reported_not_fatal(tmp_path):
    vae_path, vae = tiny_vae_checkpoint(tmp_path)
    root = tmp_path / "images"
    good = write_image_folder(root, random_images(2, 64, 64), [0, 0])
    bad_dir = root / "class1"
    bad_dir.mkdir()
    noise = random_images(4, 80, 80, seed=9)
    Image.fromarray(noise[0]).convert("CMYK").save(bad_dir / "cmyk.jpg")
    Image.fromarray(noise[1]).convert("RGBA").save(bad_dir / "rgba.png")
    Image.fromarray(noise[2]).convert("L").save(bad_dir / "gray.png")
    Image.fromarray(noise[3]).convert("P").save(bad_dir / "palette.png")
    Image.fromarray(noise[0]).save(bad_dir / "whole.jpg")
    (bad_dir / "truncated.jpg").write_bytes((bad_dir / "whole.jpg").read_bytes()[:600])
    (bad_dir / "whole.jpg").unlink()
    (bad_dir / "empty.png").write_bytes(b"")
    (bad_dir / "text.png").write_text("this is not a picture\n")
    Image.fromarray(noise[0][:4, :4]).save(bad_dir / "tiny.png")
    (bad_dir / "notes.txt").write_text("not an image")

    summary = run_extract(root, vae_path, tmp_path / "tokens", shard_size=4)
    assert summary.complete
    report = json.loads((tmp_path / "tokens" / "report.json").read_text())
    reasons = {item["source"].rsplit("/", 1)[-1]: item["reason"] for item in report["skipped"]}
    assert set(reasons) == {"truncated.jpg", "empty.png", "text.png", "tiny.png", "notes.txt"}
    assert "truncated" in reasons["truncated.jpg"]
    assert reasons["empty.png"] == "zero-byte file"
    assert "not a readable image" in reasons["text.png"]
    assert "too small: 4x4" in reasons["tiny.png"]
    assert "extension" in reasons["notes.txt"]
    assert report["num_records"] == 6 and report["num_skipped"] == 5 and report["num_inputs"] == 11
    assert report["converted_to_rgb_by_mode"] == {"CMYK": 1, "RGBA": 1, "L": 1, "P": 1}
    manifest = read_manifest(tmp_path / "tokens")
    assert manifest.num_records == 6 and sum(manifest.skipped.values()) == 5
    records = {r.key.split("_", 1)[1]: r for r in read_records(tmp_path / "tokens")}
    # Converted the way the reference converts: PIL's convert('RGB') of the file as stored.
    rgba = reference_pixels(bad_dir / "rgba.png", 64)[None]
    np.testing.assert_array_equal(records["class1_rgba"].tokens, torch.cat(vae.image_to_tokens(rgba), 1)[0].numpy())
    assert {k for k in records} == {"class0_img000", "class0_img001", "class1_cmyk", "class1_gray",
                                     "class1_palette", "class1_rgba"}
    assert len(good) == 2


def test_resumed_extraction_equals_uninterrupted(tmp_path):
    vae_path, _ = tiny_vae_checkpoint(tmp_path)
    write_image_folder(tmp_path / "images", random_images(7, 64, 80, seed=3), [0, 1, 2, 0, 1, 2, 0])
    run_extract(tmp_path / "images", vae_path, tmp_path / "whole", shard_size=2, flip=True)

    partial = run_extract(tmp_path / "images", vae_path, tmp_path / "resumed", shard_size=2, flip=True, max_shards=1)
    assert not partial.complete and partial.shards_done_now == 1
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    # What a crash leaves behind: a half-written temporary, and a shard renamed but not yet marked done.
    (tmp_path / "resumed" / "shard-000002.tar.tmp").write_bytes(b"half a shard")
    (tmp_path / "resumed" / "shard-000003.tar").write_bytes(b"garbage")
    finished = run_extract(tmp_path / "images", vae_path, tmp_path / "resumed", shard_size=2, flip=True)
    assert finished.complete and finished.shards_done_now == 3 and finished.num_records == 7
    names = sorted(p.name for p in (tmp_path / "whole").glob("shard-*.tar"))
    assert names == [f"shard-00000{i}.tar" for i in range(4)]
    for name in names:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    assert not list((tmp_path / "resumed").glob("*.tmp"))
    again = run_extract(tmp_path / "images", vae_path, tmp_path / "resumed", shard_size=2, flip=True)
    assert again.complete and again.shards_done_now == 0
    with pytest.raises(ValueError, match="flip"):
        run_extract(tmp_path / "images", vae_path, tmp_path / "resumed", shard_size=2, flip=False)


def test_list_and_webdataset_inputs_match_the_image_folder(tmp_path):
    import webdataset as wds

    vae_path, _ = tiny_vae_checkpoint(tmp_path)
    arrays = random_images(5, 70, 64, seed=4)
    labels = [1, 0, 1, 1, 0]
    paths = write_image_folder(tmp_path / "images", arrays, labels)
    run_extract(tmp_path / "images", vae_path, tmp_path / "from_folder", shuffle=False)
    folder_tokens = {p.stem: r.tokens for p, r in zip(sorted(paths), read_records(tmp_path / "from_folder"))}
    shuffled = read_records(tmp_path / "from_folder_shuffled") if run_extract(
        tmp_path / "images", vae_path, tmp_path / "from_folder_shuffled") else None
    assert [r.key for r in shuffled] != [r.key for r in read_records(tmp_path / "from_folder")]
    assert sorted(r.key for r in shuffled) == [r.key for r in read_records(tmp_path / "from_folder")]

    csv = tmp_path / "list.csv"
    csv.write_text("path,label\n" + "".join(f"{p.relative_to(tmp_path)},{'cat' if l else 'dog'}\n"
                                            for p, l in zip(paths, labels)))
    run_extract(csv, vae_path, tmp_path / "from_csv", shuffle=False)
    from_csv = read_records(tmp_path / "from_csv")
    assert read_manifest(tmp_path / "from_csv").class_names == ["cat", "dog"]
    assert [r.label for r in from_csv] == [0 if l else 1 for l in labels]

    with wds.TarWriter(str(tmp_path / "images-000.tar")) as writer:
        for path, label in zip(paths, labels):
            writer.write({"__key__": path.stem, "png": path.read_bytes(), "cls": str(label).encode()})
    (tmp_path / "tars").mkdir()
    (tmp_path / "images-000.tar").rename(tmp_path / "tars" / "images-000.tar")
    run_extract(tmp_path / "tars", vae_path, tmp_path / "from_wds", shuffle=False)
    from_wds = read_records(tmp_path / "from_wds")
    assert [r.label for r in from_wds] == labels
    for path, a, b in zip(paths, from_csv, from_wds):
        np.testing.assert_array_equal(a.tokens, folder_tokens[path.stem])
        np.testing.assert_array_equal(b.tokens, folder_tokens[path.stem])


def test_resolution_must_match_patch_nums(tmp_path):
    vae_path, _ = tiny_vae_checkpoint(tmp_path)
    write_image_folder(tmp_path / "images", random_images(1, 64, 64), [0])
    with pytest.raises(ValueError, match="--resolution 128 does not match the schedule 1,2,3,4 \\(64px"):
        run_extract(tmp_path / "images", vae_path, tmp_path / "t", resolution=128)


def test_missing_file_in_a_list_is_reported(tmp_path):
    vae_path, _ = tiny_vae_checkpoint(tmp_path)
    paths = write_image_folder(tmp_path / "images", random_images(2, 64, 64), [0, 1])
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps({"path": str(p), "label": i}) + "\n" for i, p in enumerate(paths))
                       + json.dumps({"path": "images/gone.jpg", "label": 1}) + "\n")
    summary = run_extract(listing, vae_path, tmp_path / "tokens")
    assert summary.complete and summary.num_records == 2
    report = json.loads((tmp_path / "tokens" / "report.json").read_text())
    assert report["skipped"] == [{"source": str(tmp_path / "images" / "gone.jpg"),
                                  "reason": "cannot read file: No such file or directory"}]
