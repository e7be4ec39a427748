"""``study.html``: one self-contained page about a study (``cnnkit tune``).

Optuna's matplotlib visualisations (optimisation history, parameter importances from its default
evaluator, parallel coordinates, slices) and the best trial's report figures, embedded as PNG
data: URIs, so the page needs no browser JavaScript and no file beside it; plus a table of the
trials with links to their run folders' ``report.html``.
"""

from __future__ import annotations

import base64
import html
import io
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend

from cnnkit.fileio import atomic_write_bytes  # noqa: E402

PAGE = "study.html"
PLOTS = (  # (title, optuna.visualization.matplotlib function name)
    ("Optimisation history", "plot_optimization_history"),
    ("Parameter importances", "plot_param_importances"),
    ("Parallel coordinates", "plot_parallel_coordinate"),
    ("Slices", "plot_slice"),
)


def write(study, folder: Path, metric: str) -> Path:
    """Write ``folder/study.html`` for ``study`` (an ``optuna.Study``); returns its path."""
    sections = [_plot(study, title, name, metric) for title, name in PLOTS]
    best = study.best_trial
    best_dir = Path(best.user_attrs.get("run_dir", ""))
    figures = sorted(best_dir.glob("*.png")) if best_dir.is_dir() else []
    body = [
        f"<h1>Study {html.escape(study.study_name)}</h1>",
        f"<p>{len(study.trials)} trials; best: trial {best.number}, {metric} {best.value:.4f} "
        f"(<a href='best.yaml'>best.yaml</a>)</p>",
        *sections,
        f"<h2>Best trial ({best.number}): figures</h2>",
        *(_img(p.stem, p.read_bytes()) for p in figures),
        "<h2>Trials</h2>",
        _trials_table(study, folder),
    ]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>study "
        f"{html.escape(study.study_name)}</title><style>body{{font-family:sans-serif;"
        "max-width:1100px;margin:auto}img{max-width:100%}td,th{padding:2px 8px}</style>"
        "</head><body>" + "\n".join(body) + "</body></html>"
    )
    path = folder / PAGE
    atomic_write_bytes(path, page.encode())
    return path


def _plot(study, title: str, name: str, metric: str) -> str:
    """One Optuna figure as an embedded PNG, or a line saying why there is none."""
    from optuna.visualization import matplotlib as vis  # optional dependency: cnnkit[tune]

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks these plots experimental
            result = getattr(vis, name)(study, target_name=metric)
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        return f"<h2>{title}</h2><p>not drawn: {html.escape(str(e))}</p>"
    fig = _figure(result)
    buf = io.BytesIO()
    fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 4))
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f"<h2>{title}</h2>" + _img(title, buf.getvalue())


def _figure(result):
    """Optuna returns an Axes, or an array of Axes (slices), or a Figure."""
    if hasattr(result, "savefig"):
        return result
    first = result.flat[0] if hasattr(result, "flat") else result
    return first.figure


def _img(alt: str, png: bytes) -> str:
    data = base64.b64encode(png).decode()
    return f"<p><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'></p>"


def _trials_table(study, folder: Path) -> str:
    params = sorted({k for t in study.trials for k in t.params})
    head = ["trial", "state", "value", "epochs", "seconds", *params, "report"]
    rows = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for t in study.trials:
        run_dir = Path(t.user_attrs.get("run_dir", f"trial-{t.number}"))
        report = run_dir / "report.html"
        link = f"<a href='{run_dir.name}/report.html'>report</a>" if report.is_file() else ""
        value = f"{t.value:.4f}" if t.value is not None else ""
        cells = [t.number, t.state.name.lower(), value, t.user_attrs.get("epochs", "")]
        cells += [t.user_attrs.get("seconds", ""), *(_fmt(t.params.get(p)) for p in params)]
        rows.append(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
            + f"<td>{link}</td></tr>"
        )  # fmt: skip
    return "<table>" + "\n".join(rows) + "</table>"


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)
