"""Export to every format with its parity check, and one predictor for every format, on a model
trained on digits in the test session (real images, real ONNX Runtime, real TorchScript)."""

from __future__ import annotations

import copy
import json
import shutil
import sys

import pytest
import torch

import cnnkit
from cnnkit.cli.main import run
from cnnkit.data import make_loader
from cnnkit.deploy import export as export_mod
from cnnkit.errors import CnnkitError

pytest.importorskip("onnxruntime", reason="export tests need the 'export' extra")

SUFFIX = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "int8": "model.int8.onnx"}


def cli(capsys, *argv):
    code = run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_export_passes_parity_via_cli(digits_model, fmt, capsys):
    code, out, err = cli(capsys, "export", digits_model, "--format", fmt, "--json")
    assert code == 0, err
    report = json.loads(out)
    path = digits_model.parent / SUFFIX[fmt]
    assert report["path"] == str(path) and path.is_file() and report["passed"]
    assert report["images"] == 145  # the whole validation split of the run
    if fmt == "int8":
        assert report["agreement"] >= 0.99
        assert abs(report["acc_exported"] - report["acc_reference"]) <= 0.02
        assert report["calibration"].startswith("MinMax ranges from 256 training images")
    else:
        assert report["agreement"] == 1.0
        assert report["max_abs_diff"] <= 1e-4 * report["logit_scale"]
    assert not list(digits_model.parent.glob(".*tmp*")), "temporary files left behind"


def test_export_prints_parity_and_accuracy_change(digits_model, capsys):
    code, out, err = cli(capsys, "export", digits_model, "--format", "int8")
    assert code == 0, err
    assert "top-1 agreement" in out and "points)" in out and "wrote" in out


def test_onnx_metadata_carries_preprocessing(digits_model):
    import onnx

    export_mod.export(digits_model, "onnx")
    proto = onnx.load(str(digits_model.parent / "model.onnx"))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes"]) == [str(d) for d in range(10)]
    assert json.loads(props["input_size"]) == [8, 8]
    assert len(json.loads(props["mean"])) == 1 and props["cnnkit_version"]
    assert json.loads(props["cnnkit"])["preprocessing"]["in_chans"] == 1
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"  # dynamic batch axis


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "int8"])
def test_predict_and_eval_accept_every_format(digits_model, digit_pngs, fmt, capsys):
    export_mod.export(digits_model, fmt)
    files = [str(p) for p, _ in digit_pngs]
    # the exported graphs compute in fp32, so the reference does too (the run may have been bf16)
    code, out, err = cli(
        capsys, "predict", digits_model, *files, "--top-k", "3", "--json", "--precision", "fp32"
    )
    assert code == 0, err
    reference = json.loads(out)
    exported_path = digits_model.parent / SUFFIX[fmt]
    code, out, err = cli(capsys, "predict", exported_path, *files, "--top-k", "3", "--json")
    assert code == 0, err
    got = json.loads(out)
    same_top1 = [
        r["top"][0]["class"] == g["top"][0]["class"] for r, g in zip(reference, got, strict=True)
    ]
    if fmt == "int8":
        assert sum(same_top1) >= len(files) - 1
    else:
        assert all(same_top1)
        for r, g in zip(reference, got, strict=True):
            assert r["top"][0]["prob"] == pytest.approx(g["top"][0]["prob"], abs=1e-4)

    code, out, err = cli(capsys, "eval", exported_path, "--json")  # the run's own test split
    assert code == 0, err
    code2, out2, err2 = cli(capsys, "eval", digits_model.parent, "--json", "--precision", "fp32")
    assert json.loads(out)["split"] == "test" and json.loads(out)["images"] == 359
    tolerance = 0.01 if fmt == "int8" else 1e-9
    assert json.loads(out)["acc"] == pytest.approx(json.loads(out2)["acc"], abs=tolerance)


def test_failed_parity_check_writes_nothing(digits_model, monkeypatch):
    monkeypatch.setattr(export_mod, "FP32_TOLERANCE", 0.0)  # ONNX's ~1e-7 drift now fails
    target = digits_model.parent / "strict.onnx"
    with pytest.raises(CnnkitError, match="failed its parity check.*nothing was written"):
        export_mod.export(digits_model, "onnx", out=target)
    assert not target.exists()
    assert not list(digits_model.parent.glob(".*tmp*"))


