"""Token shards -> batches of token ids per scale, identical batch counts on every rank, exact resume.

How an epoch is planned (all ranks compute the same plan from the manifest, no communication):
1. the shards are put in a per-epoch order (a permutation seeded by `seed` and the epoch);
2. their records, read in that order, form one virtual stream; rank r takes the contiguous
   slice [r * P, (r + 1) * P) with P = batches_per_epoch * batch_size, so every rank gets
   exactly `batches_per_epoch` batches and the remainder (< world_size * batch_size records,
   a different one each epoch) is dropped;
3. a rank's slice is cut into contiguous pieces, one per DataLoader worker, each a whole number
   of batches; a piece is a list of (shard, first record, record count) ranges;
4. each worker streams its ranges with WebDataset, shuffles them in a seeded buffer, batches in
   numpy and hands (tokens, labels) tensors to the DataLoader, which returns the workers' batches
   round-robin in worker order (on resume the plan is rotated so the worker that was next comes
   first). Shards mix all classes because `var-prep extract` writes images in a seeded random order.
Everything is a pure function of (seed, epoch, rank, world_size, num_workers, batch_size), so a
restart that skips the batches already consumed sees exactly the batches it would have seen.
In `resampled` mode each worker instead draws shards at random (with replacement, seeded per
epoch/rank/worker): the same batch counts and resume, no per-epoch coverage guarantee.
Which flip/crop variant a record contributes is a hash of (seed, epoch, key): no RNG state.
The shards are a local folder (read by tar_reader.py) or a URL of one (http(s), pipe:, brace
patterns: sources.py, through WebDataset's opener); the plan, the resume and the checks are the same.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import signal
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from var_train.errors import MissingInputError

from .manifest import Manifest, check_shard_sizes
from .sources import ShardSource, iter_shard_samples, parse_source
from .records import CLASS_EXT, TOKENS_EXT, TOKENS_FLIP_EXT, CorruptRecordError, decode_tokens

logger = logging.getLogger(__name__)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """`worker_init_fn` of every DataLoader in the project: only the main process decides to stop.

    Slurm signals every process of a job step (SIGTERM on preemption or scancel, the job's
    warning signal); a torch worker dies of a SIGTERM its parent did not send, which the main
    process sees as a crash ("DataLoader worker ... killed by signal") before it can checkpoint.
    So SIGUSR1 and SIGINT are ignored, and SIGTERM is taken by a thread that drops it unless the
    parent sent it: the parent still stops its workers that way (multiprocessing at exit), as
    torch's own handler allows. A worker also exits by itself once its parent is gone.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])  # in this thread and those it starts
    threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), name="sigterm-from-parent",
                     daemon=True).start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1, signal.SIGINT])  # see stop_signals_blocked


def _exit_on_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo([signal.SIGTERM]).si_pid == parent:
            os._exit(0)


