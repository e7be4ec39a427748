"""Runtime choices: precision by hardware, threads, OOM back-off, auto batch size, compile."""

from __future__ import annotations

import contextlib

import pytest
import torch
import yaml
from torch import nn

import cnnkit
from cnnkit.config import RuntimeConfig
from cnnkit.engine import runtime
from cnnkit.engine.loop import StepTools, _train_step
from cnnkit.engine.tuning import auto_batch_size
from cnnkit.errors import CnnkitError


@pytest.mark.parametrize(
    "device, native_bf16, cuda_bf16, expected",
    [
        ("cpu", True, False, "bf16"),  # AVX512-BF16 / AMX: autocast pays
        ("cpu", False, False, "fp32"),  # emulated bf16 is slower than fp32
        ("cuda", False, True, "bf16"),  # Ampere and newer
        ("cuda", False, False, "fp16"),  # older GPUs: fp16 with a grad scaler
        ("mps", True, True, "fp32"),
    ],
)
def test_auto_precision_follows_the_hardware(monkeypatch, device, native_bf16, cuda_bf16, expected):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    assert runtime._precision("auto", torch.device(device)) == expected
    assert runtime._precision("fp32", torch.device(device)) == "fp32"


def test_precision_and_compile_errors():
    with pytest.raises(CnnkitError, match="fp16 is for GPUs"):
        runtime._precision("fp16", torch.device("cpu"))
    with pytest.raises(CnnkitError, match="auto, fp32, bf16 or fp16"):
        runtime._precision("half", torch.device("cpu"))
    with pytest.raises(CnnkitError, match="runtime.compile must be auto, on or off"):
        runtime._compile("yes", torch.device("cpu"))
    assert runtime._compile("auto", torch.device("cpu")) is False
    assert runtime._compile("auto", torch.device("cuda")) is True


def test_autocast_computes_convs_and_linears_in_the_runs_precision():
    torch.manual_seed(0)
    conv, linear = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)  # float32 weights, as a model has them
    x = torch.randn(2, 3, 8, 8)
    bf16 = runtime.resolve(RuntimeConfig(device="cpu", precision="bf16"))
    with bf16.autocast():
        features = conv(x)
        logits = linear(features.mean((2, 3)))
    assert features.dtype == logits.dtype == torch.bfloat16
    assert conv(x).dtype == torch.float32  # only inside the context
    fp32 = runtime.resolve(RuntimeConfig(device="cpu", precision="fp32"))
    context = fp32.autocast()
    assert isinstance(context, contextlib.nullcontext)
    with context:
        assert not torch.is_autocast_enabled("cpu")
        assert linear(conv(x).mean((2, 3))).dtype == torch.float32


def test_grad_scaler_only_for_fp16():
    assert runtime.Runtime(torch.device("cpu"), "bf16", True).grad_scaler() is None
    assert runtime.Runtime(torch.device("cpu"), "fp32", True).grad_scaler() is None


def test_threads_never_exceed_the_cores_we_may_use(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0})
    assert runtime.auto_threads() == 1
    before = torch.get_num_threads()
    try:
        runtime.resolve(RuntimeConfig(device="cpu", threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(CnnkitError, match="runtime.threads"):
        runtime.resolve(RuntimeConfig(threads=0))


class RunsOutOfMemory(nn.Module):
    """A model without batch norm that 'runs out of memory' on batches above ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5))

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated for the test)")
        return self.net(x)


def test_out_of_memory_step_is_redone_in_micro_batches_with_the_same_result():
    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 8, 8), torch.randint(5, (16,))
    reference = RunsOutOfMemory(limit=16)
    small = RunsOutOfMemory(limit=4)
    small.load_state_dict(reference.state_dict())
    rt = runtime.Runtime(torch.device("cpu"), "fp32", False)
    notes: list[str] = []
    results = []
    for model in (reference, small):
        tools = StepTools(
            optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
            loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1),
            note=notes.append,
        )
        loss, logits = _train_step(model, images, labels, tools, rt)
        results.append((loss, logits, tools.accum))
    assert results[0][2] == 1 and results[1][2] == 4  # 16 -> 8 -> 4 images per micro-batch
    assert len(notes) == 2 and "same effective batch" in notes[-1]
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    for a, b in zip(reference.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_out_of_memory_at_one_image_is_a_clear_error():
    model = RunsOutOfMemory(limit=0)
    tools = StepTools(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(),
        note=lambda m: None,
    )
    rt = runtime.Runtime(torch.device("cpu"), "fp32", False)
    with pytest.raises(CnnkitError, match="even with one image"):
        _train_step(model, torch.randn(4, 3, 8, 8), torch.randint(5, (4,)), tools, rt)


def test_auto_batch_size_on_cpu_times_powers_of_two_and_leaves_the_model_alone():
    model = cnnkit.create_model("test_simple_cnn", num_classes=10, in_chans=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rt = runtime.Runtime(torch.device("cpu"), "fp32", True)
    notes: list[str] = []
    size = auto_batch_size(model, rt, (1, 8, 8), 10, train_size=1000, note=notes.append)
    assert size in (16, 32, 64, 128)  # at most 1000 // 8
    assert "img/s" in notes[0] and f"batch size auto: {size}" in notes[0]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_train_with_auto_batch_size_records_the_chosen_size(tmp_path):
    result = cnnkit.train(
        model="test_simple_cnn",
        epochs=1,
        batch_size="auto",
        out_dir=str(tmp_path),
        overrides=["train.progress=plain"],
    )
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert isinstance(saved["data"]["batch_size"], int) and saved["data"]["batch_size"] >= 16
    with pytest.raises(CnnkitError, match="positive integer or 'auto'"):
        cnnkit.train(model="test_simple_cnn", batch_size="big", out_dir=str(tmp_path))


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """torch.compile on the CPU (needs a C++ compiler): same accuracy as eager on digits."""
    accs = []
    for mode in ("off", "on"):
        result = cnnkit.train(
            model="test_simple_cnn",
            epochs=3,
            out_dir=str(tmp_path),
            overrides=[f"runtime.compile={mode}", "train.progress=plain"],
        )
        accs.append(result.test["acc"])
    assert abs(accs[0] - accs[1]) < 0.03
