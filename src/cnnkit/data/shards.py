"""Datasets as WebDataset tar shards: write them from a folder/CSV/built-in, train from them.

Layout written by ``write_shards`` (``cnnkit shard``):

    OUT/train-000000.tar, train-000001.tar, ...   samples <key>.<ext> (the original image
    OUT/val-000000.tar, OUT/test-000000.tar        bytes) + <key>.cls (class index as text)
    OUT/meta.json                                  classes, and the sample count of every shard

Training samples are written in a seeded random order so every shard holds a mix of classes.

Reading (``ShardDataset``): a source naming shards - a path or fsspec URL with a brace range,
``'out/train-{000000..000127}.tar'`` - is read with the webdataset library's tar iterators; the
shard files are opened locally or through fsspec (``s3://``, ``gs://``, ``http://``... when the
matching fsspec backend is installed). Each epoch e:

  * the shard list is permuted by (seed, e) and dealt out to the (rank, worker) slots: slot j of
    the ``world_size * workers`` slots reads shards j, j + slots, ... - together the slots read
    every shard exactly once;
  * each slot shuffles its samples through a buffer of ``shuffle_buffer`` samples seeded by
    (seed, e, slot);
  * each rank yields exactly ``len(dataset) // world_size`` samples (its slots wrap around their
    shards if they hold fewer, and stop early if more), so ranks run the same number of steps
    and a distributed epoch never hangs on an uneven last shard.

``meta.json`` next to the shards gives the classes and per-shard counts (hence the epoch length).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from torch.utils.data import IterableDataset, get_worker_info

from cnnkit.data import images as image_files
from cnnkit.data.datasets import read_local
from cnnkit.data.host import cache_root
from cnnkit.data.loader import mix_seed
from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from PIL import Image

META = "meta.json"
DEFAULT_SHUFFLE_BUFFER = 2000
SPLITS = ("train", "val", "test")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


def is_shard_source(source: str | None) -> bool:
    """True for sources that name tar shards (a .tar path, pattern or URL)."""
    return bool(source) and ".tar" in str(source) and not Path(str(source)).is_dir()


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64KiB', '1e6' -> bytes (k/M/G/T are powers of 1000, Ki/Mi/Gi of 1024)."""
    match = _SIZE.match(str(text))
    if not match:
        try:
            return int(float(text))
        except ValueError:
            raise CnnkitError(
                f"cannot read the size '{text}'; use e.g. 1GB, 500MB or 64MiB"
            ) from None
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    base = 1024 if "i" in unit else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[:1] if unit[:1] in "kmgt" else ""]
    return int(number * base**power)


# ---------------------------------------------------------------------------------------------
# Writing


