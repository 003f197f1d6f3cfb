"""Do these files belong together? VAE <-> token shards <-> model, and checkpoint <-> recipe.

Checked at the start of training, validation, sampling and evaluation, before anything is written,
so a mismatch costs a second and one clear message per difference instead of a run trained against
the wrong codebook:

- the VAE file against the shards' manifest: the same file (`vae_sha256`) or, for a re-saved copy
  (.pth -> .safetensors), the same codebook and phi convs (`vae_codebook_sha256`, see
  `vae_fingerprint`); its vocabulary size; the resolution its downsampling gives at the shards'
  last scale;
- the VAE against the model: vocabulary size and z channels, and its codebook against the one the
  VAR was trained with when the VAR records it (`training_vae` in a checkpoint's metadata.json and
  an exported .safetensors; a reference .pth or an older export records nothing: no check);
- the shards against the model: patch_nums, vocabulary size, classes (`Manifest.check_compatible`);
- on resume, the checkpoint's model config against the recipe's (`model_config_changes`), and the
  codebook it was trained with against data.vae's.

`data.allow_vae_mismatch=true` (or `--allow-vae-mismatch`) turns the VAE checks into warnings for the
rare deliberate case; shape mismatches between shards and model stay errors (training cannot run).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from var_train.data.manifest import Manifest, file_sha256
from var_train.data.sources import is_remote, parse_source
from var_train.errors import MismatchError, MissingInputError

logger = logging.getLogger(__name__)

# Keys of a VAR's config that change its parameters' shapes or meaning; the others (dropouts, the
# attention kernel) are training options a resume may change.
MODEL_SHAPE_KEYS = ("vocab_size", "z_channels", "num_classes", "depth", "embed_dim", "num_heads", "mlp_ratio",
                    "attn_l2_norm", "shared_aln", "patch_nums", "norm_eps")
_QUANTIZER_PREFIX = "quantize."
_TRAINING_STATISTICS = ("ema_vocab_hit_SV",)  # changes while training the VAE, not what a token means


def vae_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the quantizer's tensors (codebook, phi convs) by name, shape and float32 value:
    equal for a VAE re-saved in another file format, different for another codebook."""
    quantizer = {k[len(_QUANTIZER_PREFIX):]: v for k, v in state.items() if k.startswith(_QUANTIZER_PREFIX)} or state
    digest = hashlib.sha256()
    for name in sorted(quantizer):
        if name.split(".")[-1] in _TRAINING_STATISTICS:
            continue
        tensor = quantizer[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@dataclass
class VaeFacts:
    path: Path
    vocab_size: int
    z_channels: int
    downsample: int
    fingerprint: str
    _sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def record(self) -> dict:
        """What a trained VAR records about its VAE: the codebook fingerprint (survives a re-save),
        the path, and the file's sha256 when it was already computed (hashing a 400 MB VAE costs seconds)."""
        record = {"codebook_sha256": self.fingerprint, "path": str(self.path)}
        if self._sha256 is not None:
            record["sha256"] = self._sha256
        return record


def read_vae_facts(path: str | Path, what: str = "data.vae") -> VaeFacts:
    """What the checks need from a VAE checkpoint (a full VQVAE or a quantizer-only file)."""
    from var_train.models.checkpoint_io import read_checkpoint

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"VAE not found: {path} ({what}); pass the VQVAE checkpoint the shards were "
                                f"extracted with")
    state, config = read_checkpoint(path)
    key = next((k for k in (_QUANTIZER_PREFIX + "embedding.weight", "embedding.weight") if k in state), None)
    if key is None:
        hint = " (it is a VAR: pass it as --var / model.init_from)" if "pos_start" in state else ""
        raise MismatchError(f"{path} ({what}) is not a VQVAE checkpoint{hint}: it has no codebook")
    vocab_size, z_channels = state[key].shape
    ch_mult = (config or {}).get("ch_mult")
    if ch_mult is None and "encoder.conv_in.weight" in state:
        levels = len({k.split(".")[2] for k in state if k.startswith("encoder.down.")})
        ch_mult = [0] * levels
    downsample = 2 ** (len(ch_mult) - 1) if ch_mult else 16  # the released VQVAE's 5 levels
    return VaeFacts(path, int(vocab_size), int(z_channels), downsample, vae_fingerprint(state))


def vae_shard_differences(vae: VaeFacts, manifest: Manifest, shards: str | Path) -> list[str]:
    """Each way `vae` is not the VAE that made the shards (empty when it is, or cannot be told)."""
    differences = []
    if manifest.vae_sha256 and manifest.vae_sha256 != vae.sha256:
        if not manifest.vae_codebook_sha256:
            differences.append(f"{vae.path} is not the VAE file the shards in {shards} were extracted with "
                               f"(sha256 {vae.sha256[:12]}..., manifest {manifest.vae_sha256[:12]}... from "
                               f"{manifest.vae_path or 'an unnamed file'})")
        elif manifest.vae_codebook_sha256 != vae.fingerprint:
            differences.append(f"{vae.path} has another codebook than the VAE the shards in {shards} were extracted "
                               f"with ({manifest.vae_path or 'unnamed'}): fingerprint {vae.fingerprint[:12]}..., "
                               f"manifest {manifest.vae_codebook_sha256[:12]}...")
    if vae.vocab_size != manifest.vocab_size:
        differences.append(f"vocab size: VAE {vae.path} has {vae.vocab_size} codes, the shards in {shards} "
                           f"{manifest.vocab_size}")
    resolution = vae.downsample * manifest.patch_nums[-1]
    if manifest.resolution and resolution != manifest.resolution:
        differences.append(f"resolution: VAE {vae.path} gives {resolution}px at the last scale "
                           f"{manifest.patch_nums[-1]} (downsampling {vae.downsample}x), the shards in {shards} "
                           f"were extracted at {manifest.resolution}px")
    return differences


