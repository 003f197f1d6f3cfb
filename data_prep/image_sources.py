"""Inputs of `var-prep extract`: a deterministic, sorted list of (image location, label) items.

Three kinds of input, chosen by `detect_format` or `--input-format`:
- `imagefolder`: a folder with one subfolder per class (names sorted -> class ids 0..C-1, as
  torchvision's ImageFolder); images anywhere below each class folder.
- `list`: a `.csv` (`path,label` rows, header optional) or `.jsonl` (`{"path": ..., "label": ...}`)
  file; relative paths are relative to the list's folder; labels are all integers (class ids) or
  all names (sorted -> ids).
- `wds`: WebDataset tars of images with a `cls` member: one `.tar`, a folder of them, or a brace
  pattern (`shards/train-{0000..0127}.tar`). Members are read by offset, so any item can be
  fetched without scanning its tar again.
Files that are not images by extension are listed as skipped (with a reason), never silently lost;
so are symbolic-link loops and files reached twice (each real folder is walked once and each real
file listed once, by resolved path).

Each item has an `identity` that does not depend on how INPUT was typed or on the current directory
(resolved paths), so a resumed extraction recognises its inputs however the command spells them.
"""

from __future__ import annotations

import csv
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from var_train.data.images import IMAGE_EXTENSIONS, class_folders, is_image_file
from var_train.data.records import safe_key
from var_train.errors import ConfigError, MissingInputError

WDS_IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class SourceItem:
    key: str          # output record key: unique, WebDataset-safe, derived from `origin`
    label: int
    path: str         # file to read (the tar for `wds` inputs)
    origin: str       # human-readable location for reports
    offset: int = -1  # byte offset of the member inside `path` (wds inputs), -1 for whole files
    size: int = -1
    identity: str = ""  # the image's resolved location (file, or tar::member): what a resume compares

    def read_bytes(self) -> bytes:
        if self.offset < 0:
            with open(self.path, "rb") as f:
                return f.read()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass
class SourceList:
    items: list[SourceItem]
    class_names: list[str]
    skipped: list[dict] = field(default_factory=list)   # {"source", "reason"} found while listing
    description: dict = field(default_factory=dict)


def detect_format(source: str) -> str:
    path = Path(source)
    if path.suffix.lower() in (".csv", ".jsonl") and path.is_file():
        return "list"
    if path.suffix == ".tar" or "{" in source:
        return "wds"
    if path.is_dir():
        entries = list(path.iterdir())
        if any(e.suffix == ".tar" and e.is_file() for e in entries) and not any(e.is_dir() for e in entries):
            return "wds"
        return "imagefolder"
    raise MissingInputError(f"input not found or not understood: {source} (expected an ImageFolder directory, "
                            f"a .csv/.jsonl list, or WebDataset .tar files)")


def _with_keys(entries: list[tuple[str, int, str, str, int, int, str]]) -> list[SourceItem]:
    """Entries (relative name, label, path, origin, offset, size, identity) in final order -> items with keys.

    The key starts with the item's position, so it is unique whatever the names contain.
    """
    return [SourceItem(key=safe_key(f"{index:08d}_{os.path.splitext(name)[0]}", max_length=80),
                       label=label, path=path, origin=origin, offset=offset, size=size, identity=identity)
            for index, (name, label, path, origin, offset, size, identity) in enumerate(entries)]


