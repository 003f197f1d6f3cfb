"""Token shards: the record format, the manifest, and the WebDataset loader that batches them."""

from .loader import TokenBatch, TokenLoader, build_token_loader
from .manifest import Manifest, ShardInfo, read_manifest, write_manifest
from .records import CorruptRecordError, TokenRecord, decode_record, encode_record

__all__ = [
    "CorruptRecordError", "Manifest", "ShardInfo", "TokenBatch", "TokenLoader", "TokenRecord",
    "build_token_loader", "decode_record", "encode_record", "read_manifest", "write_manifest",
]
