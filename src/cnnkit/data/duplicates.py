"""Duplicate images among inspected files (the doctor's results: ``sha`` content hash and
``phash`` 64-bit perceptual hash per path). A pair is ``{"a", "b", "cross_split"}`` (plus
``"bits"`` apart for near duplicates); ``cross_split`` pairs are train/test leakage.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def exact(results: dict, splits: dict) -> list[dict]:
    """Pairs of files with the same content hash (``sha``), each paired with its group's first."""
    groups = defaultdict(list)
    for path, rec in results.items():
        if "sha" in rec and "error" not in rec:
            groups[rec["sha"]].append(path)
    return [_pair(a, b, splits) for paths in groups.values() for a, b in _chain(sorted(paths))]


def _chain(paths: list[str]) -> list[tuple[str, str]]:
    """Each file of a group paired with the group's first (n - 1 pairs, not n^2)."""
    return [(paths[0], other) for other in paths[1:]]


def _pair(a: str, b: str, splits: dict, bits: int | None = None) -> dict:
    pair = {"a": a, "b": b, "cross_split": splits[a] != splits[b]}
    if bits is not None:
        pair["bits"] = bits
    return pair


def near(results: dict, splits: dict, max_bits: int) -> list[dict]:
    """Pairs of perceptual hashes within ``max_bits`` bits. Pigeonhole: two 64-bit hashes that
    differ in at most k bits agree exactly on at least one of k + 1 bands, so only files sharing
    a band value are compared (near-linear instead of all n^2 pairs)."""
    paths = [p for p, rec in results.items() if "phash" in rec]
    if len(paths) < 2:
        return []
    hashes = np.array([int(results[p]["phash"], 16) for p in paths], dtype=np.uint64)
    found: dict[tuple[int, int], int] = {}
    bands = max_bits + 1
    width = -(-64 // bands)
    for band in range(bands):
        keys = (hashes >> np.uint64(band * width)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")
        _close_pairs(hashes, order, keys[order], found, max_bits)
    pairs = sorted(found.items())
    return [_pair(paths[i], paths[j], splits, bits) for (i, j), bits in pairs]


def _close_pairs(
    hashes: np.ndarray, order: np.ndarray, keys: np.ndarray, found: dict, max_bits: int
) -> None:
    """Compare each file with the next ``gap`` files of the same band value, gap = 1, 2, ...
    (one vectorised pass per gap, until no group is that long)."""
    for gap in range(1, len(order)):
        same = np.flatnonzero(keys[gap:] == keys[:-gap])
        if not len(same):
            return
        i, j = order[same], order[same + gap]
        bits = _popcount(hashes[i] ^ hashes[j])
        close = bits <= max_bits
        for a, b, n in zip(i[close].tolist(), j[close].tolist(), bits[close].tolist(), strict=True):
            found[(min(a, b), max(a, b))] = n


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(1)
