"""A Hugging Face ``datasets`` split read as a stream (``data.source=hf`` with ``data.streaming=true``): rows are read,
turned into a task's examples and encoded while training consumes them; nothing is downloaded or held whole.

    stream = open_stream(data, "train")                    # datasets.IterableDataset, images left undecoded
    items = ItemStream(stream, encode_rows, seed, shuffle_buffer, rank, world_size)
    ds = items.epoch(0)                                    # IterableDataset of encoded items; a DataLoader reads it
    ... state = items.state_dict()                         # the position after the last item yielded
    ds = items.epoch(0, state)                             # continues from there (a resumed run)

Pipeline of one epoch: the split's rows -> ``shuffle`` (``data.shuffle_buffer`` rows, seeded with ``seed``; its shard
order and buffer reshuffled by ``set_epoch``) -> ``split_dataset_by_node`` (this process's part) -> ``map`` of
``encode_rows`` over batches of rows (rows -> the task's examples by the same readers as the map-style ``hf`` source,
images decoded and checked, bad ones and unusable examples dropped and counted, the rest encoded).

Why ``datasets.distributed.split_dataset_by_node`` and not accelerate's dispatching: dispatching reads (and decodes
every image of) the whole stream in the first process and sends each rank its slice, and accelerate's iterable
sharding makes every rank read every row; with ``split_dataset_by_node``, when the split's shard (file) count is
divisible by the number of processes each process opens only its own shards (otherwise each reads every row and keeps
one in ``world_size``). The training loader is therefore not passed to ``accelerate.prepare``.

Resume: ``state_dict`` is ``datasets``' own (shard and row position through each step of the pipeline). It is exact
without shuffling (``shuffle_buffer=0``). With a shuffle buffer the shard order and the position in each shard are
restored, but the rows that sat in the buffer at the checkpoint are not (``datasets`` refills the buffer from where
reading stopped): the rest of that epoch misses up to ``shuffle_buffer`` rows per process, and its order differs from
an uninterrupted run's; every later epoch is the same as in an uninterrupted run.
"""
from __future__ import annotations

from typing import Callable

from mtcpeft.errors import MtcpeftError

from .hf import load_split, local_base
from .hf_tasks import hf_captions, hf_qa, hf_rows, hf_vqa
from .sources import hf_caption_source, hf_qa_source, hf_rows_source, hf_vqa_source, need

ROWS_PER_MAP = 64  # rows turned into examples and encoded at a time


class StreamingUnsupportedError(MtcpeftError, ValueError):
    """The task reads ``data.source=hf`` with a reader of its own, which cannot read a stream."""


# A stream's rows (as a small in-memory datasets.Dataset) -> (the task's examples, how many the reader dropped)
RowReader = Callable[[object], "tuple[list[dict], int]"]


def row_reader(task, data, split: str, key: str, base: str | None) -> RowReader:
    """The reader of the task's ``hf`` source applied to a batch of rows (:mod:`.hf_tasks`)."""
    source = task.sources.get("hf")
    keep_impossible = not (split == "train" and data.drop_impossible)

    def qa(ds):
        examples, report = hf_qa(ds, data.hf_columns, key, keep_impossible=keep_impossible)
        return examples, report.questions - report.kept

    readers = {hf_caption_source: lambda ds: (hf_captions(ds, data.hf_columns, key, base), 0),
               hf_vqa_source: lambda ds: (hf_vqa(ds, data.hf_columns, key, base), 0),
               hf_rows_source: lambda ds: (hf_rows(ds, data.hf_columns, key, base), 0), hf_qa_source: qa}
    if source not in readers:
        raise StreamingUnsupportedError(f"task {task.name!r} reads data.source=hf with its own reader, which cannot "
                                        "read a stream; set data.streaming=false, or give the task one of the readers "
                                        "of mtcpeft.data.sources (hf_caption_source, hf_qa_source, hf_vqa_source, "
                                        "hf_rows_source)")
    return readers[source]


def open_stream(data, split: str):
    """(the ``datasets.IterableDataset`` of ``split`` with image columns left undecoded, the key naming its rows in
    image references, the folder relative image paths start from)."""
    import datasets

    key = "hf_train_split" if split == "train" else "hf_val_split"
    path, name = need(data.hf_path, "data.hf_path"), getattr(data, key)
    stream = load_split(path, data.hf_name, name, key, streaming=True)
    for column, feature in (stream.features or {}).items():
        if isinstance(feature, datasets.Image):  # decoded (and checked) by the task's encoding, not by datasets
            stream = stream.cast_column(column, datasets.Image(decode=False))
    return stream, f"{path}{':' + data.hf_name if data.hf_name else ''}[{name}]", local_base(path)


def rows_dataset(rows: dict, features):
    """A batch of stream rows ({column: [values]}) as an in-memory ``datasets.Dataset`` the readers take."""
    import datasets

    return datasets.Dataset.from_dict(rows, features=features)


def head(data, split: str, n: int):
    """The first ``n`` rows of ``split`` as an in-memory ``datasets.Dataset`` (validation of a streaming run: read
    once, at most ``n`` rows, each giving one example or more)."""
    stream, _, _ = open_stream(data, split)
    rows = list(stream.take(n))
    return rows_dataset({c: [r[c] for r in rows] for c in (rows[0] if rows else {})}, stream.features)


class ItemStream:
    """The training split as a stream of encoded items, one epoch at a time (see the module docstring).

    ``encode_rows`` turns a batch of rows ({column: [values]}) into a batch of items ({key: [values]}, any number of
    them); it runs lazily, in the process that iterates."""

    def __init__(self, stream, encode_rows: Callable[[dict], dict], seed: int, shuffle_buffer: int, rank: int = 0,
                 world_size: int = 1, describe: str = "", report=None):
        self.source, self.encode_rows, self.report = stream, encode_rows, report  # report: what encode_rows dropped
        self.seed, self.shuffle_buffer, self.rank, self.world_size = seed, shuffle_buffer, rank, world_size
        self.describe = describe
        self.columns = list(stream.column_names or next(iter(stream.take(1)), {}))
        self.current = None  # the IterableDataset of the epoch being read

    @property
    def n_shards(self) -> int:
        return self.source.n_shards

    def own_shards(self) -> bool:
        """Whether each process reads only its own shards (else every process reads every row, keeping its part)."""
        return self.n_shards % self.world_size == 0

    def epoch(self, epoch: int, state: dict | None = None):
        """The items of ``epoch`` for this process (``state``: continue from a :meth:`state_dict`)."""
        from datasets.distributed import split_dataset_by_node

        ds = self.source
        if self.shuffle_buffer:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        if self.world_size > 1:
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        ds = ds.map(self.encode_rows, batched=True, batch_size=ROWS_PER_MAP, remove_columns=self.columns)
        ds.set_epoch(epoch)  # on the dataset iterated: datasets reads the epoch there (not copied by map)
        if state is not None:
            ds.load_state_dict(state)
        self.current = ds
        return ds

    def state_dict(self) -> dict:
        """Where the epoch being read stands: after the last item it yielded (``{}`` before any epoch)."""
        return self.current.state_dict() if self.current is not None else {}

    def summary(self) -> str:
        how = "its own shards" if self.own_shards() else "every row, keeping 1 in " + str(self.world_size)
        shuffle = f"shuffle buffer {self.shuffle_buffer} rows" if self.shuffle_buffer else "not shuffled"
        return (f"streaming {self.describe}: {self.n_shards} shards; process {self.rank} of {self.world_size} reads "
                f"{how}; {shuffle}")
