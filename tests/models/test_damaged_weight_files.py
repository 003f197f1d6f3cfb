"""A truncated, damaged or wrong weights file (a PNG, a text file) given to any command that reads
weights: one line `error: <file> is not a readable ... file`, exit 2, no traceback. The files are
real ones, cut or garbled on disk the way a broken download or copy leaves them."""

from __future__ import annotations

import argparse

import pytest
import torch
from PIL import Image

from tests.evaluation.helpers import seeded_classifier
from tests.models.tiny import VAR_KW
from tests.reliability.helpers import assert_one_line_error, run_command, train_args
from tests.training.learnable_shards import make_learnable_shards, make_tiny_vae
from var_train.errors import CorruptFileError, MismatchError, UnsafeFileError
from var_train.models import VAR
from var_train.models.checkpoint_io import (load_vae, read_checkpoint, read_training_vae, save_model,
                                            save_reference_layout)

UNREADABLE = "is not a readable"
AGAIN = "export it again or check the download"


def truncated(path, out):
    data = path.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    return out


def damaged_header(path, out):
    """safetensors: 8 bytes of header length, then the JSON header; its opening `{` becomes `z`."""
    data = bytearray(path.read_bytes())
    data[8] ^= 0x01
    out.write_bytes(bytes(data))
    return out


def png(out):
    Image.new("RGB", (16, 16), (200, 30, 30)).save(out, format="PNG")
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged_weights")
    vae = make_tiny_vae(root / "vae.safetensors")
    var = save_model(VAR(**VAR_KW), root / "var.safetensors")
    vae_pth = save_reference_layout(load_vae(vae), root / "vae.pth")
    images = root / "images" / "a"
    images.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(images / f"{i}.png")
    text = root / "notes.pth"
    text.write_text("these are not weights\n")
    return dict(root=root, vae=vae, var=var, vae_pth=vae_pth, images=root / "images", text=text,
                truncated_vae=truncated(vae, root / "truncated_vae.safetensors"),
                truncated_var=truncated(var, root / "truncated_var.safetensors"),
                header_vae=damaged_header(vae, root / "header_vae.safetensors"),
                header_var=damaged_header(var, root / "header_var.safetensors"),
                truncated_pth=truncated(vae_pth, root / "truncated_vae.pth"),
                png_pth=png(root / "picture.pth"), png_safetensors=png(root / "picture.safetensors"))


# -- the reader: every kind of damage is a CorruptFileError naming the file -----------------------
@pytest.mark.parametrize("name, reason", [
    ("truncated_vae", "file not fully covered"), ("header_vae", "header"), ("png_safetensors", "header"),
    ("truncated_pth", "truncated, damaged or not weights"), ("png_pth", "not a file written by torch.save"),
    ("text", "not a file written by torch.save"),
])
def test_read_checkpoint_names_the_damaged_file(files, name, reason):
    with pytest.raises(CorruptFileError) as caught:
        read_checkpoint(files[name])
    message = str(caught.value)
    assert str(files[name]) in message and UNREADABLE in message and reason in message and AGAIN in message
    assert "\n" not in message


def test_training_vae_record_of_a_damaged_var_file(files):
    with pytest.raises(CorruptFileError, match="header"):
        read_training_vae(files["header_var"])