def _walk_class_folders(root: Path, class_dirs: list[Path]) -> tuple[list[tuple[str, int, bool]], list[dict]]:
    """Every file under the class folders once: -> ([(path, label, reached through a link)], skipped).

    Real folders are walked first; symbolic links to folders are followed afterwards, each real
    folder at most once (by resolved path), so `a/uplink -> ..` neither loops nor re-lists another
    class's images under the wrong label: a link to a folder above it is reported as a loop, a link
    to a folder already listed as a duplicate. Broken links are reported too.
    """
    real_root = os.path.realpath(root)
    seen = {real_root: str(root)}
    seen.update({os.path.realpath(d): str(d) for d in class_dirs})
    files, skipped = [], []
    pending_links = []  # (link path, label, real paths of the folders above it)

    def visit(folder: str, label: int, ancestors: frozenset, via_link: bool) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            skipped.append({"source": folder, "reason": f"cannot list folder: {error.strerror or error}"})
            return
        for entry in entries:
            path = os.path.join(folder, entry.name)
            try:
                is_link, is_dir, is_file = entry.is_symlink(), entry.is_dir(), entry.is_file()
            except OSError:
                is_link, is_dir, is_file = True, False, False
            if is_dir and is_link:
                pending_links.append((path, label, ancestors))
            elif is_dir:
                real = os.path.realpath(path)
                seen.setdefault(real, path)
                visit(path, label, ancestors | {real}, via_link)
            elif is_file:
                files.append((path, label, via_link or is_link))
            elif is_link:
                skipped.append({"source": path, "reason": "broken symbolic link"})

    for label, class_dir in enumerate(class_dirs):
        visit(str(class_dir), label, frozenset({real_root, os.path.realpath(class_dir)}), False)
    while pending_links:
        path, label, ancestors = pending_links.pop(0)
        real = os.path.realpath(path)
        if real in ancestors:
            skipped.append({"source": path, "reason": f"symlink loop: points to {real}, a folder above it (not followed)"})
        elif real in seen:
            skipped.append({"source": path, "reason": f"duplicate folder: same as {seen[real]} (listed once)"})
        else:
            seen[real] = path
            visit(path, label, ancestors | {real}, True)
    return files, skipped


def list_image_folder(root: str | Path) -> SourceList:
    root = Path(root)
    class_dirs = class_folders(root)
    entries, skipped = [], []
    for loose in sorted(p for p in root.iterdir() if p.is_file()):
        skipped.append({"source": str(loose), "reason": "file outside any class folder"})
    files, walk_skipped = _walk_class_folders(root, class_dirs)
    skipped += walk_skipped
    # Files once by resolved path: a file reached directly wins over one reached through a link.
    first_by_real: dict[str, str] = {}
    for path, label, via_link in sorted(files, key=lambda f: (f[2], f[1], f[0])):
        if not is_image_file(path):
            skipped.append({"source": path, "reason": "not an image file extension"})
            continue
        real = os.path.realpath(path)
        if real in first_by_real:
            skipped.append({"source": path, "reason": f"duplicate file: same as {first_by_real[real]} (listed once)"})
            continue
        first_by_real[real] = path
        entries.append((os.path.relpath(path, root), label, path, path, -1, -1, real))
    entries.sort(key=lambda e: (e[1], e[0]))
    return SourceList(_with_keys(entries), [d.name for d in class_dirs], skipped,
                      {"format": "imagefolder", "root": os.path.realpath(root)})


def _labels_to_ids(raw_labels: list[str], num_classes: int | None) -> tuple[list[int], list[str]]:
    if all(label.strip().lstrip("-").isdigit() for label in raw_labels):
        ids = [int(label) for label in raw_labels]
        count = num_classes or (max(ids) + 1 if ids else 0)
        if ids and (min(ids) < 0 or max(ids) >= count):
            raise ConfigError(f"class ids must lie in [0, {count}), found {min(ids)}..{max(ids)}")
        return ids, [str(i) for i in range(count)]
    names = sorted(set(label.strip() for label in raw_labels))
    index = {name: i for i, name in enumerate(names)}
    return [index[label.strip()] for label in raw_labels], names