def vae_model_differences(vae: VaeFacts, vocab_size: int, z_channels: int, model_name: str = "the model") -> list[str]:
    differences = []
    if vae.vocab_size != vocab_size:
        differences.append(f"vocab size: VAE {vae.path} has {vae.vocab_size} codes, {model_name} {vocab_size}")
    if vae.z_channels != z_channels:
        differences.append(f"z channels: VAE {vae.path} has {vae.z_channels}, {model_name} {z_channels}")
    return differences


def report(differences: list[str], allow_mismatch: bool, override: str, warn: Callable[[str], None] | None = None,
           title: str = "the VAE, shards and model do not belong together",
           advice: str = "use the VAE the shards were extracted with") -> None:
    """Raise one MismatchError listing every difference, or (deliberate override) warn about each."""
    if not differences:
        return
    if allow_mismatch:
        for difference in differences:
            (warn or logger.warning)(f"warning: {difference} (continuing: {override})")
        return
    if len(differences) == 1:
        raise MismatchError(f"{title}: {differences[0]} ({advice}; if this is deliberate, set {override})")
    raise MismatchError(f"{title} ({advice}; if this is deliberate, set {override}):\n  " + "\n  ".join(differences))


def check_training_inputs(model_cfg, data_cfg, warn: Callable[[str], None] | None = None,
                          eval_vae: str | None = None) -> VaeFacts:
    """Training's start-up check of data.vae, data.train_shards / val_shards, eval.vae and the model
    section. The shape checks (patch_nums, vocab, classes of the shards vs the model) always raise."""
    for name, shards in (("data.train_shards", data_cfg.train_shards), ("data.val_shards", data_cfg.val_shards)):
        if shards and not is_remote(shards) and not Path(shards).is_dir():
            raise MissingInputError(f"{name} not found: {shards} (a folder made by `var-prep extract`)")
    vae = read_vae_facts(data_cfg.vae, "data.vae")
    differences = vae_model_differences(vae, model_cfg.vocab_size, model_cfg.z_channels,
                                        "the model (model.vocab_size / model.z_channels)")
    for name, shards in (("data.train_shards", data_cfg.train_shards), ("data.val_shards", data_cfg.val_shards)):
        if shards:
            manifest = parse_source(shards).read_manifest()  # a URL's manifest is fetched like its shards
            manifest.check_compatible(model_cfg.patch_nums, model_cfg.vocab_size, model_cfg.num_classes,
                                      where=f"of {name} ({shards})")
            differences += vae_shard_differences(vae, manifest, shards)
    warm_start_vae = training_vae_of(model_cfg.init_from) if model_cfg.init_from else None
    if warm_start_vae and warm_start_vae.get("codebook_sha256") not in (None, vae.fingerprint):
        differences.append(f"model.init_from {model_cfg.init_from} was trained with another VAE, "
                           f"{_describe_recorded(warm_start_vae)}, than data.vae {data_cfg.vae} (codebook fingerprint "
                           f"{vae.fingerprint[:12]}...): its token embeddings speak another codebook")
    if eval_vae and Path(eval_vae) != Path(data_cfg.vae):
        decoder = read_vae_facts(eval_vae, "eval.vae")
        if decoder.fingerprint != vae.fingerprint:
            differences.append(f"eval.vae {eval_vae} has another codebook than data.vae {data_cfg.vae}: "
                               f"samples would be decoded with the wrong codes")
    report(differences, data_cfg.allow_vae_mismatch, "data.allow_vae_mismatch=true", warn)
    return vae


def training_vae_of(var_path: str | Path) -> dict | None:
    """The VAE a VAR file or training checkpoint directory records it was trained with (None when
    it records none: a reference .pth, an older export or checkpoint)."""
    var_path = Path(var_path)
    if var_path.is_dir():
        from var_train.checkpoint import read_metadata, resolve_checkpoint

        return read_metadata(resolve_checkpoint(var_path)).get("training_vae")
    from var_train.models.checkpoint_io import read_training_vae

    return read_training_vae(var_path)


def _describe_recorded(recorded: dict) -> str:
    sha = f", file sha256 {recorded['sha256'][:12]}..." if recorded.get("sha256") else ""
    fingerprint = recorded["codebook_sha256"][:12]
    return f"{recorded.get('path') or 'an unnamed file'} (codebook fingerprint {fingerprint}...{sha})"