def test_a_pickled_python_object_is_refused_as_unsafe(files, tmp_path):
    path = tmp_path / "namespace.pth"
    torch.save({"args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(UnsafeFileError, match=r"refusing to load .*namespace\.pth: it asks for argparse\.Namespace"):
        read_checkpoint(path)


def test_a_pth_that_is_not_a_state_dict_is_a_mismatch(files, tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(MismatchError, match="not a plain state dict of tensors"):
        read_checkpoint(path)


def test_other_weight_readers(files, tmp_path):
    from var_train.evaluation.classifier import ClassifierFeatureExtractor
    from var_train.evaluation.inception import _load_inception_state_dict
    from var_train.tokenizer.losses import _load_state_dict_file

    with pytest.raises(CorruptFileError, match="truncated, damaged or not weights"):
        _load_inception_state_dict(files["truncated_pth"])
    with pytest.raises(CorruptFileError, match="not a file written by torch.save"):
        _load_state_dict_file(files["png_pth"], "VGG16 weights", "--vgg16-weights")
    classifier = truncated(seeded_classifier(0).save(tmp_path / "classifier.safetensors"), tmp_path / "cut.safetensors")
    with pytest.raises(CorruptFileError, match="file not fully covered"):
        ClassifierFeatureExtractor.load(classifier)


# -- through the commands: one line, exit 2, no traceback ------------------------------------------
def _in_process(capsys, main, argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_sample_with_a_truncated_var_as_a_fresh_process(files, tmp_path):
    proc = run_command("var-train", "sample", "--var", files["truncated_var"], "--vae", files["vae"],
                       "--out", tmp_path / "s", timeout=120)
    assert_one_line_error(proc, f"error: {files['truncated_var']} {UNREADABLE} .safetensors file", AGAIN)


def test_extract_with_a_png_as_vae_as_a_fresh_process(files, tmp_path):
    proc = run_command("var-prep", "extract", files["images"], "--vae", files["png_pth"], "--out", tmp_path / "out",
                       "--no-progress", "--num-workers", "0", timeout=120)
    assert_one_line_error(proc, f"{files['png_pth']} {UNREADABLE} PyTorch weights file")
    assert not (tmp_path / "out").exists()


def test_edit_and_sample_with_a_damaged_vae_header(files, tmp_path, capsys):
    from var_train.cli import main

    image = files["images"] / "a" / "0.png"
    line = _in_process(capsys, main, ["edit", "--var", files["var"], "--vae", files["header_vae"], "--image", image,
                                      "--box", "0,0,32,32", "--out", tmp_path / "e.png"])
    assert f"{files['header_vae']} {UNREADABLE}" in line
    line = _in_process(capsys, main, ["sample", "--var", files["header_var"], "--vae", files["vae"],
                                      "--out", tmp_path / "s"])
    assert f"{files['header_var']} {UNREADABLE}" in line


@pytest.mark.parametrize("override", ["data.vae", "model.init_from"])
def test_train_with_a_damaged_vae_or_init_from(files, tmp_path, capsys, override):
    from var_train.cli import main

    shards = files["root"] / "shards"
    if not shards.exists():
        make_learnable_shards(shards, num_records=8)
    damaged = files["truncated_pth"] if override == "data.vae" else files["png_safetensors"]
    line = _in_process(capsys, main, train_args(shards, files["vae"], tmp_path / "run", "model.num_classes=10",
                                                f"{override}={damaged}"))
    assert f"{damaged} {UNREADABLE}" in line
    assert not (tmp_path / "run").exists()


def test_fid_stats_with_a_text_file_as_inception_weights(files, tmp_path, capsys):
    from var_train.cli import main

    line = _in_process(capsys, main, ["fid-stats", "--images", files["images"], "--resolution", "32",
                                      "--inception-weights", files["text"], "--out", tmp_path / "stats.npz",
                                      "--device", "cpu", "--quiet"])
    assert f"{files['text']} {UNREADABLE} PyTorch weights file" in line


def test_train_tokenizer_init_from_a_truncated_vae(files, tmp_path, capsys):
    from data_prep.cli import main

    line = _in_process(capsys, main, ["train-tokenizer", "--data-dir", files["images"], "--output-dir", tmp_path / "tok",
                                      "--init-from", files["truncated_vae"], "--max-steps", "1", "--no-progress",
                                      "--wandb-mode", "disabled", "--num-workers", "0"])
    assert f"{files['truncated_vae']} {UNREADABLE}" in line


# -- a readable header whose recorded options are damaged or foreign --------------------------------
# The files are written here with safetensors itself, as a hand edit or another tool would leave them.
CONFIG_KEY = "var_train_config"  # the metadata entry our exports record a model's options under


def _with_metadata(source, out, **metadata):
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(source)), str(out), metadata=metadata)
    return out


@pytest.mark.parametrize("recorded, error, words", [
    ('{"depth": 2, "vocab_size": 64', CorruptFileError, "metadata is not valid JSON"),
    ('[2, 64]', CorruptFileError, "metadata is list, not a JSON object"),
    ('{"depth": 2, "flux_capacitor": 1}', MismatchError, "options this version does not take: flux_capacitor"),
    ('{"depth": "two"}', MismatchError, "recorded VAR options do not build one"),
])
def test_damaged_recorded_options_of_a_var(files, tmp_path, recorded, error, words):
    from var_train.models.checkpoint_io import load_var

    path = _with_metadata(files["var"], tmp_path / "edited.safetensors", **{CONFIG_KEY: recorded})
    with pytest.raises(error) as caught:
        load_var(path)
    assert str(path) in str(caught.value) and words in str(caught.value)


def test_damaged_recorded_options_of_a_vae_and_its_quantizer(files, tmp_path):
    from var_train.models.checkpoint_io import load_quantizer

    path = _with_metadata(files["vae"], tmp_path / "vae.safetensors", **{CONFIG_KEY: '{"vocab_size": 64, "chh": 32}'})
    for load in (load_vae, load_quantizer):
        with pytest.raises(MismatchError, match="VQVAE options this version does not take: chh"):
            load(path)
    missing = _with_metadata(files["vae"], tmp_path / "no_vocab.safetensors", **{CONFIG_KEY: '{"ch": 32}'})
    with pytest.raises(MismatchError, match="records no vocab_size, z_channels, share_quant_resi, patch_nums"):
        load_quantizer(missing)


def test_damaged_training_vae_record_and_classifier_options(files, tmp_path):
    from var_train.evaluation.classifier import ClassifierFeatureExtractor

    path = _with_metadata(files["var"], tmp_path / "var.safetensors", var_train_training_vae="fingerprint")
    with pytest.raises(CorruptFileError, match="'var_train_training_vae' metadata is not valid JSON"):
        read_training_vae(path)
    classifier = seeded_classifier(0).save(tmp_path / "classifier.safetensors")
    edited = _with_metadata(classifier, tmp_path / "edited_classifier.safetensors", classifier_config='{"width": 32}')
    with pytest.raises(MismatchError, match="recorded ClassifierConfig options do not build one"):
        ClassifierFeatureExtractor.load(edited)


def test_sample_with_damaged_recorded_options_is_one_line(files, tmp_path, capsys):
    from var_train.cli import main

    path = _with_metadata(files["var"], tmp_path / "var.safetensors", **{CONFIG_KEY: "{depth: 2}"})
    line = _in_process(capsys, main, ["sample", "--var", path, "--vae", files["vae"], "--out", tmp_path / "s"])
    assert f"{path}: its 'var_train_config' metadata is not valid JSON" in line


# -- bits flipped inside the tensor data: the header still parses, only the digest can tell ----------
def _flip_last_byte(path, out):
    """The last byte of a .safetensors file is tensor data (the header comes first)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    out.write_bytes(bytes(data))
    return out


def test_a_bit_flipped_in_the_tensor_data_is_refused(files, tmp_path):
    from safetensors.torch import load_file

    flipped = _flip_last_byte(files["var"], tmp_path / "flipped.safetensors")
    assert load_file(str(flipped)).keys() == load_file(str(files["var"])).keys()  # the format itself sees nothing
    with pytest.raises(CorruptFileError, match="tensors differ from the digest recorded when it was written"):
        read_checkpoint(flipped)
    read_checkpoint(files["var"])  # the untouched file reads


def test_a_file_without_a_digest_still_loads(files, tmp_path):
    """Files from other tools, or exported before digests, record none: they load as before."""
    import json

    from var_train.models.checkpoint_io import load_var

    recorded = json.dumps(read_checkpoint(files["var"])[1])
    load_var(_with_metadata(files["var"], tmp_path / "plain.safetensors", **{CONFIG_KEY: recorded}))


def test_verify_an_exported_file(files, tmp_path, capsys):
    from var_train.cli import main

    assert main(["verify", str(files["var"])]) == 0
    assert "intact (" in capsys.readouterr().out
    assert main(["verify", str(files["vae_pth"])]) == 0
    assert "records no digest" in capsys.readouterr().out
    flipped = _flip_last_byte(files["vae"], tmp_path / "flipped_vae.safetensors")
    line = _in_process(capsys, main, ["verify", flipped])
    assert f"{flipped}: its tensors differ from the digest" in line


def test_sample_from_a_bit_flipped_var_is_one_line(files, tmp_path):
    flipped = _flip_last_byte(files["var"], tmp_path / "flipped.safetensors")
    proc = run_command("var-train", "sample", "--var", flipped, "--vae", files["vae"], "--out", tmp_path / "s",
                       timeout=120)
    assert_one_line_error(proc, f"error: {flipped}: its tensors differ from the digest", AGAIN)
    assert not (tmp_path / "s").exists()