@contextlib.contextmanager
def stop_signals_blocked():
    """Start DataLoader workers inside this: a forked worker inherits the blocked signals, so a stop
    signal that arrives before its `ignore_stop_signals` runs waits and is then discarded, instead of
    killing it (a new epoch forks new workers, at any moment of a preemption). Signals that reach
    the main process meanwhile are delivered when the block ends; none is lost."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass
class TokenBatch:
    tokens_per_scale: list[torch.Tensor]   # K x (B, pn * pn) int64 (views into `tokens` when it is set)
    labels: torch.Tensor                   # (B,) int64
    tokens: torch.Tensor | None = None     # (B, L) all scales, so `.to` makes one (pinned) copy, not K

    def to(self, device, non_blocking: bool = True) -> "TokenBatch":
        labels = self.labels.to(device, non_blocking=non_blocking)
        if self.tokens is None:
            return TokenBatch([t.to(device, non_blocking=non_blocking) for t in self.tokens_per_scale], labels)
        tokens = self.tokens.to(device, non_blocking=non_blocking)
        sizes = [t.shape[1] for t in self.tokens_per_scale]
        return TokenBatch(list(torch.split(tokens, sizes, dim=1)), labels, tokens)

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass(frozen=True)
class ShardRange:
    url: str
    start: int       # first record (in file order) to take
    count: int


# -- planning (pure functions) -------------------------------------------------------------------
def _seed_words(*values: int) -> list[int]:
    return [int(v) & 0xFFFFFFFF for v in values]


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` items into `parts` counts differing by at most one, larger ones first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def ranges_of_stream(shards: Sequence[tuple[str, int]], begin: int, end: int) -> list[ShardRange]:
    """Records [begin, end) of the stream made by reading `shards` (url, count) in order."""
    ranges, offset = [], 0
    for url, count in shards:
        lo, hi = max(begin, offset), min(end, offset + count)
        if lo < hi:
            ranges.append(ShardRange(url, lo - offset, hi - lo))
        offset += count
        if offset >= end:
            break
    return ranges


def plan_worker_ranges(shards: Sequence[tuple[str, int]], *, epoch: int, seed: int, rank: int,
                       world_size: int, num_workers: int, batch_size: int, batches_per_epoch: int,
                       resampled: bool) -> list[list[ShardRange]]:
    """For each worker of `rank`, the record ranges it reads in `epoch` (a whole number of batches)."""
    worker_batches = split_evenly(batches_per_epoch, num_workers)
    if resampled:
        plans = []
        weights = np.array([count for _, count in shards], dtype=np.float64)
        weights /= weights.sum()
        for worker, batches in enumerate(worker_batches):
            rng = np.random.default_rng(_seed_words(seed, epoch, rank, worker, 0x5E5A))
            needed, ranges = batches * batch_size, []
            while needed > 0:
                url, count = shards[int(rng.choice(len(shards), p=weights))]
                take = min(count, needed)
                ranges.append(ShardRange(url, 0, take))
                needed -= take
            plans.append(ranges)
        return plans
    order = np.random.default_rng(_seed_words(seed, epoch)).permutation(len(shards))
    ordered = [shards[i] for i in order]
    begin = rank * batches_per_epoch * batch_size
    plans = []
    for batches in worker_batches:
        end = begin + batches * batch_size
        plans.append(ranges_of_stream(ordered, begin, end))
        begin = end
    return plans


def resume_position(worker_batches: Sequence[int], consumed: int) -> tuple[list[int], int]:
    """After `consumed` batches of an epoch: (batches each worker had delivered, worker delivering next).

    The DataLoader returns batches round-robin over its workers in order, skipping exhausted ones,
    so the epoch's sequence is (worker 0, batch 0), (worker 1, batch 0), ..., (worker 0, batch 1), ...
    over the workers that still have a batch. A resumed DataLoader starts again at its worker 0,
    so the loader rotates the plan to make the worker that was next its worker 0.
    """
    delivered, position = [0] * len(worker_batches), 0
    sequence = [w for batch_round in range(max(worker_batches, default=0))
                for w, batches in enumerate(worker_batches) if batch_round < batches]
    for worker in sequence[:consumed]:
        delivered[worker] += 1
    if consumed < len(sequence):
        position = sequence[consumed]
    return delivered, position


# -- the per-worker stream -------------------------------------------------------------------------
def _read_ranges(ranges: Sequence[ShardRange]) -> Iterator[dict]:
    for shard in ranges:
        samples = iter_shard_samples(shard.url)  # a local path: fast reader; a URL: WebDataset's gopen
        taken = 0
        try:
            for sample in itertools.islice(samples, shard.start, shard.start + shard.count):
                taken += 1
                yield sample
        finally:
            samples.close()  # a streamed shard's connection or pipe is closed as soon as its range is read
        if taken != shard.count:
            raise CorruptRecordError(shard.url, "<end of shard>",
                                     f"shard holds fewer records than its manifest entry "
                                     f"(needed records {shard.start}..{shard.start + shard.count - 1})")


class _EpochStream(IterableDataset):
    """One epoch of one rank; each DataLoader worker iterates its own piece of the plan."""

    def __init__(self, assignments: list[tuple[int, list[ShardRange], int]], *, batch_size: int,
                 num_tokens: int, vocab_size: int, num_classes: int, seed: int, epoch: int, rank: int,
                 shuffle_buffer: int, variants: int, flip_variants: int):
        super().__init__()
        self.assignments = assignments  # per DataLoader worker: (plan worker id, its ranges, batches to skip)
        self.batch_size, self.num_tokens = batch_size, num_tokens
        self.vocab_size, self.num_classes = vocab_size, num_classes
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.shuffle_buffer, self.variants, self.flip_variants = shuffle_buffer, variants, flip_variants
        self.variant_salt = zlib.crc32(f"{seed}:{epoch}".encode())

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != len(self.assignments):
            raise RuntimeError(f"planned for {len(self.assignments)} workers, running with {info.num_workers}")
        plan_worker, ranges, skip = self.assignments[worker]
        stages = [lambda: _read_ranges(ranges)]
        if self.shuffle_buffer > 1:
            seed = np.random.SeedSequence(_seed_words(self.seed, self.epoch, self.rank, plan_worker)).generate_state(1)[0]
            rng = random.Random(int(seed))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        if skip:
            stages.append(lambda source: itertools.islice(source, skip * self.batch_size, None))
        stages.append(wds.batched(self.batch_size, collation_fn=self._collate, partial=False))
        return iter(wds.DataPipeline(*stages))

    def _collate(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        rows, labels = [], np.empty(len(samples), dtype=np.int64)
        for i, sample in enumerate(samples):
            try:
                variant = (zlib.crc32(sample["__key__"].encode(), self.variant_salt) % self.variants
                           if self.variants > 1 else 0)
                crop, flipped = divmod(variant, self.flip_variants)
                array = decode_tokens(sample[TOKENS_FLIP_EXT if flipped else TOKENS_EXT])
                row = array[crop] if array.ndim == 2 else array
                if row.shape[0] != self.num_tokens:
                    raise ValueError(f"{row.shape[0]} tokens, expected {self.num_tokens}")
                rows.append(row)
                labels[i] = int(sample[CLASS_EXT])
            except (KeyError, ValueError, IndexError) as e:
                raise self._corrupt(sample, f"missing member {e.args[0]!r}" if isinstance(e, KeyError) else str(e))
        tokens = np.stack(rows)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            bad = int(np.flatnonzero((labels < 0) | (labels >= self.num_classes))[0])
            raise self._corrupt(samples[bad], f"class {labels[bad]} outside [0, {self.num_classes})")
        if tokens.max() >= self.vocab_size:
            bad = int(np.flatnonzero(tokens.max(axis=1) >= self.vocab_size)[0])
            raise self._corrupt(samples[bad], f"token id {tokens[bad].max()} >= vocab_size {self.vocab_size}")
        # uint16 crosses the worker boundary (4x less shared memory than int64); widened in the loader.
        return torch.from_numpy(tokens), torch.from_numpy(labels)

    @staticmethod
    def _corrupt(sample: dict, reason: str) -> CorruptRecordError:
        return CorruptRecordError(sample.get("__url__", "<unknown shard>"), sample.get("__key__", "<no key>"), reason)


# -- the loader ------------------------------------------------------------------------------------
class TokenLoader:
    """Iterating yields the rest of the current epoch as TokenBatch, then advances `epoch`."""

    def __init__(self, shards_dir: str | Path, manifest: Manifest, *, batch_size: int, rank: int,
                 world_size: int, num_workers: int = 2, seed: int = 0, shuffle_buffer: int = 2000,
                 resampled: bool = False, use_flip: bool = True, pin_memory: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        # A local folder or a URL (sources.py); the plan, resume and checks do not depend on which.
        self.source = shards_dir if isinstance(shards_dir, ShardSource) else parse_source(shards_dir)
        self.shards_dir, self.manifest = self.source.spec, manifest
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.shuffle_buffer = num_workers, seed, shuffle_buffer
        self.resampled = resampled
        self.pin_memory = pin_memory and torch.cuda.is_available()
        if pin_memory and not self.pin_memory:
            logger.warning("pin_memory requested but no CUDA device is available; batches are not pinned")
        self.flip_variants = 2 if (use_flip and manifest.has_flip) else 1
        self.shards = [(self.source.url(s.name), s.num_records) for s in manifest.shards if s.num_records > 0]
        missing = [url for url, _ in self.shards if self.source.local and not Path(url).is_file()]
        if missing:
            raise MissingInputError(f"{len(missing)} shard(s) listed in the manifest are missing: {missing[:5]}; "
                                    f"run the same `var-prep extract` command again to redo them")
        if self.source.local:  # every shard's size at start: a truncated one fails now, not at step 80
            check_shard_sizes(self.source.spec, manifest)
        self.batches_per_epoch = manifest.num_records // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{manifest.num_records} records are fewer than one batch per rank "
                             f"(world_size {world_size} x batch_size {batch_size})")
        self.split_sizes = [pn * pn for pn in manifest.patch_nums]
        self.epoch, self.batches_consumed = 0, 0

    def __len__(self) -> int:
        return self.batches_per_epoch - self.batches_consumed

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed,
                "world_size": self.world_size, "batch_size": self.batch_size, "num_workers": self.num_workers}

    def load_state_dict(self, state: dict) -> None:
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        saved = {k: state[k] for k in ("world_size", "batch_size", "num_workers") if k in state}
        current = {"world_size": self.world_size, "batch_size": self.batch_size, "num_workers": self.num_workers}
        if any(saved[k] != current[k] for k in saved):
            # Not the same layout: keep the epoch and the number of samples seen, not the exact order.
            seen = consumed * saved.get("world_size", self.world_size) * saved.get("batch_size", self.batch_size)
            consumed = min(seen // (self.world_size * self.batch_size), self.batches_per_epoch)
            logger.warning("token loader resumed with %s instead of %s: the position is kept by samples seen, "
                           "the batch order differs from the interrupted run", current, saved)
        if not 0 <= consumed <= self.batches_per_epoch:
            raise ValueError(f"batches_consumed {consumed} outside this epoch's {self.batches_per_epoch} batches")
        self.epoch, self.batches_consumed = epoch, consumed
        if consumed == self.batches_per_epoch:
            self.epoch, self.batches_consumed = epoch + 1, 0

    def _epoch_stream(self) -> _EpochStream:
        workers = max(1, self.num_workers)
        plans = plan_worker_ranges(self.shards, epoch=self.epoch, seed=self.seed, rank=self.rank,
                                   world_size=self.world_size, num_workers=workers, batch_size=self.batch_size,
                                   batches_per_epoch=self.batches_per_epoch, resampled=self.resampled)
        delivered, next_worker = resume_position(split_evenly(self.batches_per_epoch, workers), self.batches_consumed)
        order = [(next_worker + i) % workers for i in range(workers)]
        return _EpochStream([(w, plans[w], delivered[w]) for w in order], batch_size=self.batch_size, num_tokens=self.manifest.num_tokens,
                            vocab_size=self.manifest.vocab_size, num_classes=self.manifest.num_classes,
                            seed=self.seed, epoch=self.epoch, rank=self.rank, shuffle_buffer=self.shuffle_buffer,
                            variants=self.manifest.num_crops * self.flip_variants, flip_variants=self.flip_variants)

    def __iter__(self) -> Iterator[TokenBatch]:
        if self.batches_consumed < self.batches_per_epoch:
            # Our own generator for the DataLoader's base seed: iterating never draws from (and so never
            # shifts) the global torch RNG that the training step's dropout and sampling use.
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence(
                _seed_words(self.seed, self.epoch, self.rank)).generate_state(1)[0]))
            loader = DataLoader(self._epoch_stream(), batch_size=None, shuffle=False,
                                num_workers=self.num_workers, persistent_workers=False,
                                prefetch_factor=4 if self.num_workers else None, generator=generator,
                                worker_init_fn=ignore_stop_signals)
            with stop_signals_blocked():  # the workers start here: no window before ignore_stop_signals
                batches = iter(loader)
            for tokens, labels in batches:
                tokens = torch.from_numpy(tokens.numpy().astype(np.int64))  # numpy widens ~10x faster than torch
                if self.pin_memory:
                    tokens, labels = tokens.pin_memory(), labels.pin_memory()
                # Counted before it is handed out: a checkpoint taken after using this batch resumes after it.
                self.batches_consumed += 1
                yield TokenBatch(list(torch.split(tokens, self.split_sizes, dim=1)), labels, tokens)
        if self.batches_consumed != self.batches_per_epoch:
            raise RuntimeError(f"epoch {self.epoch} ended after {self.batches_consumed} of {self.batches_per_epoch} "
                               f"batches on rank {self.rank}: the shards hold fewer records than the manifest says")
        self.epoch, self.batches_consumed = self.epoch + 1, 0


def build_token_loader(shards_dir: str | Path, *, batch_size: int, patch_nums, vocab_size: int, num_classes: int,
                       rank: int, world_size: int, num_workers: int = 2, seed: int = 0, shuffle_buffer: int = 2000,
                       resampled: bool = False, use_flip: bool = True, pin_memory: bool = False) -> TokenLoader:
    """A TokenLoader over `shards_dir` after checking its manifest against the model (ValueError if not)."""
    source = parse_source(shards_dir)
    manifest = source.read_manifest()  # a URL's manifest.json is fetched like its shards
    manifest.check_compatible(patch_nums, vocab_size, num_classes)
    return TokenLoader(source, manifest, batch_size=batch_size, rank=rank, world_size=world_size,
                       num_workers=num_workers, seed=seed, shuffle_buffer=shuffle_buffer, resampled=resampled,
                       use_flip=use_flip, pin_memory=pin_memory)
