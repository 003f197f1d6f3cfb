"""Model weights in and out: the reference's `.pth` state dicts and our safetensors files.

- Reference layout (`vae_ch160v4096z32.pth`, `var_d16.pth`, ...): a plain state dict whose keys
  are exactly our modules' keys (buffers included). Its architecture is read off the tensor
  shapes, so `load_var("var_d16.pth")` needs no other argument.
- Ours: safetensors with the model's constructor arguments as JSON in the metadata (an exported
  VAR also records the VAE it was trained with, `TRAINING_VAE_METADATA_KEY`).
Loading is always strict: a checkpoint whose keys or shapes differ raises StateDictMismatchError
listing every difference; nothing is ever partially loaded.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from var_train.checksums import tensors_digest
from var_train.errors import CorruptFileError, MismatchError, MissingInputError, UnsafeFileError
from var_train.fileio import atomic_write

from .quantizer import DEFAULT_PATCH_NUMS, MultiScaleQuantizer
from .var import VAR
from .vqvae import VQVAE

CONFIG_METADATA_KEY = "var_train_config"
KIND_METADATA_KEY = "var_train_model"
TRAINING_VAE_METADATA_KEY = "var_train_training_vae"  # JSON: the VAE a VAR was trained with (codebook fingerprint)
DIGEST_METADATA_KEY = "var_train_tensors_xxh3_128"  # checksums.tensors_digest of the file's tensors


class StateDictMismatchError(MismatchError, RuntimeError):  # a user error: the wrong file for this model
    def __init__(self, source: str, missing: list[str], unexpected: list[str], wrong_shape: list[str]):
        self.missing, self.unexpected, self.wrong_shape = missing, unexpected, wrong_shape
        lines = [f"checkpoint {source} does not match the model:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        super().__init__("\n".join(lines))


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "<state dict>") -> None:
    """Load with strict=True semantics, but check shapes first and report every difference."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
                   for key in sorted(set(expected) & set(state_dict)) if state_dict[key].shape != expected[key].shape]
    if missing or unexpected or wrong_shape:
        raise StateDictMismatchError(source, missing, unexpected, wrong_shape)
    module.load_state_dict(state_dict, strict=True)


