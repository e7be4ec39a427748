"""Precision on any CPU: both branches of ``precision: auto`` (forced by CNNKIT_NATIVE_BF16), the
bf16 path within bounds that follow from bf16's 8-bit significand, and one runtime per run, whose
precision the model file records and every scoring verb uses by default."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import cnnkit
from cnnkit.cli.main import run
from cnnkit.config import RuntimeConfig
from cnnkit.engine import runtime
from cnnkit.errors import CnnkitError
from cnnkit.modelfile import load_model_file

# bf16 keeps 8 significant bits (7 stored + the implicit one): rounding to it is off by at most
# 2**-8 of the value (unit roundoff u, round to nearest).
BF16_U = 2.0**-8


@pytest.mark.parametrize(("forced", "expected"), [("1", "bf16"), ("0", "fp32")])
def test_switch_forces_either_branch_of_auto(monkeypatch, forced, expected):
    monkeypatch.setenv(runtime.NATIVE_BF16_ENV, forced)
    assert runtime.cpu_has_native_bf16() is (forced == "1")
    assert runtime.resolve(RuntimeConfig(device="cpu")).precision == expected
    # an explicit precision is never overridden by the switch
    assert runtime.resolve(RuntimeConfig(device="cpu", precision="fp32")).precision == "fp32"


def test_switch_rejects_other_values(monkeypatch):
    monkeypatch.setenv(runtime.NATIVE_BF16_ENV, "yes")
    with pytest.raises(CnnkitError, match="CNNKIT_NATIVE_BF16 must be 0 or 1"):
        runtime.cpu_has_native_bf16()


def _bf16_bound(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Worst-case |bf16 - fp32| of one conv/linear under autocast: inputs and weights are each
    rounded to bf16 (relative error <= u), products and sums stay in fp32, so every term
    x*w is off by at most (2u + u^2)|x||w|; the sum of |x||w| is the layer applied to |x|
    with |w| and no bias. A small fp32 allowance covers the fp32 accumulation itself."""
    absolute = type(layer)(*_ctor_args(layer), bias=False)
    absolute.weight.data = layer.weight.detach().abs()
    with torch.no_grad():
        magnitude = absolute(x.abs())
    return (2 * BF16_U + BF16_U**2) * magnitude * 1.001 + 1e-6


def _ctor_args(layer: nn.Module) -> tuple:
    if isinstance(layer, nn.Linear):
        return (layer.in_features, layer.out_features)
    return (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding)


@pytest.mark.parametrize(
    "layer", [nn.Linear(64, 10), nn.Conv2d(3, 8, 3, padding=1)], ids=["linear", "conv"]
)
def test_bf16_autocast_error_is_within_the_mantissa_bound(layer):
    """The bf16 path on every machine (emulated where the CPU has no native bf16)."""
    torch.manual_seed(0)
    x = torch.randn(4, 64) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 12, 12)
    rt = runtime.Runtime(device=torch.device("cpu"), precision="bf16", channels_last=False)
    with torch.no_grad():
        exact = layer(x)
        with rt.autocast():
            low = layer(x)
    assert low.dtype == torch.bfloat16  # autocast really ran the layer in bf16
    error = (low.float() - exact).abs()
    assert error.max() > 0  # it rounded: a test that cannot tell bf16 from fp32 proves nothing
    assert (error <= _bf16_bound(layer, x)).all(), (error - _bf16_bound(layer, x)).max()
    # and fp32 is exact: no autocast context at all
    fp32 = runtime.Runtime(device=torch.device("cpu"), precision="fp32", channels_last=False)
    with torch.no_grad(), fp32.autocast():
        assert torch.equal(layer(x), exact)


def _train(tmp_path, epochs=2, **options):
    return cnnkit.train(
        "digits",
        model="simple_cnn",
        epochs=epochs,
        out_dir=str(tmp_path),
        num_workers=0,
        progress="plain",
        **options,
    )


def test_forced_bf16_run_trains_records_and_scores_in_bf16(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(runtime.NATIVE_BF16_ENV, "1")
    result = _train(tmp_path, epochs=4, report=False)
    assert "cpu bf16" in capsys.readouterr().out  # the run's one runtime line
    _, meta = load_model_file(result.run_dir / "model.safetensors")
    assert meta["precision"] == "bf16"
    assert result.test["precision"] == "bf16"
    assert result.test["acc"] >= 0.85  # as fp32 does in 4 epochs (conftest)


def test_fp32_run_on_a_bf16_machine_is_scored_and_reported_in_fp32(tmp_path, monkeypatch):
    """The user's precision reaches the final score and the report, not auto's choice."""
    monkeypatch.setenv(runtime.NATIVE_BF16_ENV, "1")  # auto would pick bf16 here
    calls = []
    resolve = runtime.resolve
    monkeypatch.setattr(runtime, "resolve", lambda *a, **k: calls.append(a) or resolve(*a, **k))
    result = _train(tmp_path, precision="fp32")
    assert len(calls) == 1  # one runtime for the run: fit, final score and report share it
    monkeypatch.setattr(runtime, "resolve", resolve)

    _, meta = load_model_file(result.run_dir / "model.safetensors")
    assert meta["precision"] == "fp32"
    saved = json.loads((result.run_dir / "test_metrics.json").read_text())
    assert saved["precision"] == "fp32"
    assert "cpu fp32" in (result.run_dir / "report.html").read_text()

    # evaluate defaults to the run's precision and gives the very same numbers as the run's score
    again = cnnkit.evaluate(result.run_dir, batch_size=128)  # the run's batches: same sums
    assert again["precision"] == "fp32" and again["loss"] == saved["loss"]
    as_bf16 = cnnkit.evaluate(result.run_dir, precision="bf16")
    assert as_bf16["precision"] == "bf16" and as_bf16["loss"] != saved["loss"]


def test_cli_verbs_take_precision(tmp_path, monkeypatch, capsys, digit_pngs):
    monkeypatch.setenv(runtime.NATIVE_BF16_ENV, "0")
    result = _train(tmp_path, report=False)  # auto on a CPU without native bf16: fp32
    capsys.readouterr()
    assert run(["eval", str(result.run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "fp32"
    assert run(["eval", str(result.run_dir), "--json", "--precision", "bf16"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "bf16"

    files = [str(p) for p, _ in digit_pngs[:8]]
    probs = {}
    for precision in ("fp32", "bf16"):
        args = ["predict", str(result.run_dir), *files, "--json", "--precision", precision]
        assert run(args) == 0
        probs[precision] = [r["top"][0]["prob"] for r in json.loads(capsys.readouterr().out)]
    assert probs["fp32"] != probs["bf16"]  # the flag reached the model
    assert probs["fp32"] == pytest.approx(probs["bf16"], abs=0.05)
    assert run(["predict", str(result.run_dir), files[0], "--precision", "fp8"]) == 2
    assert "'runtime.precision' is 'fp8'" in capsys.readouterr().err


def test_model_runtime_follows_the_file_where_the_device_allows():
    assert runtime.for_model({"precision": "fp32"}, "cpu").precision == "fp32"
    assert runtime.for_model({"precision": "bf16"}, "cpu").precision == "bf16"
    assert runtime.for_model({"precision": "bf16"}, "cpu", "fp32").precision == "fp32"
    # a GPU run's fp16 file used on a CPU: fp16 is GPU-only, so the CPU's own choice
    auto = runtime.resolve(RuntimeConfig(device="cpu")).precision
    assert runtime.for_model({"precision": "fp16"}, "cpu").precision == auto
    assert runtime.for_model({}, "cpu").precision == auto  # files that record none
