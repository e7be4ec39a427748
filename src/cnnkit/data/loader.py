"""DataLoaders whose batches depend only on (seed, epoch): exact resume, any number of workers.

The order of epoch ``e`` comes from a generator seeded by (seed, e), and the random transform of
sample ``i`` in epoch ``e`` runs under the CPU RNG seeded by (seed, e, i); an ``EpochDataset``
also gets (i, e) itself (alternating flips). Nothing depends on the number of workers, on earlier
epochs, or on the global RNG, which is left untouched. Call ``loader.set_epoch(e)`` (or
``loader.sampler.set_epoch(e)``) before iterating epoch ``e``.

Errors: a ``CnnkitError`` raised while loading a sample (e.g. ``ImageFileError`` for a corrupt
file) comes out of the loader as the same type with its original one-line message, also when it
was raised in a worker process (torch would otherwise prefix the worker's traceback).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from cnnkit.data.host import cpu_count
from cnnkit.errors import CnnkitError

MAX_AUTO_WORKERS = 8
SMALL_IN_MEMORY = 16 * 2**20  # bytes: in-memory datasets below this load in the main process
_MASK64 = 2**64 - 1


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 steps), stable across processes."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 29
    return state >> 1


class EpochSampler(Sampler):
    """Yields ``(index, epoch)`` pairs; the order is a permutation seeded by (seed, epoch).

    With ``world_size > 1`` each rank gets every ``world_size``-th index of the same order,
    padded by wrapping around so all ranks get the same count (as DistributedSampler does).
    """

    def __init__(
        self,
        size: int,
        *,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        # per-sample weights: draw ``size`` indices with replacement (class-balanced sampling)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select epoch ``epoch``; ``start`` skips its first indices (resuming mid-epoch)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return -(-self.size // self.world_size) - self.start  # ceil

    def indices(self) -> list[int]:
        """This rank's dataset indices for the current epoch, in order, from ``start`` on."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.size, True, generator=generator).tolist()
        elif self.shuffle:
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.world_size > 1:
            full = -(-self.size // self.world_size)
            order += order[: full * self.world_size - self.size]
            order = order[self.rank :: self.world_size]
        return order[self.start :]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(index, self.epoch) for index in self.indices()])


class EpochDataset(Dataset):
    """A map-style dataset whose samples may depend on the epoch as well as on the index
    (``hflip=alternate``): ``sample(index, epoch)``; ``dataset[index]`` is its epoch 0. The
    loaders call ``sample`` only while ``epoch_dependent``, else ``dataset[index]`` as for any
    dataset (so a subclass may still override ``__getitem__``)."""

    epoch_dependent = False

    def sample(self, index: int, epoch: int):
        raise NotImplementedError

    def __getitem__(self, index: int):
        return self.sample(index, 0)


class SeededDataset(Dataset):
    """Wraps a dataset: item ``(index, epoch)`` is ``dataset[index]`` (``dataset.sample(index,
    epoch)`` when it is ``epoch_dependent``) computed under the CPU RNG seeded by (seed, epoch,
    index); the caller's RNG state is restored afterwards."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        state = torch.get_rng_state()
        # default_generator only: torch.manual_seed would also reseed CUDA in the main process
        torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
        try:
            if isinstance(self.dataset, EpochDataset) and self.dataset.epoch_dependent:
                return self.dataset.sample(index, epoch)
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        """A batch of items; datasets whose transform is deterministic fetch it in one call."""
        fetch = getattr(self.dataset, "__getitems__", None)
        if fetch is not None and getattr(self.dataset, "deterministic", False):
            return fetch([index for index, _ in keys])
        return [self[key] for key in keys]


class EpochLoader(DataLoader):
    """DataLoader with ``set_epoch`` and clean ``CnnkitError`` messages from worker processes."""

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration yields."""
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        iterator = super().__iter__()
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except CnnkitError as e:
                message = worker_message(e)
                if message == str(e):  # raised in this process: keep it as it is
                    raise
                raise type(e)(message) from e
            yield batch


class StreamLoader(EpochLoader):
    """Loader over a streamed (iterable) dataset: ``set_epoch`` reaches the dataset, and the
    length is exact. Workers are started anew each epoch (not persistent) so they see the epoch;
    each worker batches its own share of the rank's samples."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        shares = self.dataset.worker_shares(max(self.num_workers, 1))
        if self.drop_last:
            return sum(n // self.batch_size for n in shares)
        return sum(-(-n // self.batch_size) for n in shares)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    seed: int,
    num_workers: int | None = None,
    pin_memory: bool = False,
    drop_last: bool | None = None,
    rank: int = 0,
    world_size: int = 1,
    weights: Sequence[float] | None = None,
) -> EpochLoader:
    """A loader over ``dataset`` whose epoch ``e`` depends only on (seed, e).

    train: shuffle, and by default drop the last partial batch (when there is a full one).
    num_workers: None picks 0 for small in-memory datasets, else min(CPU count, 8).
    pin_memory: honoured only when CUDA is available. rank/world_size: shard for distributed runs.
    weights: per-sample weights to draw each epoch's samples with replacement (balancing).
    """
    if batch_size < 1:
        raise CnnkitError(f"data.batch_size must be >= 1, got {batch_size}")
    workers = auto_workers(dataset) if num_workers is None else num_workers
    if isinstance(dataset, IterableDataset):  # streamed shards: the dataset orders itself
        dataset.set_rank(rank, world_size)
        return StreamLoader(
            dataset,
            batch_size=batch_size,
            drop_last=train if drop_last is None else drop_last,
            num_workers=workers,
            pin_memory=pin_memory and torch.cuda.is_available(),
        )
    if drop_last is None:
        drop_last = train and len(dataset) > batch_size * world_size
    sampler = EpochSampler(
        len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world_size, weights=weights
    )
    return EpochLoader(
        SeededDataset(dataset, seed),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory and torch.cuda.is_available(),
        # own generator: creating an iterator would otherwise draw from the global RNG
        generator=torch.Generator().manual_seed(mix_seed(seed, -1)),
        worker_init_fn=_ignore_sigint,
    )


def _ignore_sigint(worker_id: int) -> None:
    """Ctrl-C reaches every process of the terminal's group; workers leave it to the main
    process, which stops training cleanly at the next step (a dead worker would crash it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def auto_workers(dataset: Dataset) -> int:
    """0 for datasets held in memory under SMALL_IN_MEMORY bytes, else min(CPU count, 8)."""
    nbytes = getattr(dataset, "nbytes", None)
    if nbytes is not None and nbytes < SMALL_IN_MEMORY:
        return 0
    return min(cpu_count(), MAX_AUTO_WORKERS)


def worker_message(error: BaseException) -> str:
    """The original message of an error re-raised by a DataLoader from a worker process.

    torch re-raises as ``type(e)("Caught X in DataLoader worker process N.\\nOriginal Traceback
    ...\\nmodule.X: message")``; the last line holds the message. Other errors pass unchanged.
    """
    text = str(error)
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return text
    last = text.rstrip().splitlines()[-1]
    cls = type(error)
    for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        if last.startswith(prefix):
            return last[len(prefix) :]
    return last
