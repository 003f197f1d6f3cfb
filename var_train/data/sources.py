"""Where token shards are read from: a local folder, or a URL read by WebDataset's own opener.

`data.train_shards` / `data.val_shards` take any of:

    /data/tokens                                        a local folder: the fast tar reader (tar_reader.py)
    https://host/tokens                                 the URL of a shard folder: <base>/manifest.json,
                                                        <base>/<shard name> for each shard of the manifest
    https://host/tokens/shard-{000000..000099}.tar     a WebDataset brace pattern: the expanded names must be
    pipe:cat /data/tokens/shard-{000000..000099}.tar    the manifest's shards; manifest.json is read from the
                                                        same place (the pattern replaced by its name)
    pipe:aws s3 cp s3://bucket/tokens/{file} -          a template: {file} is replaced by manifest.json and by
                                                        each shard's name

Everything that is not a local folder is opened with `webdataset.gopen` (http(s) and other
schemes through curl, `pipe:` through the shell, WebDataset's GOPEN_REWRITE honoured) and read
with WebDataset's streaming tar iterator (`tar_file_expander` + `group_by_keys`), which yields
the same sample dicts as the local reader. The loader's plan, its exact resume and its checks
(records per shard, corrupt records named by shard and key) are the same for both: a shard is
streamed from its start and the records before the planned range are skipped, as locally.
`pipe:` runs a shell command from the config: use it with configs you trust (as WebDataset does).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import braceexpand
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .tar_reader import iter_tar_samples

FILE_PLACEHOLDER = "{file}"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BRACES = re.compile(r"\{[^{}]*(?:\.\.|,)[^{}]*\}")
_NAME_STOP = " \t/'\""


def is_remote(spec: str | Path) -> bool:
    """A URL (any scheme://, or pipe:) rather than a local path; file:// counts as local."""
    text = str(spec)
    return text.startswith("pipe:") or (bool(_SCHEME.match(text)) and not text.startswith("file://"))


@dataclass(frozen=True)
class ShardSource:
    """A parsed `data.*_shards` value."""

    spec: str
    template: str | None = None            # remote: "...{file}..."; None for a local folder
    names: tuple[str, ...] | None = None   # remote brace pattern: the shard names it expands to

    @property
    def local(self) -> bool:
        return self.template is None

    def url(self, name: str) -> str:
        """Where the file `name` (a shard, or manifest.json) of this source is read from."""
        if self.template is None:
            return str(Path(self.spec.removeprefix("file://")) / name)
        return self.template.replace(FILE_PLACEHOLDER, name)

    def read_manifest(self) -> Manifest:
        if self.local:
            return read_manifest(self.spec.removeprefix("file://"))
        url = self.url(MANIFEST_NAME)
        data = read_url(url, what=f"the manifest of {self.spec}")
        try:
            manifest = Manifest.from_dict(json.loads(data))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{url} is not a valid {MANIFEST_NAME} ({error})") from None
        if self.names is not None:
            listed = [s.name for s in manifest.shards if s.num_records > 0]
            missing = sorted(set(listed) - set(self.names))
            unknown = sorted(set(self.names) - {s.name for s in manifest.shards})
            if missing or unknown:
                raise ValueError(f"the shard pattern {self.spec} does not match {url}: "
                                 + (f"{len(missing)} manifest shard(s) not in the pattern ({missing[:3]}) "
                                    if missing else "")
                                 + (f"{len(unknown)} name(s) not in the manifest ({unknown[:3]})" if unknown else ""))
        return manifest


def parse_source(spec: str | Path) -> ShardSource:
    text = str(spec).strip()
    if not text:
        raise ValueError("no shards given (data.train_shards is empty)")
    if not is_remote(text):
        return ShardSource(text)
    if FILE_PLACEHOLDER in text:
        return ShardSource(text, template=text)
    braces = _BRACES.search(text)
    if braces is not None:
        start = max(text.rfind(c, 0, braces.start()) for c in _NAME_STOP) + 1
        end = min([i for i in (text.find(c, braces.end()) for c in _NAME_STOP) if i >= 0] or [len(text)])
        names = tuple(braceexpand.braceexpand(text[start:end]))
        return ShardSource(text, template=text[:start] + FILE_PLACEHOLDER + text[end:], names=names)
    if text.startswith("pipe:"):
        raise ValueError(f"{text}: a pipe: shard source needs {FILE_PLACEHOLDER} where the file name goes "
                         f"(e.g. 'pipe:aws s3 cp s3://bucket/tokens/{FILE_PLACEHOLDER} -') or a brace pattern "
                         f"of the shard names (e.g. 'pipe:cat /data/tokens/shard-{{000000..000009}}.tar')")
    return ShardSource(text, template=text.rstrip("/") + "/" + FILE_PLACEHOLDER)


# -- reading through WebDataset's opener ---------------------------------------------------------------
def _child_status(stream) -> int | None:
    """Exit status of the process behind a gopen stream (a webdataset Pipe), None for a plain file."""
    process = getattr(stream, "proc", None)
    return None if process is None else process.wait()


def _close(stream, check: bool) -> int | None:
    """Close a gopen stream; the child's exit status (checked by the caller, not by Pipe.close)."""
    if hasattr(stream, "ignore_errors"):
        stream.ignore_errors = True  # we judge the status ourselves (a stream closed early ends with SIGPIPE)
    try:
        stream.close()
    except OSError:
        if check:
            raise
    return _child_status(stream)


def _failed(status: int | None) -> bool:
    return status not in (None, 0)


def read_url(url: str, what: str = "") -> bytes:
    """The whole content behind `url`, read with webdataset.gopen (FileNotFoundError if it cannot)."""
    try:
        stream = wds.gopen(url, "rb")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"cannot open {url}: {error} (http(s) URLs are read with curl)") from None
    raw = getattr(stream, "stream", stream)  # a Pipe's own stdout: read to the end, then look at the status
    data = raw.read()
    status = _close(stream, check=False)
    if _failed(status):
        raise FileNotFoundError(f"cannot read {what or url}: {url} failed (exit status {status})")
    return data


def iter_url_samples(url: str) -> Iterator[dict]:
    """WebDataset samples of the tar at `url`, streamed (gopen + WebDataset's tar iterator)."""
    try:
        stream = wds.gopen(url, "rb")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"cannot open {url}: {error} (http(s) URLs are read with curl)") from None
    complete = False
    try:
        for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
            yield sample
        complete = True
    except Exception as error:  # noqa: BLE001 -- re-raised with the child's status when it is the cause
        status = _close(stream, check=False)
        if _failed(status):
            raise OSError(f"{url}: reading the shard failed (exit status {status})") from error
        raise ValueError(f"{url}: not a readable tar stream ({error})") from error
    finally:
        if not complete:
            _close(stream, check=False)  # stopped early (the plan needed only part of the shard)
    status = _close(stream, check=True)
    if _failed(status):
        raise OSError(f"{url}: the shard stream ended with exit status {status}: it may be truncated")


def iter_shard_samples(url: str) -> Iterator[dict]:
    """Samples of one shard: the fast local reader for a path, WebDataset's streaming reader for a URL."""
    return iter_url_samples(url) if is_remote(url) else iter_tar_samples(url)


def read_shard_manifest(spec: str | Path) -> Manifest:
    """The manifest of a local shard folder or of shards at a URL (fetched like the shards)."""
    return parse_source(spec).read_manifest()