def _export_from_a_changed_model(monkeypatch, fmt: str, change) -> None:
    """Make ``export(..., fmt)`` write the file from a copy of the model whose last linear layer
    (the logits) ``change`` altered; the parity check still compares it with the model file."""
    write = export_mod.WRITERS[fmt]

    def write_changed(model, path, images):
        other = copy.deepcopy(model)
        logits_layer = [m for m in other.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            change(logits_layer)
        return write(other, path, images)

    monkeypatch.setitem(export_mod.WRITERS, fmt, write_changed)


def _refused(digits_model, fmt: str, name: str) -> str:
    target = digits_model.parent / name
    with pytest.raises(CnnkitError, match=f"{fmt} export of .* failed its parity check") as info:
        export_mod.export(digits_model, fmt, out=target)
    assert "nothing was written" in str(info.value)
    assert not target.exists(), "a refused export was moved into place"
    assert not list(digits_model.parent.glob(".*tmp*")), "temporary files left behind"
    return str(info.value)


def _flip_bias(digits_model, flips: int) -> tuple[int, float]:
    """(class, bias shift) that moves the top-1 of exactly ``flips`` validation images to that
    class, in fp32, with the widest margin on both sides (so int8 rounding keeps the count)."""
    model = cnnkit.load_model(digits_model)
    images = export_mod.parity_data(digits_model, model.meta, None).validation
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in make_loader(images, 64, train=False, seed=0)])
    best = None
    for c in range(logits.shape[1]):
        others = logits.argmax(1) != c
        gaps = (logits[others].max(1).values - logits[others, c]).sort().values
        margin = float(gaps[flips] - gaps[flips - 1])
        if best is None or margin > best[0]:
            best = (margin, c, float(gaps[flips - 1] + gaps[flips]) / 2)
    return best[1], best[2]


def test_int8_agreement_below_99_percent_is_refused(digits_model, monkeypatch):
    # 3 of the 145 validation images moved to another class: 97.9% agreement (int8 alone >= 99%)
    cls, shift = _flip_bias(digits_model, flips=3)
    _export_from_a_changed_model(monkeypatch, "int8", lambda fc: fc.bias[cls].add_(shift))
    message = _refused(digits_model, "int8", "refused.int8.onnx")
    assert "(top-1 agreement below 99%)" in message
    agreement = float(message.split("top-1 agreement ")[-1].split("%")[0])
    assert 95.0 < agreement < 99.0, message


def test_torchscript_whose_logits_drift_is_refused(digits_model, monkeypatch):
    # logits 0.1% larger: every top-1 the same, but 10x the fp32 tolerance
    _export_from_a_changed_model(
        monkeypatch, "torchscript", lambda fc: [p.mul_(1.001) for p in fc.parameters()]
    )
    message = _refused(digits_model, "torchscript", "refused.torchscript.pt")
    assert "(logits differ by more than 0.0001 of their scale)" in message
    assert "top-1 agreement 100.00%" in message and "top-1 differs" not in message


@pytest.mark.parametrize(
    "fmt, relative_diff, agreement, passed",
    [
        ("int8", 0.5, 0.99, True),
        ("int8", 0.5, 0.9899, False),
        ("onnx", 1e-4, 1.0, True),
        ("torchscript", 1.01e-4, 1.0, False),
        ("torchscript", 0.0, 0.999, False),
    ],
)
def test_parity_gates(fmt, relative_diff, agreement, passed):
    parity = export_mod.Parity(relative_diff, 1.0, agreement, 1000, None, None)
    export_mod._judge(parity, fmt)
    assert parity.passed is passed and bool(parity.problems) is not passed


def test_model_outside_its_run_needs_data(digits_model, tmp_path, capsys):
    lone = tmp_path / "model.safetensors"
    shutil.copy(digits_model, lone)
    code, out, err = cli(capsys, "export", lone, "--format", "onnx")
    assert code == 2 and "--data" in err
    code, out, err = cli(
        capsys, *("export", lone, "--format", "onnx", "--data", "digits"), "--max-val-images", "50"
    )
    assert code == 0, err
    assert (tmp_path / "model.onnx").is_file()
    assert "100.00% on 50 validation images" in out


def test_bad_format_and_suffix(digits_model, tmp_path, capsys):
    code, _, err = cli(capsys, "export", digits_model, "--format", "tflite")
    assert code == 2 and "unknown export format 'tflite'" in err
    code, _, err = cli(capsys, "export", digits_model, "--out", tmp_path / "m.bin")
    assert code == 2 and "must end in .onnx" in err


def test_missing_extra_names_it(digits_model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the extra were not installed
    code, _, err = cli(capsys, "export", digits_model, "--format", "onnx")
    assert code == 2 and "pip install 'cnnkit[export]'" in err


def test_bench_json_rows(digits_model, capsys):
    code, out, err = cli(
        capsys,
        "bench",
        digits_model,
        *("--runtime", "eager", "--runtime", "bf16", "--runtime", "ort", "--runtime", "int8"),
        *("--seconds", "0.05", "--batch-size", "8", "--json"),
    )
    assert code == 0, err
    rows = {r["runtime"]: r for r in json.loads(out)["rows"]}
    assert list(rows) == ["eager fp32", "eager bf16", "ORT fp32", "ORT int8"]
    for name in ("eager fp32", "ORT fp32", "ORT int8"):
        r = rows[name]
        assert r["latency_p50_ms"] > 0 and r["latency_p99_ms"] >= r["latency_p50_ms"]
        assert r["throughput"] > 0 and r["speedup"] > 0
    assert rows["eager fp32"]["speedup"] == 1.0
    bf16 = rows["eager bf16"]
    assert bf16["throughput"] is not None or "no native bf16" in bf16["note"]
    assert "calibrated on train" in rows["ORT int8"]["note"]