def check_sampling_inputs(var_config: dict, vae_path: str | Path, allow_mismatch: bool = False,
                          trained_with: dict | None = None, warn: Callable[[str], None] | None = None) -> VaeFacts:
    """Sampling / evaluation / editing: the VAE must speak the VAR's vocabulary, and have the codebook
    of the VAE the VAR was trained with when the VAR records it (`trained_with`, see `training_vae_of`)."""
    vae = read_vae_facts(vae_path, "--vae")
    differences = vae_model_differences(vae, var_config["vocab_size"], var_config["z_channels"], "the VAR")
    if trained_with and trained_with.get("codebook_sha256") and trained_with["codebook_sha256"] != vae.fingerprint:
        differences.append(f"{vae.path} has another codebook (fingerprint {vae.fingerprint[:12]}...) than the VAE "
                           f"the VAR was trained with: {_describe_recorded(trained_with)}")
    report(differences, allow_mismatch, "--allow-vae-mismatch", warn, title="the VAE does not match the VAR",
           advice="use the VAE the VAR was trained with")
    return vae


# -- resume ------------------------------------------------------------------------------------------
def _shown(value) -> str:
    return str(list(value)) if isinstance(value, (list, tuple)) else repr(value)


def model_config_changes(saved: dict, recipe: dict) -> tuple[list[str], list[str]]:
    """(shape changes, other changes) between a checkpoint's model config and the recipe's, each as
    'key: old -> new'. Keys missing on one side are compared only when both have them."""
    shape, other = [], []
    for key in sorted(set(saved) & set(recipe)):
        old, new = saved[key], recipe[key]
        if isinstance(old, (list, tuple)) or isinstance(new, (list, tuple)):
            same = list(old or []) == list(new or [])
        else:
            same = old == new
        if not same:
            (shape if key in MODEL_SHAPE_KEYS else other).append(f"{key}: {_shown(old)} -> {_shown(new)}")
    return shape, other


def check_resume_model(checkpoint: str | Path, saved: dict, recipe: dict, run_dir: str | Path,
                       log: Callable[[str], None] | None = None) -> None:
    """Refuse to resume `checkpoint` into a model of another shape (nothing has been written yet)."""
    shape, other = model_config_changes(saved, recipe)
    if shape:
        raise MismatchError(
            f"cannot resume {checkpoint}: the recipe's model differs from the checkpoint's "
            f"({', '.join(shape)}); nothing was changed in {run_dir}. To train the new model use a new "
            f"run.output_dir; to start it from these weights deliberately, also set "
            f"model.init_from={run_dir} (a warm start); to continue the old run, restore the model.* keys")
    if other and log is not None:
        log(f"resuming with changed training options of the model: {', '.join(other)}")


def check_resume_before_writing(cfg, recipe_model_config: dict, run_dir: str | Path,
                                log: Callable[[str], None] | None = None, vae: VaeFacts | None = None) -> Path | None:
    """The checkpoint a training start would resume (None: a fresh start), after checking that it
    holds the recipe's model (and, given `vae`, was trained with its codebook when the checkpoint
    records one); other changes of the recipe against the run's config.yaml are logged.
    Reads only: call it before config.yaml or any checkpoint is written."""
    from var_train.checkpoint import complete_checkpoints, read_metadata, resolve_checkpoint

    resume = str(cfg.checkpoint.resume)
    run_dir = Path(run_dir)
    if resume == "none":
        return None
    candidates = complete_checkpoints(run_dir / "checkpoints")[::-1] if resume == "auto" else [resolve_checkpoint(resume)]
    checkpoint, metadata = None, None
    for candidate in candidates:  # newest first; an unreadable one is dealt with (moved aside) by the loader
        try:
            checkpoint, metadata = candidate, read_metadata(candidate)
            break
        except (OSError, ValueError):
            continue
    if checkpoint is None:
        return None
    check_resume_model(checkpoint, metadata.get("model_config") or {}, recipe_model_config, run_dir, log)
    recorded = metadata.get("training_vae")  # absent in checkpoints written before it was recorded
    if vae is not None and recorded and recorded.get("codebook_sha256") not in (None, vae.fingerprint):
        report([f"data.vae {vae.path} has another codebook (fingerprint {vae.fingerprint[:12]}...) than the VAE "
                f"{checkpoint} was trained with: {_describe_recorded(recorded)}"],
               cfg.data.allow_vae_mismatch, "data.allow_vae_mismatch=true", log, title=f"cannot resume {run_dir}",
               advice=f"use the run's VAE and shards, or a new run.output_dir; nothing was changed in {run_dir}")
    previous = run_dir / "config.yaml"
    if log is not None and previous.is_file():
        import yaml

        try:
            old = yaml.safe_load(previous.read_text()) or {}
        except yaml.YAMLError:
            old = {}
        changes = [f"{section}.{key}: {_shown(value)} -> {_shown(new_values.get(key))}"
                   for section, new_values in cfg.to_dict().items() if section != "model"
                   for key, value in (old.get(section) or {}).items()
                   if key in new_values and new_values[key] != value]
        if changes:
            log(f"resuming with changed settings (allowed): {', '.join(changes)}")
    return checkpoint
