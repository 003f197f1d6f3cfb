"""Cost of checkpoint integrity at d16 size on this machine: the checksums written with every
checkpoint and verified on resume/export, against the time the save itself takes.

Builds a VAR d16 (310M parameters) with AdamW state (exp_avg, exp_avg_sq: what a training
checkpoint holds), writes it with torch.distributed.checkpoint exactly as the engines do on one
process (`state/` of a step folder), then times, side by side in one run:
  save     dcp.save of {"model", "optimizer"} (+ fsync of the files, as the checkpointer does)
  xxh3     var_train.checksums.hash_files over every file written (what every save adds), and
           verify_folder (what resume / export / `var-train verify` add)
  sha256   the same pass with hashlib.sha256, for the choice of hash
and, for an exported .safetensors of the same model (`--part export` alone):
  write    checkpoint_io.save_model (digest of the tensors included)
  digest   checksums.tensors_digest alone (what a write and every read add)
  read     checkpoint_io.read_checkpoint (the digest checked; safetensors maps the file lazily, so
           the digest is what first touches the bytes), and load_var (model built and loaded)
Each figure is the median of --repeats runs. The files are hashed right after being written
(from the page cache), as in training.

  PYTHONPATH=. python benchmarks/bench_checkpoint_integrity.py --depth 16 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks.common import machine
from var_train.checksums import ALGORITHM, hash_files, list_files, tensors_digest, verify_folder, write_checksums
from var_train.models import VAR
from var_train.models.checkpoint_io import load_var, read_checkpoint, save_model


def build_state(depth: int):
    model = VAR(depth=depth)  # the paper's 256px d16: vocab 4096, 1000 classes
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # materialises exp_avg / exp_avg_sq
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return model, {"model": model_state, "optimizer": optimizer_state}, sum(p.numel() for p in model.parameters())


def sha256_files(folder: Path, names: list[str]) -> None:
    for name in names:
        digest = hashlib.sha256()
        with open(folder / name, "rb") as handle:
            while block := handle.read(4 << 20):
                digest.update(block)
        digest.hexdigest()


def fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--part", choices=["all", "checkpoint", "export"], default="all")
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    model, state, params = build_state(args.depth)
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir))
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}")
    try:
        if args.part in ("all", "checkpoint"):
            time_checkpoint(state, params, root, args)
        if args.part in ("all", "export"):
            time_export(model, params, root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def time_export(model, params: int, root: Path, args) -> None:
    path = root / "var.safetensors"
    rows = {"write": [], "digest": [], "read": [], "load_var": []}
    for _ in range(args.repeats):
        for key, work in (("write", lambda: save_model(model, path)), ("digest", lambda: tensors_digest(model.state_dict())),
                          ("read", lambda: read_checkpoint(path)), ("load_var", lambda: load_var(path))):
            start = time.perf_counter()
            work()
            rows[key].append(time.perf_counter() - start)
    median = {k: sorted(v)[len(v) // 2] for k, v in rows.items()}
    size = path.stat().st_size
    print(f"VAR d{args.depth} exported: {params / 1e6:.0f}M parameters, {size / 2**30:.2f} GiB .safetensors; "
          f"median of {args.repeats}")
    print(f"write (save_model, digest included)     {median['write']:7.2f} s")
    print(f"read (read_checkpoint, digest checked)  {median['read']:7.2f} s")
    print(f"load_var (model built, weights loaded)  {median['load_var']:7.2f} s")
    print(f"tensors_digest alone                    {median['digest']:7.2f} s  = "
          f"{100 * median['digest'] / median['write']:5.1f}% of the write, "
          f"{100 * median['digest'] / median['load_var']:5.1f}% of load_var  ({size / 2**20 / median['digest']:.0f} MiB/s)")


def time_checkpoint(state, params: int, root: Path, args) -> None:
    import torch.distributed.checkpoint as dcp

    rows = {"save": [], "xxh3": [], "verify": [], "sha256": []}
    size = 0
    for repeat in range(args.repeats):
        folder = root / f"step-{repeat}"
        start = time.perf_counter()
        dcp.save(state, checkpoint_id=str(folder / "state"))
        fsync_tree(folder)
        rows["save"].append(time.perf_counter() - start)
        names = list_files(folder)
        size = sum((folder / n).stat().st_size for n in names)
        start = time.perf_counter()
        write_checksums(folder, hash_files(folder, names))
        rows["xxh3"].append(time.perf_counter() - start)
        start = time.perf_counter()
        assert verify_folder(folder) == []
        rows["verify"].append(time.perf_counter() - start)
        start = time.perf_counter()
        sha256_files(folder, names)
        rows["sha256"].append(time.perf_counter() - start)
        shutil.rmtree(folder)
    median = {k: sorted(v)[len(v) // 2] for k, v in rows.items()}
    print(f"VAR d{args.depth}: {params / 1e6:.0f}M parameters; checkpoint (model + AdamW) {size / 2**30:.2f} GiB "
          f"in {len(names)} files; median of {args.repeats}")
    save = median["save"]
    print(f"save (dcp.save + fsync)                 {save:7.2f} s")
    for key, label in (("xxh3", f"checksums {ALGORITHM} (every save)"), ("verify", f"verify {ALGORITHM} (resume/export)"),
                       ("sha256", "sha256 of the same files")):
        print(f"{label:<40s}{median[key]:7.2f} s  = {100 * median[key] / save:5.1f}% of the save"
              f"  ({size / 2**20 / median[key]:.0f} MiB/s)")


if __name__ == "__main__":
    main()