# -- reading files ---------------------------------------------------------------------------------
def _existing(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise MissingInputError(f"{path} is a directory, not a checkpoint file (.safetensors or .pth); a training "
                                f"run's weights come out with `var-train export {path} --out var.safetensors`")
    if not path.is_file():
        raise MissingInputError(f"checkpoint not found: {path}")
    return path


def read_weights(path: str | Path, metadata_only: bool = False) -> tuple[Any, dict[str, str]]:
    """-> (a .safetensors file's tensors, or what any other file holds as read by
    `torch.load(weights_only=True)`; the safetensors metadata, {} for a .pth). `metadata_only`
    reads just a .safetensors header (tensors None). Every weights file of the project is read
    here, so a truncated, damaged or wrong file (a PNG passed as weights) is one user error
    naming it, not the reader's traceback."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                state = None if metadata_only else {k: f.get_tensor(k) for k in f.keys()}
        else:
            return torch.load(path, map_location="cpu", weights_only=True), {}
    # Only the readers run here, and on bytes that are not theirs they raise many types: safetensors
    # its SafetensorError; torch.load a RuntimeError or OSError for a cut zip, and KeyError,
    # IndexError, EOFError, UnpicklingError, ... where its unpickler meets no pickle (a PNG, a text).
    except Exception as error:
        raise _unreadable(path, error) from error
    recorded = metadata.get(DIGEST_METADATA_KEY)
    if state is not None and recorded is not None and tensors_digest(state) != recorded:
        raise CorruptFileError(f"{path}: its tensors differ from the digest recorded when it was written (damaged in "
                               f"a copy, a download or on disk); export it again or check the download")
    return state, metadata


def write_weights(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write `state` as .safetensors, atomically, with `metadata` and the digest of its tensors
    (which `read_weights` checks: the file proves its own integrity wherever it is copied)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_write(path) as tmp:
        save_file(state, str(tmp), metadata={**metadata, DIGEST_METADATA_KEY: tensors_digest(state)})
    return path


def _unreadable(path: Path, error: Exception) -> UnsafeFileError | CorruptFileError:
    text = str(error)
    if "Unsupported global" in text:  # weights_only refused a Python object: loading it could run code
        wanted = re.search(r"GLOBAL (\S+)", text)
        return UnsafeFileError(f"refusing to load {path}: it asks for {wanted[1] if wanted else 'a Python object'}, "
                               f"which plain weights never contain (loading it could run code); pass a state "
                               f"dict of tensors or a .safetensors file (`var-train export`)")
    if path.suffix == ".safetensors" or isinstance(error, (RuntimeError, OSError)):
        reason = (text.splitlines() or [type(error).__name__])[0][:160]
    else:  # the unpickler's own words ("KeyError: 101", "Unsupported operand 80") would not help
        reason = "not a file written by torch.save"
    kind = ".safetensors" if path.suffix == ".safetensors" else "PyTorch weights"
    return CorruptFileError(f"{path} is not a readable {kind} file (truncated, damaged or not weights: {reason}); "
                            f"export it again or check the download")


def metadata_json(path: str | Path, metadata: dict[str, str], key: str) -> dict | None:
    """The JSON object a .safetensors file records under `key` (None when it records none). The
    header parsed, but its text is still the file's word: a damaged or hand-edited entry is one
    CorruptFileError naming the file and the entry, not a JSONDecodeError."""
    if key not in metadata:
        return None
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as error:
        raise CorruptFileError(f"{path}: its {key!r} metadata is not valid JSON ({error}); "
                               f"export it again or check the download") from None
    if not isinstance(value, dict):
        raise CorruptFileError(f"{path}: its {key!r} metadata is {type(value).__name__}, not a JSON object; "
                               f"export it again or check the download")
    return value


def check_recorded_options(model_class: type, config: dict, path: str | Path, required: tuple[str, ...] = ()) -> None:
    """A config read from a file names only options `model_class` takes, and all of `required`."""
    unknown = sorted(set(config) - set(inspect.signature(model_class).parameters))
    if unknown:
        raise MismatchError(f"{path} records {model_class.__name__} options this version does not take: "
                            f"{', '.join(unknown)} (written by a newer var_train, or edited?)")
    missing = [name for name in required if name not in config]
    if missing:
        raise MismatchError(f"{path} records no {', '.join(missing)} for its {model_class.__name__}; export it again")


def build_from_record(model_class: type, config: dict, path: str | Path):
    """`model_class(**config)` for a config read from a file: options this version does not take, or
    values the constructor refuses, are a MismatchError naming the file, not a TypeError."""
    check_recorded_options(model_class, config, path)
    try:
        return model_class(**config)
    except (TypeError, ValueError) as error:
        raise MismatchError(f"{path}: its recorded {model_class.__name__} options do not build one "
                            f"({error}); export it again") from None


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """-> (state dict on CPU, our stored config or None for a reference .pth)."""
    path = _existing(path)
    state, metadata = read_weights(path)
    if path.suffix == ".safetensors":
        return state, metadata_json(path, metadata, CONFIG_METADATA_KEY)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MismatchError(f"{path} is not a plain state dict of tensors (the reference .pth layout)")
    return state, None


def save_model(module: nn.Module, path: str | Path, training_vae: dict | None = None) -> Path:
    """Write `module`'s weights as safetensors with its constructor arguments in the metadata, and
    (a VAR) `training_vae`: which VAE it was trained with, for sampling's check of the VAE given."""
    metadata = {KIND_METADATA_KEY: type(module).__name__, CONFIG_METADATA_KEY: json.dumps(module.config)}
    if training_vae:
        metadata[TRAINING_VAE_METADATA_KEY] = json.dumps(training_vae)
    return write_weights(module.state_dict(), path, metadata)


def read_training_vae(path: str | Path) -> dict | None:
    """The VAE a VAR file records it was trained with (None: a reference .pth or an older export)."""
    path = _existing(path)
    if path.suffix != ".safetensors":
        return None
    return metadata_json(path, read_weights(path, metadata_only=True)[1], TRAINING_VAE_METADATA_KEY)


def save_reference_layout(module: nn.Module, path: str | Path) -> Path:
    """Write a plain `.pth` state dict in the released checkpoints' layout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, tmp)
    return path


# -- architecture read off a reference state dict ---------------------------------------------------
def _patch_nums_from_levels(levels: torch.Tensor) -> list[int]:
    counts = torch.bincount(levels.flatten()).tolist()
    sides = [math.isqrt(c) for c in counts]
    if any(s * s != c for s, c in zip(sides, counts)):
        raise ValueError(f"lvl_1L does not describe square scales: {counts}")
    return sides


def var_config_from_state_dict(state: dict[str, torch.Tensor]) -> dict:
    embed_dim = state["pos_start"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    l2_norm = "blocks.0.attn.scale_mul_1H11" in state
    return dict(
        vocab_size=state["head.weight"].shape[0], z_channels=state["word_embed.weight"].shape[1],
        num_classes=state["class_emb.weight"].shape[0] - 1, depth=depth, embed_dim=embed_dim,
        num_heads=state["blocks.0.attn.scale_mul_1H11"].shape[1] if l2_norm else embed_dim // 64,
        mlp_ratio=state["blocks.0.ffn.fc1.weight"].shape[0] / embed_dim, attn_l2_norm=l2_norm,
        shared_aln="shared_ada_lin.1.weight" in state,
        patch_nums=_patch_nums_from_levels(state["lvl_1L"]) if "lvl_1L" in state else list(DEFAULT_PATCH_NUMS),
    )


def vae_config_from_state_dict(state: dict[str, torch.Tensor], patch_nums=None) -> dict:
    """The VQVAE's constructor arguments read off its tensors. The scale schedule is not a weight
    (phi is chosen by a scale's relative position, the codebook is shared): any `patch_nums` works,
    but without one the checkpoint's scale count must be the default's."""
    prefix = "quantize." if "quantize.embedding.weight" in state else ""
    vocab_size, z_channels = state[prefix + "embedding.weight"].shape
    num_scales = state[prefix + "ema_vocab_hit_SV"].shape[0]
    if patch_nums is None:
        if num_scales != len(DEFAULT_PATCH_NUMS):
            raise MismatchError(f"this VQVAE checkpoint has {num_scales} scales and records no schedule: give "
                                f"its patch_nums (e.g. --patch-nums; the default "
                                f"{','.join(map(str, DEFAULT_PATCH_NUMS))} has {len(DEFAULT_PATCH_NUMS)})")
        patch_nums = DEFAULT_PATCH_NUMS
    config = dict(vocab_size=vocab_size, z_channels=z_channels, patch_nums=list(patch_nums),
                  share_quant_resi=sum(1 for k in state if k.startswith(prefix + "quant_resi.qresi_ls.") and k.endswith(".weight")))
    if "encoder.conv_in.weight" in state:
        ch = config["ch"] = state["encoder.conv_in.weight"].shape[0]
        count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
        levels = count("encoder.down.")
        ch_mult = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)]
        encoder_blocks, decoder_blocks = count("encoder.down.0.block."), count("decoder.up.0.block.")
        if (tuple(ch_mult), encoder_blocks, decoder_blocks) != ((1, 1, 2, 2, 4), 2, 3):  # not the released layout
            config.update(ch_mult=ch_mult, encoder_blocks=encoder_blocks, decoder_blocks=decoder_blocks)
    return config


# -- public loaders --------------------------------------------------------------------------------
def _require_kind(state: dict[str, torch.Tensor], path, wanted: str) -> None:
    """A clear error for a VQVAE given where a VAR is expected (and the reverse), not a KeyError."""
    is_var = "pos_start" in state
    is_vae = "quantize.embedding.weight" in state or "embedding.weight" in state
    if wanted == "VAR" and not is_var:
        hint = " (it is a VQVAE: pass it as --vae / data.vae)" if is_vae else ""
        raise MismatchError(f"{path} is not a VAR checkpoint{hint}")
    if wanted == "VQVAE" and not is_vae:
        hint = " (it is a VAR: pass it as --var / model.init_from)" if is_var else ""
        raise MismatchError(f"{path} is not a VQVAE checkpoint{hint}")


def load_var(path: str | Path, **overrides) -> VAR:
    """A VAR from a reference `.pth` or our safetensors; `overrides` set non-weight options
    (label_dropout, drop_path_rate, attention_backend)."""
    state, config = read_checkpoint(path)
    _require_kind(state, path, "VAR")
    config = {**(config or var_config_from_state_dict(state)), **overrides}
    model = build_from_record(VAR, config, path)
    load_state_dict_strict(model, state, str(path))
    return model


def _on_schedule(state: dict[str, torch.Tensor], config: dict, patch_nums, prefix: str) -> tuple[dict, dict]:
    """Serve a VQVAE checkpoint on another scale schedule (e.g. the paper's 512px one from the 256px
    VAE). Only the per-scale codebook hit statistics depend on the scale count; they restart at zero."""
    if patch_nums is None:
        return state, config
    patch_nums = [int(p) for p in patch_nums]
    if not patch_nums or any(p < 1 for p in patch_nums) or any(a >= b for a, b in zip(patch_nums, patch_nums[1:])):
        raise ValueError(f"patch_nums must be positive and strictly increasing, got {patch_nums}")
    key = prefix + "ema_vocab_hit_SV"
    if key in state and state[key].shape[0] != len(patch_nums):
        state = {**state, key: state[key].new_zeros(len(patch_nums), state[key].shape[1])}
    return state, {**config, "patch_nums": patch_nums}


def load_vae(path: str | Path, patch_nums=None) -> VQVAE:
    """A VQVAE on its own schedule, or on `patch_nums` (any schedule: images are then
    16 * patch_nums[-1] pixels at the released 16x downsampling)."""
    state, config = read_checkpoint(path)
    _require_kind(state, path, "VQVAE")
    config = config or vae_config_from_state_dict(state, patch_nums)
    state, config = _on_schedule(state, config, patch_nums, "quantize.")
    model = build_from_record(VQVAE, config, path)
    load_state_dict_strict(model, state, str(path))
    return model


def load_quantizer(path: str | Path, patch_nums=None) -> MultiScaleQuantizer:
    """Only the codebook and phi convs of a full VQVAE checkpoint (what training needs)."""
    state, config = read_checkpoint(path)
    _require_kind(state, path, "VQVAE")
    prefix = "quantize."
    quantizer_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} or state
    config = config or vae_config_from_state_dict(state, patch_nums)
    check_recorded_options(VQVAE, config, path, required=("vocab_size", "z_channels", "share_quant_resi", "patch_nums"))
    quantizer_state, config = _on_schedule(quantizer_state, config, patch_nums, "")
    quantizer = MultiScaleQuantizer(vocab_size=config["vocab_size"], z_channels=config["z_channels"],
                                    share_quant_resi=config["share_quant_resi"], patch_nums=config["patch_nums"],
                                    beta=config.get("beta", 0.25))
    load_state_dict_strict(quantizer, quantizer_state, f"{path} (quantize.*)")
    return quantizer