def list_from_file(list_path: str | Path, num_classes: int | None = None) -> SourceList:
    list_path = Path(list_path)
    rows: list[tuple[str, str]] = []
    if list_path.suffix.lower() == ".jsonl":
        for number, line in enumerate(list_path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    rows.append((str(row["path"]), str(row["label"])))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConfigError(f"{list_path}:{number}: expected {{\"path\": ..., \"label\": ...}} ({e})") from None
    else:
        with open(list_path, newline="") as f:
            for number, row in enumerate(csv.reader(f), 1):
                if not row or not "".join(row).strip():
                    continue
                if len(row) < 2:
                    raise ConfigError(f"{list_path}:{number}: expected 'path,label', got {row}")
                if number == 1 and row[0].strip().lower() == "path":
                    continue  # header
                rows.append((row[0].strip(), row[1].strip()))
    ids, class_names = _labels_to_ids([label for _, label in rows], num_classes)
    base = list_path.parent
    # Identities from the list's resolved folder, not one realpath per row (a list may name a million
    # files on a network file system): a relative row is relative to that folder, an absolute one is
    # as written, so neither depends on how the list was named or on the current directory.
    real_base = os.path.realpath(base)
    entries = []
    for (path, _), label in zip(rows, ids):
        full = path if os.path.isabs(path) else str(base / path)
        entries.append((path, label, full, full, -1, -1, os.path.normpath(os.path.join(real_base, path))))
    return SourceList(_with_keys(entries), class_names, [], {"format": "list", "list": os.path.realpath(list_path)})


def _expand_tars(source: str) -> list[str]:
    import braceexpand

    path = Path(source)
    if path.is_dir():
        return sorted(str(p) for p in path.glob("*.tar"))
    return sorted(braceexpand.braceexpand(source))


def list_webdataset(source: str, num_classes: int | None = None) -> SourceList:
    entries, raw_labels, skipped = [], [], []
    tars = _expand_tars(source)
    if not tars:
        raise MissingInputError(f"no .tar files found for {source}")
    for tar_path in tars:
        if not os.path.isfile(tar_path):
            raise MissingInputError(f"input tar not found: {tar_path}")
        samples: dict[str, dict] = {}
        order: list[str] = []
        try:
            with tarfile.open(tar_path, "r:") as archive:
                for member in archive:
                    if not member.isreg():
                        continue
                    base = os.path.basename(member.name)
                    if "." not in base:
                        continue
                    key = member.name[:len(member.name) - len(base) + base.index(".")]
                    ext = base[base.index(".") + 1:].lower()
                    if key not in samples:
                        samples[key] = {}
                        order.append(key)
                    if ext == "cls":
                        samples[key]["cls"] = archive.extractfile(member).read().decode().strip()
                    else:
                        samples[key][ext] = (member.offset_data, member.size)
        except (tarfile.TarError, OSError) as e:
            skipped.append({"source": tar_path, "reason": f"unreadable tar after {len(order)} samples: {e}"})
        real_tar = os.path.realpath(tar_path)
        for key in order:
            sample, origin = samples[key], f"{tar_path}::{key}"
            image_ext = next((e for e in WDS_IMAGE_EXTENSIONS if e in sample), None)
            if image_ext is None or "cls" not in sample:
                skipped.append({"source": origin, "reason": "sample without an image member" if image_ext is None
                                else "sample without a cls member"})
                continue
            offset, size = sample[image_ext]
            entries.append((f"{Path(tar_path).stem}_{key}", 0, tar_path, origin, offset, size, f"{real_tar}::{key}"))
            raw_labels.append(sample["cls"])
    ids, class_names = _labels_to_ids(raw_labels, num_classes)
    entries = [(name, label, *rest) for (name, _, *rest), label in zip(entries, ids)]
    return SourceList(_with_keys(entries), class_names, skipped, {"format": "wds", "tars": len(tars)})


def list_sources(source: str, input_format: str = "auto", num_classes: int | None = None) -> SourceList:
    input_format = detect_format(source) if input_format == "auto" else input_format
    if input_format == "imagefolder":
        sources = list_image_folder(source)
    elif input_format == "list":
        sources = list_from_file(source, num_classes)
    elif input_format == "wds":
        sources = list_webdataset(source, num_classes)
    else:
        raise ConfigError(f"unknown input format {input_format!r} (auto, imagefolder, list, wds)")
    if num_classes is not None and num_classes < len(sources.class_names):
        raise ConfigError(f"--num-classes {num_classes} is smaller than the {len(sources.class_names)} classes found")
    if num_classes is not None and num_classes > len(sources.class_names):
        sources.class_names += [str(i) for i in range(len(sources.class_names), num_classes)]
    return sources
