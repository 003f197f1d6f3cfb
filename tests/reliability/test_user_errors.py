"""Bad configs and wrong files, through the commands: one line `error: ...`, exit 2, no traceback
(`--debug` / VAR_TRAIN_DEBUG=1 add it); the same for `var-prep`."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_torchrun
from tests.reliability.helpers import assert_one_line_error, environment, run_command, train_args
from tests.training.learnable_shards import make_learnable_shards, make_tiny_vae


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_errors")
    return make_learnable_shards(root / "shards", num_records=32), make_tiny_vae(root / "vae.safetensors"), root


def _main_error(capsys, argv: list, main=None) -> str:
    """Run the command in this process; -> its single `error: ...` line (exit 2, no traceback)."""
    from var_train.cli import main as var_train_main

    code = (main or var_train_main)([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("error")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize("override, fragment", [
    ("optim.global_batch_size=-16", "optim.global_batch_size must be at least 1, got -16"),
    ("optim.micro_batch_size=0", "optim.micro_batch_size must be at least 1, got 0"),
    ("model.depth=0", "model.depth must be at least 1, got 0"),
    ("model.label_dropout=1.5", "model.label_dropout must be between 0 and 1, got 1.5"),
    ("optim.base_lr=.nan", "optim.base_lr must be a finite number"),
    ("optim.global_batch_size=6", "must be a multiple of optim.micro_batch_size 4"),
    ("eval.top_p=2", "eval.top_p must be between 0 and 1"),
])
def test_bad_numbers_exit_2_with_one_line(data, tmp_path, capsys, override, fragment):
    shards, vae, _ = data
    line = _main_error(capsys, train_args(shards, vae, tmp_path / "run", override))
    assert fragment in line
    assert not (tmp_path / "run").exists()  # nothing written for a config that cannot run


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model:\n  depth: 2\n  embed_dim: [64\noptim: {}\n")
    assert f"{recipe}:4:6: invalid YAML" in _main_error(capsys, ["train", "--recipe", recipe])
    proc = run_command("var-train", "train", "--recipe", recipe, timeout=60)  # and as a fresh process
    assert_one_line_error(proc, f"{recipe}:4:6: invalid YAML")


def test_debug_flag_and_environment_show_the_traceback(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model: [\n")
    for proc in (run_command("var-train", "--debug", "train", "--recipe", recipe, timeout=60),
                 run_command("var-train", "train", "--recipe", recipe, timeout=60,
                             env=environment(VAR_TRAIN_DEBUG="1"))):
        assert proc.returncode == 2 and "Traceback" in proc.stderr and "error: " in proc.stderr, proc.stderr


@pytest.mark.parametrize("case", ["missing_vae", "var_as_vae", "missing_shards", "class_mismatch",
                                  "val_class_mismatch", "missing_inception", "missing_feature_extractor", "missing_reference_stats"])
def test_wrong_files_at_start_of_training(data, tmp_path, case):
    shards, vae, root = data
    overrides, fragment = {
        "missing_vae": ([f"data.vae={root / 'nope.pth'}"], "VAE not found"),
        "var_as_vae": ([f"data.vae={_tiny_var(root)}"], "is not a VQVAE checkpoint (it is a VAR"),
        "missing_shards": ([f"data.train_shards={root / 'no_shards'}"], "data.train_shards not found"),
        "class_mismatch": (["model.num_classes=7"], "num_classes: shards 10, model 7"),
        "val_class_mismatch": ([f"data.val_shards={_shards_of_3_classes(root)}"],
                               "the token shards of data.val_shards"),
        # A scheduled evaluation's files are checked before anything is written, not at its first run.
        "missing_inception": (["eval.at_end=true", f"eval.inception_weights={root / 'no_inception.pth'}"],
                              "no_inception.pth"),
        "missing_feature_extractor": (["eval.at_end=true", f"eval.feature_extractor={root / 'no_cnn.safetensors'}"],
                                      "no_cnn.safetensors' is neither"),
        "missing_reference_stats": (["eval.at_end=true", f"eval.feature_extractor={_digit_classifier(root)}",
                                     f"eval.reference_stats={root / 'no_stats.npz'}"], "no_stats.npz"),
    }[case]
    proc = run_command("var-train", *train_args(shards, vae, tmp_path / "run", "model.num_classes=10", *overrides),
                       timeout=120)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "run").exists()  # no config.yaml, no empty metrics.jsonl


def test_var_given_where_a_vae_is_expected_and_the_reverse_in_sampling(data, tmp_path):
    _, vae, root = data
    var = _tiny_var(root)
    proc = run_command("var-train", "sample", "--var", vae, "--vae", vae, "--out", tmp_path / "s", timeout=60)
    assert_one_line_error(proc, "is not a VAR checkpoint (it is a VQVAE")
    proc = run_command("var-train", "sample", "--var", var, "--vae", var, "--out", tmp_path / "s", timeout=60)
    assert_one_line_error(proc, "is not a VQVAE checkpoint (it is a VAR")  # --vae checked first


def test_var_prep_user_errors_exit_2_with_one_line(data, tmp_path):
    (tmp_path / "images" / "a").mkdir(parents=True)
    proc = run_command("var-prep", "extract", tmp_path / "images", "--vae", tmp_path / "missing.pth",
                       "--out", tmp_path / "out", "--no-progress", timeout=60)
    assert_one_line_error(proc, "VQVAE checkpoint not found")
    proc = run_command("var-prep", "verify", tmp_path / "images", timeout=60)
    assert_one_line_error(proc, "no manifest.json")


def _digit_classifier(root):
    from tests.evaluation.helpers import seeded_classifier

    path = root / "classifier.safetensors"
    if not path.exists():
        seeded_classifier(0).save(path)
    return path


def _shards_of_3_classes(root):
    path = root / "shards_3_classes"
    if not path.exists():
        make_learnable_shards(path, num_records=32, num_classes=3)
    return path


def _tiny_var(root):
    from tests.models.tiny import VAR_KW
    from var_train.models import VAR
    from var_train.models.checkpoint_io import save_model

    path = root / "var.safetensors"
    if not path.exists():
        save_model(VAR(**VAR_KW), path)
    return path


@pytest.mark.distributed
def test_a_batch_that_does_not_split_over_the_ranks_writes_nothing(data, tmp_path):
    # Known only once the world size is: 12 images cannot be split into micro-batches of 4 on 2 ranks.
    shards, vae, _ = data
    args = train_args(shards, vae, tmp_path / "run", "optim.global_batch_size=12")
    proc = run_torchrun("-m", "var_train.cli", *args, nproc=2, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    # One line per rank that got to say it: torchrun may stop the second rank once the first has exited.
    assert proc.returncode != 0 and 1 <= len(errors) <= 2, proc.stdout + proc.stderr
    for line in errors:
        assert "optim.global_batch_size=12 is not a multiple of optim.micro_batch_size x world size = 4 x 2" in line
    assert "[rank" not in proc.stderr  # no rank traceback
    assert not (tmp_path / "run").exists()


def test_extract_takes_the_tokenizers_own_schedule_and_explains_a_wrong_resolution(data, tmp_path):
    from tests.data.extract_helpers import random_images, write_image_folder

    images = tmp_path / "images"
    write_image_folder(images, random_images(4, 64, 64, seed=1), [0, 1, 0, 1])
    _, vae, _ = data  # records patch_nums 1,2,3,4: 64px at 16x downsampling
    wrong = run_command("var-prep", "extract", images, "--vae", vae, "--out", tmp_path / "wrong", "--resolution", "32",
                        "--no-progress", "--num-workers", "0", timeout=120)
    assert_one_line_error(wrong, "--resolution 32 does not match the schedule 1,2,3,4 (64px",
                          "drop --resolution to extract at 64px, or give --patch-nums ending in 2")
    assert not (tmp_path / "wrong").exists()
    right = run_command("var-prep", "extract", images, "--vae", vae, "--out", tmp_path / "tokens", "--no-progress",
                        "--num-workers", "0", timeout=120)
    assert right.returncode == 0, right.stdout + right.stderr
    manifest = json.loads((tmp_path / "tokens" / "manifest.json").read_text())
    assert manifest["patch_nums"] == [1, 2, 3, 4] and manifest["resolution"] == 64


def test_export_to_a_file_name_without_a_known_suffix_says_what_to_do(tmp_path):
    from var_train.checkpoint import export_checkpoint
    from var_train.errors import ConfigError

    with pytest.raises(ConfigError, match=r"cannot tell the export format from x\.txt: end --out in \.safetensors "
                                          r"or \.pth, or give --format"):
        export_checkpoint(tmp_path / "run", tmp_path / "x.txt")


@pytest.mark.parametrize("flags, fragment", [
    (["--per-class", "0"], "argument --per-class: must be 1 or more, got 0"),
    (["--per-class", "x"], "argument --per-class: invalid whole number value: 'x'"),
    (["--batch-size", "-2"], "argument --batch-size: must be 1 or more, got -2"),
    (["--top-k", "-5"], "argument --top-k: must be 0 or more, got -5"),
    (["--top-p", "2"], "argument --top-p: must be between 0 and 1, got 2"),
    (["--cfg", "nan"], "argument --cfg: must be a finite number, got nan"),
    (["--device", "gpu0"], "argument --device: 'gpu0' is not a device"),
])
def test_sampling_flags_out_of_range_are_one_line_before_any_work(tmp_path, capsys, flags, fragment):
    from var_train.cli import main

    # The files do not exist: the flags are refused before anything is read.
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--var", str(tmp_path / "v"), "--vae", str(tmp_path / "q"), "--out", str(tmp_path), *flags])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {fragment}") and lines[0].endswith("(see var-train sample --help)"), err


def test_cuda_without_a_gpu_and_a_missing_required_flag_are_one_line(tmp_path, capsys):
    import torch

    from var_train.cli import main

    for argv, fragment in ([["train"], "the following arguments are required: --recipe (see var-train train --help)"],
                           [["sample", "--var", "v", "--vae", "q", "--out", str(tmp_path), "--device", "cuda"],
                            "no CUDA GPU is visible here"]):
        if "cuda" in argv and torch.cuda.is_available():
            continue  # a machine with a GPU has the device
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and fragment in err, err
        assert err.startswith("error: "), err


def test_an_empty_class_range_is_one_line(data, tmp_path):
    _, vae, root = data
    proc = run_command("var-train", "sample", "--var", _tiny_var(root), "--vae", vae, "--classes", "3-1",
                       "--out", tmp_path / "s", timeout=60)
    assert_one_line_error(proc, "the range 3-1 is empty")


def test_a_misspelled_reinit_entry_is_refused_by_the_dry_run_and_at_start(data, tmp_path, capsys):
    shards, vae, root = data
    overrides = ["model.num_classes=10", f"model.init_from={_tiny_var(root)}", "model.reinit=[clas_emb]"]
    args = train_args(shards, vae, tmp_path / "run", *overrides)
    line = _main_error(capsys, [args[0], "--dry-run", *args[1:]])
    assert "model.reinit ['clas_emb'] names no tensor of the model" in line and "class_emb" in line, line
    proc = run_command("var-train", *train_args(shards, vae, tmp_path / "run", *overrides), timeout=120)
    assert_one_line_error(proc, "model.reinit ['clas_emb'] names no tensor of the model")


def test_data_too_small_for_one_step_is_refused_by_the_dry_run_and_at_start_writing_nothing(data, tmp_path, capsys):
    """32 records, micro-batches of 4 and a global batch of 64 on one process: 8 micro-batches an
    epoch, 16 accumulated per step. The dry run used to print "0 steps" and exit 0."""
    shards, vae, _ = data
    args = train_args(shards, vae, tmp_path / "run", "model.num_classes=10", "optim.global_batch_size=64",
                      "optim.micro_batch_size=4")
    expected = "one epoch has 8 micro-batches per rank, fewer than the 16 accumulated into one optimizer step"
    assert expected in _main_error(capsys, [args[0], "--dry-run", *args[1:]])
    assert expected in _main_error(capsys, args)
    assert not (tmp_path / "run").exists()  # not even config.yaml


def test_warm_starting_from_a_var_trained_with_another_vae_is_refused(data, tmp_path, capsys):
    """The VAR records the VAE it was trained with (its codebook fingerprint); warm-starting it on
    shards of another VAE trains embeddings of one codebook on the codes of another."""
    from tests.models.tiny import VAR_KW
    from var_train.compatibility import check_training_inputs
    from var_train.config import load_config
    from var_train.models import VAR
    from var_train.models.checkpoint_io import save_model

    shards, vae, _ = data
    other = {"path": "other_vae.safetensors", "codebook_sha256": "ab" * 32}  # written out by hand
    var = save_model(VAR(**VAR_KW), tmp_path / "var.safetensors", training_vae=other)
    args = train_args(shards, vae, tmp_path / "run", "model.num_classes=10", f"model.init_from={var}")
    line = _main_error(capsys, args)
    assert f"model.init_from {var} was trained with another VAE, other_vae.safetensors (codebook fingerprint " \
           f"abababababab...)" in line and "data.allow_vae_mismatch=true" in line, line
    assert not (tmp_path / "run").exists()

    warnings = []
    cfg = load_config("recipes/tiny.yaml", args[3:] + ["data.allow_vae_mismatch=true"])
    check_training_inputs(cfg.model, cfg.data, warn=warnings.append)  # deliberate: a warning, not a refusal
    assert len(warnings) == 1 and "was trained with another VAE" in warnings[0], warnings


def test_the_dry_run_refuses_shards_unlike_the_model_as_training_does(data, tmp_path, capsys):
    shards, vae, _ = data  # 10 classes; train_args says model.num_classes=2
    line = _main_error(capsys, ["train", "--dry-run", *train_args(shards, vae, tmp_path / "run")[1:]])
    assert "the token shards of data.train_shards" in line and "num_classes: shards 10, model 2" in line, line
