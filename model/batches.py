"""The batch pipeline: raw rows -> encoded tensors, streamed in bounded chunks.

The training file is read `train.read_rows` rows at a time (rows shuffled within each chunk when
`train.shuffle`), and batches of exactly `train.batch_size` rows are cut across chunk
boundaries, so the chunk size changes neither the validation split nor (without shuffling) the
batches. Validation rows are held out by a hash of their row number and the seed.

Under DDP every process takes its share of each batch (`BatchStream(world=, rank=)`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from mmoe.model.config import RunConfig, TaskConfig
from mmoe.model.data import DataSource
from mmoe.model.schema import FeatureSchema, numeric_values


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]  # per task; NaN = missing
    weights: dict[str, torch.Tensor]  # per task loss weight; 0 = not in this task's loss
    # per task: the label is present and the row is in the task's space (`only_where`); the
    # rows its metrics are computed on
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return Batch(
            {k: fn(v) for k, v in self.inputs.items()},
            {k: fn(v) for k, v in self.labels.items()},
            {k: fn(v) for k, v in self.weights.items()},
            {k: fn(v) for k, v in self.masks.items()},
        )

    def take(self, idx: torch.Tensor) -> Batch:
        return self._map(lambda v: v[idx])

    def slice(self, start: int, stop: int) -> Batch:
        return self._map(lambda v: v[start:stop])

    @staticmethod
    def concat(parts: list[Batch]) -> Batch:
        def cat(get: Callable[[Batch], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
            return {k: torch.cat([get(p)[k] for p in parts]) for k in get(parts[0])}

        if len(parts) == 1:
            return parts[0]
        return Batch(
            cat(lambda b: b.inputs),
            cat(lambda b: b.labels),
            cat(lambda b: b.weights),
            cat(lambda b: b.masks),
        )


def encode_table(
    table: pa.Table, schema: FeatureSchema, tasks: list[TaskConfig], with_labels: bool = True
) -> Batch:
    """Raw rows -> tensors: encoded features, labels, per-task loss weights and metric masks."""
    inputs = {k: torch.from_numpy(v) for k, v in schema.encode(table).items()}
    labels: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    if with_labels:
        for t in tasks:
            y = numeric_values(table.column(t.label))
            present = ~np.isnan(y)
            if t.kind == "binary" and not np.isin(y[present], (0.0, 1.0)).all():
                raise ValueError(f"task {t.name!r}: label column {t.label!r} must hold 0/1")
            if t.kind == "multiclass":
                assert t.num_class is not None
                ok = (y[present] == np.round(y[present])) & (y[present] >= 0)
                if not (ok & (y[present] < t.num_class)).all():
                    raise ValueError(
                        f"task {t.name!r}: label column {t.label!r} must hold class ids "
                        f"0..{t.num_class - 1}"
                    )
            if t.kind == "regression" and not np.isfinite(y[present]).all():
                raise ValueError(f"task {t.name!r}: label column {t.label!r} has inf values")
            in_task = present.copy()
            for col, value in t.only_where.items():
                in_task &= numeric_values(table.column(col)) == value
            w = in_task.astype(np.float32)
            if t.sample_weight:
                sw = numeric_values(table.column(t.sample_weight))
                if (sw[~np.isnan(sw)] < 0).any():
                    raise ValueError(
                        f"task {t.name!r}: sample_weight column {t.sample_weight!r} has "
                        "negative values"
                    )
                w *= np.nan_to_num(sw, nan=0.0).astype(np.float32)
            labels[t.name] = torch.from_numpy(y.astype(np.float32))
            weights[t.name] = torch.from_numpy(w)
            masks[t.name] = torch.from_numpy(in_task)
    return Batch(inputs, labels, weights, masks)


def held_out(seed: int, first_row: int, n: int, fraction: float) -> np.ndarray:
    """Whether each of rows first_row..first_row+n-1 of a file is a validation row: a hash of
    the row number and the seed (splitmix64), so the split does not depend on chunking."""
    if fraction <= 0:
        return np.zeros(n, dtype=bool)
    with np.errstate(over="ignore"):
        z = np.arange(first_row, first_row + n, dtype=np.uint64) + np.uint64(seed & (2**63 - 1))
        z = z * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


class BatchStream:
    """The training rows of a run, as batches per epoch, and its validation rows.

    Validation rows come from `valid_source` when given, else they are the training file's
    rows held out by `held_out` (train.valid_fraction).
    """

    def __init__(
        self,
        config: RunConfig,
        train_source: DataSource,
        valid_source: DataSource | None = None,
        world: int = 1,
        rank: int = 0,
    ) -> None:
        self.config = config
        self.train_source = train_source
        self.valid_source = valid_source
        self.world = world
        self.rank = rank
        # The training rows' chunks, encoded in file order, once the first epoch has read them
        # all within train.cache_mb (`cached`); later epochs then neither read nor encode.
        self._cache: list[Batch] = []
        self._cache_bytes = 0
        self.cached = False
        self.cache_overflowed = False

    @property
    def cache_mib(self) -> float:
        return self._cache_bytes / 2**20

    def _encoded_chunks(self, schema: FeatureSchema) -> Iterator[Batch]:
        """Every training chunk encoded whole: from memory when cached, else read (and kept,
        while the bound allows)."""
        if self.cached:
            yield from self._cache
            return
        limit = self.config.train.cache_mb * 2**20
        keep = limit > 0 and not self.cache_overflowed
        self._cache, self._cache_bytes = [], 0
        for chunk in self.chunks():
            data = encode_table(chunk, schema, self.config.tasks)
            if keep:
                self._cache_bytes += _nbytes(data)
                if self._cache_bytes > limit:
                    keep, self.cache_overflowed, self._cache = False, True, []
                else:
                    self._cache.append(data)
            yield data
        self.cached = keep

    def chunks(self, validation: bool = False) -> Iterator[pa.Table]:
        """The training file's training rows (or, with `validation`, its held-out rows)."""
        t = self.config.train
        fraction = 0.0 if self.valid_source is not None else t.valid_fraction
        first = 0
        for chunk in self.train_source.batches(t.read_rows):
            held = held_out(t.seed, first, chunk.num_rows, fraction)
            first += chunk.num_rows
            keep = held if validation else ~held
            if keep.all():
                yield chunk
            elif keep.any():
                yield chunk.filter(pa.array(keep))

    def valid_table(self) -> pa.Table | None:
        if self.valid_source is not None:
            parts = list(self.valid_source.batches(self.config.train.read_rows))
        else:
            parts = list(self.chunks(validation=True))
        return pa.concat_tables(parts) if parts else None

    def steps_per_epoch(self, rows: int) -> int:
        """Batches per epoch: a last partial batch that would give some process fewer than 2
        rows joins the batch before it (batch norm cannot train on one row); no row is dropped.
        An epoch smaller than that is one batch (none when it cannot give every process a row)."""
        full, last = divmod(rows, self.config.train.batch_size)
        if full == 0:
            return 1 if last >= self.world else 0
        return full + (1 if last >= 2 * self.world else 0)

    def epoch(self, schema: FeatureSchema, epoch: int, rows: int) -> Iterator[Batch]:
        """This process's share of each of the epoch's batches (all of it in one process).

        Row j of the epoch's row stream belongs to batch j // B (a tail too small to be a batch of
        its own, to the last batch: `steps_per_epoch`), and to process (its place in that batch) %
        world. Chunks are encoded whole and kept in memory (`train.cache_mb`); without
        a cache (0, or past the bound) each chunk is encoded on every epoch, only the rows this
        process needs. The batches are the same either way.
        """
        cfg = self.config
        size, world = cfg.train.batch_size, self.world
        steps = self.steps_per_epoch(rows)
        last = steps - 1  # the last batch takes a tail too small to stand alone
        pending: Batch | None = None
        pending_ids = np.zeros(0, dtype=np.int64)
        first = 0  # stream position of the chunk's first row
        cache = self.cached or (cfg.train.cache_mb > 0 and not self.cache_overflowed)
        chunks: Iterator[Batch | pa.Table] = (
            self._encoded_chunks(schema) if cache else self.chunks()
        )
        for i, chunk in enumerate(chunks):
            n = len(chunk) if isinstance(chunk, Batch) else chunk.num_rows
            if cfg.train.shuffle:
                order = np.random.default_rng([cfg.train.seed, epoch, i]).permutation(n)
            else:
                order = np.arange(n)
            pos = np.arange(first, first + n)
            first += n
            batch_of = np.minimum(pos // size, last)
            # the process of each row: its place in its batch, modulo the processes
            mine = ((pos - batch_of * size) % world == self.rank) & (steps > 0)
            if not mine.any():
                continue
            if isinstance(chunk, Batch):
                data = chunk.take(torch.from_numpy(order[mine]))
            else:
                data = encode_table(chunk.take(pa.array(order[mine])), schema, cfg.tasks)
            ids = batch_of[mine]
            if pending is not None:
                data = Batch.concat([pending, data])
                ids = np.concatenate([pending_ids, ids])
            # Batches whose rows have all been read; the rest waits for the next chunk.
            complete = int(np.searchsorted(ids, min(first // size, last)))
            yield from _split_by_id(data, ids[:complete])
            pending = data.slice(complete, len(data)) if complete < len(data) else None
            pending_ids = ids[complete:]
        if pending is not None:
            yield from _split_by_id(pending, pending_ids)


def _nbytes(batch: Batch) -> int:
    parts = (batch.inputs, batch.labels, batch.weights, batch.masks)
    return sum(t.nbytes for part in parts for t in part.values())


def _split_by_id(data: Batch, ids: np.ndarray) -> Iterator[Batch]:
    """Consecutive runs of equal batch ids -> one Batch each."""
    if len(ids) == 0:
        return
    starts = np.flatnonzero(np.diff(ids)) + 1
    bounds = [0, *starts.tolist(), len(ids)]
    for a, b in itertools.pairwise(bounds):
        yield data.slice(a, b)
