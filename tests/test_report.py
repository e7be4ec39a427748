"""The end-of-training report: files, a real browser rendering it, metrics against scikit-learn,
and one-line errors for bad runs and data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cnnkit
from cnnkit.cli.main import run as cli
from cnnkit.evaluation.metrics import calibration, from_logits
from conftest import make_folder

SECTIONS = [
    "summary", "curves", "per-class", "confusion", "calibration", "mistakes", "gradcam", "model",
    "config", "environment",
]  # fmt: skip
FIGURES = ["curves.png", "confusion.png", "reliability.png", "gradcam.png"]


@pytest.fixture(scope="module")
def digits_run(digits_result) -> Path:
    """The session's digits run folder (conftest): training ends by writing the report."""
    return digits_result.run_dir


def test_training_writes_self_contained_report(digits_run):
    html = (digits_run / "report.html").read_text()
    for name in FIGURES:
        assert (digits_run / name).stat().st_size > 1000, name
    for section in SECTIONS:
        assert f'<section id="{section}">' in html, section
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert html.count('src="data:image/png;base64,') >= len(FIGURES)


def test_report_renders_in_headless_chromium(digits_run, tmp_path, chromium):
    requests: list[str] = []
    artifacts = Path(os.environ.get("CNNKIT_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    page.on("request", lambda r: requests.append(r.url))
    page.goto((digits_run / "report.html").resolve().as_uri())
    page.wait_for_load_state("load")
    widths = page.eval_on_selector_all(
        "img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)"
    )
    sections = page.eval_on_selector_all("section", "s => s.map(e => e.id)")
    headings = page.eval_on_selector_all("h2", "h => h.map(e => e.textContent)")
    page.screenshot(path=str(artifacts / "report.png"), full_page=True)
    assert len(widths) >= len(FIGURES) and all(w > 0 for w in widths), widths
    assert sections == SECTIONS
    assert "Per class (worst first)" in headings
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert (artifacts / "report.png").stat().st_size > 10_000


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_metrics_agree_with_scikit_learn():
    from sklearn import metrics as sk

    rng = np.random.default_rng(0)
    num_classes, n = 7, 500
    labels = rng.integers(0, num_classes - 1, n)  # the last class never occurs
    logits = rng.normal(size=(n, num_classes)) + 2.0 * np.eye(num_classes)[labels]
    classes = [f"c{i}" for i in range(num_classes)]
    m = from_logits(torch.tensor(logits), torch.tensor(labels), classes)
    predicted = logits.argmax(1)
    present = list(range(num_classes - 1))
    assert m["acc"] == pytest.approx(sk.accuracy_score(labels, predicted))
    assert m["balanced_acc"] == pytest.approx(sk.balanced_accuracy_score(labels, predicted))
    assert m["acc5"] == pytest.approx(
        sk.top_k_accuracy_score(labels, logits, k=5, labels=range(num_classes))
    )
    probs = torch.tensor(logits).softmax(1).numpy()
    assert m["loss"] == pytest.approx(sk.log_loss(labels, probs, labels=range(num_classes)))
    cm = sk.confusion_matrix(labels, predicted, labels=range(num_classes))
    assert m["confusion"] == cm.tolist()
    p, r, f, s = sk.precision_recall_fscore_support(
        labels, predicted, labels=range(num_classes), zero_division=0
    )
    for i, row in enumerate(m["per_class"]):
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p[i], r[i], f[i]))
        assert row["support"] == s[i]
    assert m["macro_f1"] == pytest.approx(
        sk.f1_score(labels, predicted, labels=present, average="macro", zero_division=0)
    )


def test_expected_calibration_error_by_hand():
    # Two bins used: confidence 0.95 (2 images, 1 right) and 0.55 (2 images, both right).
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 0, 1])
    cal = calibration(probs, labels, bins=10)
    assert cal["ece"] == pytest.approx(0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.55))
    assert sum(b["count"] for b in cal["bins"]) == 4


