"""Runs side by side, read from their folders (no database): ``cnnkit runs`` and ``cnnkit compare``.

A run folder is any folder holding ``config.yaml`` and ``metrics.csv``. Its status: finished
(its final score was written, or all its epochs ran), running (metrics or checkpoint written
within the last few epochs' time), else stopped (``cnnkit train --resume`` continues it).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import time
from datetime import datetime
from pathlib import Path

import yaml

from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_write_bytes

COLUMNS = ("run", "model", "data", "epochs", "best_val", "test_acc", "wall_s", "precision")
COLUMNS += ("date", "status")
CURVES = (("loss", ("train_loss", "val_loss")), ("accuracy", ("train_acc", "val_acc")))


def find_runs(root: Path) -> list[Path]:
    """Run folders under ``root`` (itself included), in path order."""
    if not root.is_dir():
        raise CnnkitError(f"no such folder: {root}")
    found = {p.parent for p in root.rglob("config.yaml") if (p.parent / "metrics.csv").is_file()}
    return sorted(found)


def summary(run_dir: Path) -> dict:
    """One row of ``cnnkit runs``: what the run trained and how it went."""
    cfg = _config(run_dir)
    rows = read_metrics(run_dir)
    monitor = cfg["train"]["monitor"]
    values = [r[monitor] for r in rows if monitor in r and r[monitor] == r[monitor]]
    best = (min(values) if monitor.endswith("loss") else max(values)) if values else None
    test = _final_score(run_dir)
    return {
        "run": str(run_dir),
        "model": cfg["model"]["name"],
        "data": str(cfg["data"]["source"] or "digits"),
        "epochs": f"{len(rows)}/{cfg['train']['epochs']}",
        "best_val": best,
        "test_acc": test.get("acc") if test else None,
        "wall_s": round(sum(r.get("epoch_time", 0.0) for r in rows), 1),
        "precision": _precision(run_dir, cfg),
        "date": datetime.fromtimestamp((run_dir / "config.yaml").stat().st_mtime).isoformat(
            " ", "minutes"
        ),
        "status": _status(run_dir, rows, cfg, test),
    }


def table(rows: list[dict], sort: str | None = None) -> str:
    """``rows`` (from ``summary``) as a text table, sorted by column ``sort`` (descending for
    numbers, ascending for text)."""
    if sort is not None:
        if sort not in COLUMNS:
            raise CnnkitError(f"--sort must be one of {', '.join(COLUMNS)}, got '{sort}'")
        numeric = all(isinstance(r[sort], (int, float)) or r[sort] is None for r in rows)
        key = (lambda r: -(r[sort] if r[sort] is not None else -1e30)) if numeric else None
        rows = sorted(rows, key=key or (lambda r: str(r[sort])))
    cells = [list(COLUMNS)] + [[_cell(r[c], c) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def compare(run_dirs: list[Path], out: Path) -> dict:
    """Config differences and overlaid curves of ``run_dirs``: writes ``out/compare.png`` and
    ``out/compare.html``; returns ``{"differences": {key: [value per run]}, "png", "html"}``."""
    for run_dir in run_dirs:
        if not (run_dir / "config.yaml").is_file() or not (run_dir / "metrics.csv").is_file():
            raise CnnkitError(f"{run_dir} is not a run folder (no config.yaml and metrics.csv)")
    flat = [_flatten(_config(r)) for r in run_dirs]
    keys = sorted({k for f in flat for k in f})
    diffs = {k: [f.get(k) for f in flat] for k in keys if len({repr(f.get(k)) for f in flat}) > 1}
    png = _curves(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "compare.png", png)
    atomic_write_bytes(out / "compare.html", _page(run_dirs, diffs, png).encode())
    return {"differences": diffs, "png": out / "compare.png", "html": out / "compare.html"}


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}


def _final_score(run_dir: Path) -> dict | None:
    for name in ("test_metrics.json", "val_metrics.json"):
        if (run_dir / name).is_file():
            return json.loads((run_dir / name).read_text())
    return None


def _precision(run_dir: Path, cfg: dict) -> str:
    """The precision the run trained in (its model file's metadata), else the config's."""
    try:
        from safetensors import safe_open

        with safe_open(str(run_dir / "model.safetensors"), "np") as f:
            meta = f.metadata() or {}
        return json.loads(meta.get("cnnkit", "{}")).get("precision") or cfg["runtime"]["precision"]
    except (OSError, ValueError, json.JSONDecodeError):
        return cfg["runtime"]["precision"]


def _status(run_dir: Path, rows: list[dict], cfg: dict, test: dict | None) -> str:
    if test is not None or len(rows) >= cfg["train"]["epochs"]:
        return "finished"
    epoch = max((r.get("epoch_time", 0.0) for r in rows), default=0.0)
    files = [run_dir / "metrics.csv", run_dir / "checkpoints" / "last.pt"]
    last = max(p.stat().st_mtime for p in files if p.exists())
    return "running" if time.time() - last < max(3 * epoch, 120.0) else "stopped"


def _cell(value, column: str) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if column in ("best_val", "test_acc") else str(value)


def _flatten(cfg: dict) -> dict:
    return {f"{s}.{k}": v for s, values in cfg.items() for k, v in (values or {}).items()}


def _curves(run_dirs: list[Path]) -> bytes:
    """Loss and accuracy per epoch of every run, train dashed and val solid, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run_dir in enumerate(run_dirs):
        color = colors[i % len(colors)]
        rows = read_metrics(run_dir)
        for ax, (title, keys) in zip(axes, CURVES, strict=True):
            for key, style in zip(keys, ("--", "-"), strict=True):
                points = [(r["epoch"], r[key]) for r in rows if key in r and r[key] == r[key]]
                if points:
                    x, y = zip(*points, strict=True)
                    ax.plot(x, y, style, color=color, label=f"{run_dir.name} {key}")
            ax.set_title(title)
            ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _page(run_dirs: list[Path], diffs: dict, png: bytes) -> str:
    head = "".join(f"<th>{html.escape(r.name)}</th>" for r in run_dirs)
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td>"
        + "".join(f"<td>{html.escape(str(v))}</td>" for v in values)
        + "</tr>"
        for k, values in diffs.items()
    )
    data = base64.b64encode(png).decode()
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>compare</title></head><body>"
        f"<h1>Compare {len(run_dirs)} runs</h1><table><tr><th>key</th>{head}</tr>{rows}</table>"
        f"<p><img alt='curves' src='data:image/png;base64,{data}'></p></body></html>"
    )
