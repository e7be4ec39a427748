"""Training-step speed: cnnkit's runtime choices and fit loop against a hand-written loop.

Prints the machine, torch version and settings, then for each model:
  * images/s of a minimal hand-written PyTorch loop in fp32 NCHW (the baseline),
  * images/s for each precision x layout x compile setting, its ratio to the baseline, the
    achieved GFLOP/s (forward + backward, counted with torch.utils.flop_counter) and the fraction
    of this machine's matmul peak measured in the same run (fp32 and bf16),
  * "auto" (what cnnkit picks here) and cnnkit's own loop (``train_one_epoch``) against the
    hand-written loop on the same in-memory batches, both in the auto precision and layout, so
    the ratio is the loop's overhead alone (target <= 1.05x).

Timings alternate between variants and report the median of ``--repeats`` rounds, so a noisy
(shared) machine hurts all of them alike. Not a test: run it by hand, e.g.

    python benchmarks/train_step.py --models simple_cnn,resnet20 --batch-size 256
    python benchmarks/train_step.py --models resnet20 --compile      # adds torch.compile rows
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import cnnkit
from cnnkit.config import RuntimeConfig
from cnnkit.engine import runtime
from cnnkit.engine.loop import StepTools, train_one_epoch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048) -> float:
    """GFLOP/s of a large square matmul: the machine's practical peak for that dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """FLOPs of one forward + backward at this batch."""
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


class Variant:
    """One setting of a training step, timed on a fixed batch."""

    def __init__(self, name, model_name, shape, classes, device, precision, channels_last, comp):
        torch.manual_seed(0)
        self.name = name
        self.rt = runtime.Runtime(device, precision, channels_last, comp)
        model = build(model_name, classes, shape)
        self.model = model.to(device, memory_format=self.rt.memory_format).train()
        self.step_model = torch.compile(self.model) if comp else self.model
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        self.x = torch.randn(*shape, device=device).contiguous(memory_format=self.rt.memory_format)
        self.y = torch.randint(classes, (shape[0],), device=device)
        start = time.perf_counter()
        self.step()
        sync(device)
        self.warmup = time.perf_counter() - start

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with self.rt.autocast():
            loss = nn.functional.cross_entropy(self.step_model(self.x).float(), self.y)
        loss.backward()
        self.opt.step()

    def time(self, steps: int) -> float:
        sync(self.rt.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.rt.device)
        return (time.perf_counter() - start) / steps


def build(model_name: str, classes: int, shape) -> nn.Module:
    """A zoo model; data-initialised layers (speedrun_net's whitening) get random images."""
    model = cnnkit.create_model(model_name, num_classes=classes, in_chans=shape[1])
    if hasattr(model, "init_from_data"):
        g = torch.Generator().manual_seed(1)
        model.init_from_data(torch.randn(512, *shape[1:], generator=g))
    return model