def test_report_on_another_split_and_out_folder(tmp_path):
    folder = make_folder(tmp_path / "split", per_class=16, layout="split")
    run = cnnkit.train(
        str(folder), epochs=1, out_dir=str(tmp_path / "runs"), progress="plain", report=False
    ).run_dir
    assert not (run / "report.html").exists()
    code = cli(["report", str(run), "--data", str(folder / "test"), "--out", str(tmp_path / "r")])
    assert code == 0
    html = (tmp_path / "r" / "report.html").read_text()
    assert "red" in html and "green" in html and "blue" in html
    assert (tmp_path / "r" / "gradcam.png").is_file()


def test_report_bad_input_gives_one_line_errors(digits_run, tmp_path, capsys):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    assert cli(["report", str(empty)]) == 2
    assert "has no metrics.csv" in capsys.readouterr().err
    no_model = tmp_path / "no-model"
    no_model.mkdir()
    shutil.copy(digits_run / "metrics.csv", no_model / "metrics.csv")
    assert cli(["report", str(no_model)]) == 2
    err = capsys.readouterr().err
    assert "has no model.safetensors" in err and len(err.strip().splitlines()) == 1
    # a split whose class folders the digits model does not know
    other = make_folder(tmp_path / "colors", per_class=2)
    assert cli(["report", str(digits_run), "--data", str(other), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a training class" in err and "blue" in err
    assert len(err.strip().splitlines()) == 1


def test_hundred_classes_confusion_is_cut_to_the_most_confused(tmp_path):
    from cnnkit.evaluation.report import Figures, _confusion

    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(100), 5)
    logits = rng.normal(size=(500, 100)) + 4.0 * np.eye(100)[labels]
    logits[labels == 7, 3] += 10.0  # class 7 is always taken for class 3
    classes = [f"class{i}" for i in range(100)]
    m = from_logits(torch.tensor(logits), torch.tensor(labels), classes)
    figures = Figures()
    shown = _confusion(figures, m)
    assert "100 classes: showing the 30 involved in the most errors" in shown["note"]
    assert figures.png["confusion.png"][:4] == b"\x89PNG"
    from cnnkit.evaluation.plots import confusion_classes

    picked = confusion_classes(np.asarray(m["confusion"]))
    assert len(picked) == 30 and {3, 7} <= set(picked)


def test_grid_captions_stay_in_their_cells():
    """CIFAR-10 captions ("automobile") used to run into the neighbouring caption; a user's very
    long class name must not either. Measured on the drawn figure, as the PNG shows it."""
    from itertools import combinations

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from cnnkit.evaluation import plots

    names = [
        "automobile",
        "airplane",
        "cat",
        "automobile",
        "snow_leopard_on_a_rocky_mountain_slope",
    ]
    captions = [
        f"img_{i:05d}_front_view.png\ntrue {names[i]} p=0.04\npred {names[-1 - i]} p=0.93"
        for i in range(len(names))
    ] + ["true automobile\npred airplane p=0.93"] * 3
    images = [np.full((32, 32, 3), 0.5)] * len(captions)
    fig = plots.image_grid(images, captions, cols=4)
    canvas = FigureCanvasAgg(fig)  # what png() renders with
    canvas.draw()
    renderer = canvas.get_renderer()
    ax = fig.axes[0]
    texts = ax.texts
    boxes = [t.get_window_extent(renderer) for t in texts]
    for a, b in combinations(range(len(boxes)), 2):
        assert not boxes[a].overlaps(boxes[b]), (texts[a].get_text(), texts[b].get_text())
    cell_w, cell_h = plots.TILE + 2 * plots.GAP, plots.TILE + plots.CAPTION + plots.GAP
    for n, box in enumerate(boxes):
        row, col = divmod(n, 4)
        # the cell's left and right edges, and the tile's top, in display pixels (y up)
        (x0, tile_top), (x1, _) = ax.transData.transform(
            [(col * cell_w, row * cell_h + plots.CAPTION), ((col + 1) * cell_w, 0)]
        )
        assert x0 <= box.x0 and box.x1 <= x1, (n, box)
        assert tile_top <= box.y0 and box.y1 <= fig.bbox.y1, (n, box)
    sizes = [t.get_fontsize() for t in texts]
    assert sizes[-1] == plots.CAPTION_FONT  # a short caption keeps its size
    assert min(sizes) >= 5, sizes  # the long name is cut, not shrunk to illegible
