"""Reading torch.distributed.checkpoint (DCP) folders without ever running a pickle's code.

DCP's FileSystemReader reads `<checkpoint>/.metadata` with `pickle.load`, and its default load
planner reads non-tensor entries (an optimizer's hyper-parameters, step counts) with
`torch.load(weights_only=False)`: a checkpoint folder someone hands you could run arbitrary code on
resume or export. Every DCP read in var_train goes through `SafeFileSystemReader` and
`SafeLoadPlanner` instead (`safe_load`, `read_dcp_metadata`):

- `.metadata` is unpickled by `RestrictedUnpickler`, which admits only the classes a DCP metadata
  file is made of (DCP's metadata dataclasses, `_StorageInfo`, torch.Size, dtypes, layouts,
  memory formats, pathlib paths) and refuses any other global with `UnsafeFileError`;
- byte entries are read with `torch.load(weights_only=True)` (plain Python values and tensors).
Tensor data was already read with `weights_only=True` by DCP itself.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from var_train.errors import CorruptFileError, UnsafeFileError

METADATA_FILE = ".metadata"

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint._extension": {"StreamTransformExtension"},
    "torch.serialization": {"_get_layout"},  # looks a layout up by name
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


def _is_torch_constant(name: str) -> bool:
    """torch.float32, torch.strided, torch.contiguous_format, ...: values, not callables."""
    value = getattr(torch, name, None)
    return name == "Size" or isinstance(value, (torch.dtype, torch.layout, torch.memory_format))


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals of a DCP metadata file."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module == "torch" and _is_torch_constant(name)) or name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeFileError(
            f"refusing to load {self.source}: it asks for {module}.{name}, which a checkpoint's metadata never "
            f"contains (loading it could run code). Do not use this checkpoint folder; ask its author for the "
            f"exported .safetensors weights (`var-train export`), the format to share")


def read_dcp_metadata(path: str | Path) -> Metadata:
    """Unpickle a DCP `.metadata` file (or a DCP folder's) with the restricted unpickler."""
    path = Path(path)
    if path.is_dir():
        path = path / METADATA_FILE
    if not path.is_file():
        raise CorruptFileError(f"{path} is missing: the checkpoint is incomplete")
    try:
        with open(path, "rb") as handle:
            metadata = RestrictedUnpickler(handle, str(path)).load()
    except UnsafeFileError:
        raise
    except Exception as error:  # truncated or garbled: pickle raises many types
        raise CorruptFileError(f"{path} is not a readable checkpoint metadata file "
                               f"({type(error).__name__}: {error})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeFileError(f"refusing to load {path}: it holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is read by `read_dcp_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        metadata = read_dcp_metadata(path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads byte entries as weights-only (plain values and tensors)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise UnsafeFileError(f"refusing to load the checkpoint entry {read_item.dest_index.fqn}: it is not "
                                  f"plain data ({error})") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner uses

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def safe_load(state_dict: dict, checkpoint_dir: str | Path, **kwargs: Any) -> None:
    """`dcp.load` of `checkpoint_dir` into `state_dict` (in place) through the safe reader and planner;
    other keyword arguments (process_group, no_dist) go to dcp.load."""
    dcp.load(state_dict, storage_reader=SafeFileSystemReader(str(checkpoint_dir)),
             planner=SafeLoadPlanner(), **kwargs)


# -- other pickles in a checkpoint folder ---------------------------------------------------------------
# DeepSpeed reads its own files with torch.load(weights_only=False); before any of them is loaded
# (resume, export), every .pt file of a checkpoint is scanned (statically: nothing is executed) for
# the globals it would need beyond torch's weights-only set, and only these DeepSpeed classes pass.
TRUSTED_PICKLE_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


def check_pickle_file(path: str | Path) -> None:
    """Raise UnsafeFileError if the torch.save file at `path` needs a global other than plain data,
    tensors and TRUSTED_PICKLE_GLOBALS; CorruptFileError if it cannot be parsed."""
    try:
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as error:  # not a zip / truncated: the checksums report it with the file name
        raise CorruptFileError(f"{path} is not a readable torch file ({type(error).__name__}: {error})") from None
    unsafe = sorted(needed - TRUSTED_PICKLE_GLOBALS)
    if unsafe:
        raise UnsafeFileError(f"refusing to load {path}: it asks for {', '.join(unsafe[:3])}, which a checkpoint "
                              f"never contains (loading it could run code). Do not use this checkpoint folder; ask "
                              f"its author for the exported .safetensors weights (`var-train export`)")