def write_shards(
    source: str,
    out: str | Path,
    *,
    shard_size: int = 10**9,
    samples_per_shard: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
    note=print,
) -> dict:
    """Write ``source`` (folder, CSV or built-in; its train/val/test splits) as tar shards in
    ``out``; returns the meta dict also written to ``out/meta.json``. ``cache_dir``: where
    built-ins are stored (as ``data.cache_dir``)."""
    wds = _webdataset()
    out = Path(out)
    if out.exists() and any(out.glob("*.tar")):
        raise CnnkitError(f"{out} already holds .tar shards; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    src = read_local(source, cache_root(cache_dir))
    meta: dict = {"format": "cnnkit-shards-1", "classes": src.classes, "shards": {}}
    for split in SPLITS:
        dataset = getattr(src, split)
        if dataset is None:
            continue
        order = list(range(len(dataset)))
        if split == "train":
            random.Random(seed).shuffle(order)
        counts: dict[str, int] = {}
        pattern = str(out / f"{split}-%06d.tar")
        max_count = samples_per_shard or 10**9
        with wds.ShardWriter(pattern, maxcount=max_count, maxsize=shard_size, verbose=0) as sink:
            for n, index in enumerate(order):
                ext, payload = _sample_bytes(dataset, index)
                sink.write(
                    {"__key__": f"{split}{n:09d}", ext: payload, "cls": str(dataset.targets[index])}
                )
                name = Path(sink.fname).name
                counts[name] = counts.get(name, 0) + 1
        meta["shards"][split] = counts
        note(f"{split}: {len(order)} images in {len(counts)} shard(s)")
    atomic_write_bytes(out / META, json.dumps(meta, indent=1).encode())
    return meta


def _sample_bytes(dataset, index: int) -> tuple[str, bytes]:
    """(extension, encoded image) of one sample: the file's own bytes, or PNG for in-memory
    images (built-ins)."""
    paths = getattr(dataset, "paths", None)
    if paths is not None:
        path = Path(paths[index])
        ext = path.suffix.lower().lstrip(".") or "img"
        return ("jpg" if ext == "jpeg" else ext), path.read_bytes()
    pixels = dataset.images[index].permute(1, 2, 0).numpy()  # uint8 (H, W, C)
    return "png", image_files.encode_png(pixels)


# ---------------------------------------------------------------------------------------------
# Reading


def expand_urls(source: str) -> list[str]:
    """Brace-expanded shard URLs, each checked to exist when it is a local path."""
    _webdataset()
    from braceexpand import braceexpand  # installed with webdataset

    urls = [u for part in str(source).split("::") for u in braceexpand(part.strip())]
    for url in urls:
        if _is_local(url) and not Path(_local(url)).is_file():
            raise CnnkitError(f"shard not found: {url}")
    return urls


def read_meta(urls: list[str]) -> dict:
    """``meta.json`` from the folder of the first shard."""
    first = urls[0]
    meta_url = first.rsplit("/", 1)[0] + "/" + META if "/" in first else META
    try:
        if _is_local(meta_url):
            text = Path(_local(meta_url)).read_text()
        else:
            import fsspec

            with fsspec.open(meta_url, "r") as f:
                text = f.read()
        meta = json.loads(text)
    except (OSError, ValueError, ImportError) as e:
        raise CnnkitError(
            f"cannot read {meta_url} ({e}); shards need the meta.json that `cnnkit shard` writes "
            "next to them"
        ) from None
    if "classes" not in meta or "shards" not in meta:
        raise CnnkitError(f"{meta_url} is not a cnnkit shard index (no classes/shards)")
    return meta


class ShardDataset(IterableDataset):
    """(image, label) samples streamed from tar shards; see the module docstring for the order.

    ``transform`` is applied to the decoded PIL image (mode ``mode``). Call ``set_epoch(e)``
    before each epoch; ``set_rank(rank, world_size)`` in distributed runs.
    """

    def __init__(
        self,
        urls: list[str],
        classes: list[str],
        counts: dict[str, int],
        *,
        mode: str = "RGB",
        transform=None,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    ) -> None:
        self.urls, self.classes, self.counts = list(urls), list(classes), counts
        self.mode, self.transform = mode, transform
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.epoch, self.rank, self.world_size = 0, 0, 1
        missing = [u for u in self.urls if _name(u) not in counts]
        if missing:
            raise CnnkitError(f"shard {missing[0]} is not listed in its meta.json")
        self.targets: list[int] = []  # unknown without reading; kept for the dataset protocol

    def __len__(self) -> int:
        return sum(self.counts[_name(u)] for u in self.urls)

    def with_transform(self, transform, mode: str | None = None) -> ShardDataset:
        other = ShardDataset(
            self.urls,
            self.classes,
            self.counts,
            mode=mode or self.mode,
            transform=transform,
            seed=self.seed,
            shuffle=self.shuffle,
            shuffle_buffer=self.shuffle_buffer,
        )
        other.rank, other.world_size = self.rank, self.world_size
        return other

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_rank(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def worker_shares(self, workers: int) -> list[int]:
        """Samples each of this rank's ``workers`` yields per epoch. Training: the rank's equal
        share (``len // world_size``) split evenly; evaluation: what its shards hold."""
        if self.shuffle:
            return _split_evenly(len(self) // self.world_size, workers)
        return [
            sum(self.counts[_name(u)] for u in self.slot_shards(self.epoch, self.rank, w, workers))
            for w in range(workers)
        ]

    def slot_shards(self, epoch: int, rank: int, worker: int, workers: int) -> list[str]:
        """The shards that (rank, worker) reads in ``epoch``: training permutes them by
        (seed, epoch); evaluation keeps the file order and never reads a shard twice."""
        order = list(self.urls)
        slots = self.world_size * workers
        slot = rank * workers + worker
        if not self.shuffle:
            return order[slot::slots]
        random.Random(mix_seed(self.seed, epoch)).shuffle(order)
        if len(order) < slots:  # fewer shards than readers: each reader takes one, round robin
            return [order[slot % len(order)]]
        return order[slot::slots]

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.slot_shards(self.epoch, self.rank, worker, workers)
        if not self.shuffle:
            for image, label in self._samples(shards):
                yield (self.transform(image) if self.transform else image), label
            return
        share = self.worker_shares(workers)[worker]
        rng = random.Random(mix_seed(self.seed, self.epoch, self.rank * workers + worker))
        samples = _buffer_shuffle(self._cycle(shards, share), self.shuffle_buffer, rng)
        for image, label in samples:
            yield (self.transform(image) if self.transform else image), label

    def _cycle(self, shards: list[str], count: int) -> Iterator[tuple]:
        """Exactly ``count`` samples: the shards in order, wrapped around if they hold fewer."""
        if count <= 0 or not shards:
            return
        n = 0
        while True:
            for sample in self._samples(shards):
                yield sample
                n += 1
                if n >= count:
                    return

    def headers(self, count: int) -> list[tuple[int, int, str]]:
        """(width, height, Pillow mode) of the first ``count`` images (input size, channels)."""
        infos = []
        for data, _, where in self._encoded(self.urls):
            infos.append(image_files.image_info(data, name=where))
            if len(infos) >= count:
                break
        return infos

    def _samples(self, shards: list[str]) -> Iterator[tuple]:
        for data, label, where in self._encoded(shards):
            yield decode_bytes(data, self.mode, where), label

    def _encoded(self, shards: list[str]) -> Iterator[tuple[bytes, int, str]]:
        """(encoded image, label, 'shard:member') of every sample of ``shards``, in file order;
        the tar reading is webdataset's."""
        _webdataset()
        from webdataset.tariterators import group_by_keys, tar_file_expander

        streams = ({"url": url, "stream": _open(url)} for url in shards)
        for sample in group_by_keys(tar_file_expander(streams)):
            image_key = next((k for k in sample if not k.startswith("__") and k != "cls"), None)
            if image_key is None or "cls" not in sample:
                raise CnnkitError(
                    f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image or "
                    "no .cls label; write shards with `cnnkit shard`"
                )
            label = sample["cls"]
            label = int(label.decode() if isinstance(label, bytes) else label)
            yield (
                sample[image_key],
                label,
                f"{sample.get('__url__')}:{sample['__key__']}.{image_key}",
            )


def decode_bytes(data: bytes, mode: str, where: str) -> Image.Image:
    """An encoded image (a shard member) decoded by the same policy as image files."""
    return image_files.decode(data, mode, name=where)[0]


def _webdataset():
    """The webdataset library (the ``shards`` extra), with a one-line error when missing."""
    try:
        import webdataset
    except ImportError:
        raise CnnkitError(
            "tar shards need the webdataset library: pip install 'cnnkit[shards]'"
        ) from None
    return webdataset


def _buffer_shuffle(samples, size: int, rng: random.Random):
    """Shuffle a stream through a buffer of ``size`` items (reservoir-style)."""
    buffer = []
    for item in samples:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _open(url: str):
    if _is_local(url):
        return open(_local(url), "rb")
    try:
        import fsspec
    except ImportError:
        raise CnnkitError(f"reading {url} needs fsspec: pip install fsspec") from None
    try:
        return fsspec.open(url, "rb").open()
    except (ImportError, ValueError) as e:
        raise CnnkitError(f"cannot open {url}: {e} (install the fsspec backend for it)") from None


def _is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def _local(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def shard_dataset(source: str, meta: dict | None = None, *, shuffle: bool) -> ShardDataset:
    """A ``ShardDataset`` over the shards ``source`` names (classes and counts from meta.json)."""
    urls = expand_urls(source)
    meta = meta or read_meta(urls)
    counts = {name: n for split in meta["shards"].values() for name, n in split.items()}
    return ShardDataset(urls, meta["classes"], counts, shuffle=shuffle)


def first_samples(dataset: ShardDataset, count: int) -> list:
    """Up to ``count`` (image, label) pairs from the start of the shards, in file order, with the
    dataset's transform (for input size and statistics)."""
    out = []
    for image, label in dataset._samples(dataset.urls):
        out.append(((dataset.transform(image) if dataset.transform else image), label))
        if len(out) >= count:
            break
    return out


def fingerprint(dataset: ShardDataset) -> str:
    """Changes when the shard list or a shard's sample count changes."""
    text = json.dumps([dataset.urls, [dataset.counts[_name(u)] for u in dataset.urls]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


__all__ = [
    "ShardDataset",
    "expand_urls",
    "is_shard_source",
    "parse_size",
    "read_meta",
    "first_samples",
    "fingerprint",
    "shard_dataset",
    "write_shards",
]