def hand_loop(model, opt, batches, rt: runtime.Runtime) -> float:
    """The textbook loop over in-memory batches, in ``rt``'s precision: seconds per step."""
    sync(rt.device)
    start = time.perf_counter()
    for x, y in batches:
        with rt.autocast():  # as cnnkit's step does, so only the loop around it differs
            loss = nn.functional.cross_entropy(model(x).float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(rt.device)
    return (time.perf_counter() - start) / len(batches)


def fit_loop_overhead(model_name, shape, classes, device, steps: int, repeats: int) -> None:
    """cnnkit's train_one_epoch vs the hand loop: same model, optimizer, batches, precision and
    layout (cnnkit's auto choice here)."""
    rt = runtime.resolve(RuntimeConfig(device=str(device)))
    models, opts = [], []
    for _ in range(2):
        torch.manual_seed(0)
        m = build(model_name, classes, shape)
        m = m.to(device, memory_format=rt.memory_format).train()
        models.append(m)
        opts.append(torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True))
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(*shape, generator=g).to(device).contiguous(memory_format=rt.memory_format),
            torch.randint(classes, (shape[0],), generator=g).to(device),
        )
        for _ in range(steps)
    ]
    tools = StepTools(optimizer=opts[1], loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1))
    hand, ours = [], []
    hand_loop(models[0], opts[0], batches[:2], rt)  # warm-up
    train_one_epoch(models[1], batches[:2], tools, rt)
    for _ in range(repeats):
        hand.append(hand_loop(models[0], opts[0], batches, rt))
        ours.append(train_one_epoch(models[1], batches, tools, rt)["seconds"] / steps)
    h, o = statistics.median(hand), statistics.median(ours)
    print(
        f"  fit loop, both in {rt.describe()}: cnnkit train_one_epoch {o * 1e3:.1f} ms/step, "
        f"hand-written loop {h * 1e3:.1f} ms/step -> overhead {o / h:.3f}x (target <= 1.05x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="simple_cnn,resnet20")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--size", type=int, default=32, help="input side in pixels")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--emulated-bf16", action="store_true", help="time bf16 without native")
    args = parser.parse_args()

    device = runtime.resolve_device(args.device)
    torch.set_num_threads(runtime.auto_threads())
    print(f"machine: {machine()}")
    native_bf16 = device.type != "cpu" or runtime.cpu_has_native_bf16()
    peaks = {"fp32": matmul_peak(torch.float32, device)}
    if native_bf16 or args.emulated_bf16:
        peaks["bf16"] = matmul_peak(torch.bfloat16, device)
    shown = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items())
    print(f"matmul peak: {shown}")
    if "bf16" not in peaks:
        print("bf16 rows skipped: this CPU has no native bf16 (emulated bf16 is many times slower")
        print("than fp32, which is why precision auto picks fp32 here; --emulated-bf16 to time it)")
    print(
        f"settings: batch {args.batch_size}, {args.size}x{args.size} RGB, 10 classes, "
        f"{args.steps} steps x {args.repeats} rounds (median), SGD Nesterov"
    )
    auto = runtime.resolve(RuntimeConfig(device=str(device)))
    auto_name = f"{auto.precision} {'channels_last' if auto.channels_last else 'NCHW'}"
    print(
        "precision per row: the baseline runs fp32 NCHW and each other row the precision and "
        "layout in its name ('x baseline' is the speed-up that setting gives); the fit loop runs "
        f"cnnkit's loop and the hand-written loop both in auto ({auto_name})"
    )
    precisions = ["fp32", "bf16"] if "bf16" in peaks else ["fp32"]
    if device.type == "cuda":
        precisions = ["fp32", auto.precision]
    for model_name in args.models.split(","):
        shape = (args.batch_size, 3, args.size, args.size)
        print(f"\n{model_name}:")
        probe = build(model_name, 10, shape)
        flops = step_flops(probe, torch.randn(*shape), torch.randint(10, (shape[0],)))
        variants = [
            Variant("baseline fp32 NCHW", model_name, shape, 10, device, "fp32", False, False)
        ]
        for precision in precisions:
            for layout in (False, True):
                for comp in (False, True) if args.compile else (False,):
                    name = f"{precision} {'channels_last' if layout else 'NCHW'}"
                    name += " compiled" if comp else ""
                    variants.append(
                        Variant(name, model_name, shape, 10, device, precision, layout, comp)
                    )
        times: dict[str, list[float]] = {v.name: [] for v in variants}
        for _ in range(args.repeats):
            for v in variants:
                times[v.name].append(v.time(args.steps))
        base = statistics.median(times[variants[0].name])
        for v in variants:
            t = statistics.median(times[v.name])
            gflops = flops / t / 1e9
            kind = "fp32" if v.rt.precision == "fp32" else "bf16"
            peak = peaks[kind]
            mark = "  <- auto" if v.name == auto_name else ""
            warm = f", warm-up {v.warmup:.1f} s" if v.rt.compile else ""
            print(
                f"  {v.name:28s} {args.batch_size / t:8.0f} img/s  {base / t:5.2f}x baseline  "
                f"{gflops:7.1f} GFLOP/s  {gflops / peak:5.1%} of {kind} peak{warm}{mark}"
            )
        fit_loop_overhead(model_name, shape, 10, device, args.steps * 2, args.repeats)


if __name__ == "__main__":
    main()
