"""Time to accuracy on CIFAR-10 given as a folder: the speedrun recipe against the default one.

For each recipe and seed it runs ``cnnkit.train`` end to end and prints the final test accuracy
(with the recipe's test-time augmentation), the wall time, the training time (sum of the epochs'
train passes) and the one-time costs apart: data scan/decode before training, the whitening
init (``init_from_data``), the final evaluation; then the mean and spread over ``--seeds``.
It also prints the networks' training FLOPs per image (``torch.utils.flop_counter``), the
achieved GFLOP/s and the machine's measured fp32 matmul peak, and the speedrun/default ratios.
Not a test: run it by hand, e.g.

    python benchmarks/cifar10.py --data /tmp/cifar10-lead --recipes speedrun --seeds 1
    python benchmarks/cifar10.py --data /tmp/cifar10-lead --recipes speedrun,default --seeds 3

(``/tmp/cifar10-lead`` holds train/<class>/*.jpg and test/<class>/*.jpg, extracted from
../shared/data/cifar10-jpeg.tar.gz.) ``--epochs`` and ``--widths`` shrink the run for a slow CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from flops import airbench94_flops, image_flops, training_flops
from torch import nn

import cnnkit
from cnnkit import data as cnnkit_data
from cnnkit.config import resolve as resolve_config
from cnnkit.engine import runtime
from cnnkit.engine.fit import progressive_scales
from cnnkit.engine.loop import scaled_side
from cnnkit.engine.optim import orthogonalise
from cnnkit.engine.runtime import cpu_has_native_bf16
from cnnkit.recipes import preset

FULL_EPOCHS = preset("speedrun")["train"]["epochs"]  # what the end-of-run overhead is judged on


def machine() -> str:
    cpu = "unknown cpu"
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in info.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, native bf16 {cpu_has_native_bf16()}, "
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, cuda {torch.cuda.is_available()}"
    )


def matmul_peak_gflops(size: int = 2048, seconds: float = 2.0) -> float:
    """fp32 GFLOP/s of a large square matmul: the machine's practical peak right now."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def overrides_for(recipe: str, args) -> list[str]:
    items = [f"train.epochs={args.epochs}"] if args.epochs else []
    if args.widths and recipe in ("speedrun", "airbench94"):
        items.append(f"model.kwargs={{widths: [{args.widths}]}}")
    return items


def run_once(data: str, recipe: str, seed: int, overrides: list[str], out: str) -> dict:
    start = time.perf_counter()
    result = cnnkit.train(
        data, recipe=recipe, seed=seed, overrides=overrides, out_dir=out, progress="plain"
    )
    wall = time.perf_counter() - start
    rows, timings = result.fit.history, result.fit.timings
    train_s = sum(r["epoch_time"] for r in rows)
    images = sum(r["images_per_s"] * r["epoch_time"] for r in rows)
    init = timings.get("init_from_data", 0.0)
    final = timings.get("final_eval", 0.0)
    report_s = timings.get("report", 0.0)
    return {
        "acc": result.test["acc"],
        "wall": wall,
        "train": train_s,
        "images_per_s": images / max(train_s, 1e-9),
        "init": init,
        "final_eval": final,
        "report": report_s,
        "other": wall - train_s - init - final - report_s,
        "epochs": len(rows),
        "epoch_s": train_s / max(len(rows), 1),
        "rows": rows,
    }


def report(recipe: str, runs: list[dict], gflop: float, peak: float) -> None:
    def stat(key: str, fmt: str) -> str:
        values = [r[key] for r in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{format(statistics.mean(values), fmt)} +/- {format(spread, fmt)}"

    ips = statistics.mean(r["images_per_s"] for r in runs)
    print(
        f"{recipe}: {len(runs)} seed(s), {runs[0]['epochs']} epochs: test acc {stat('acc', '.4f')}"
        f", wall {stat('wall', '.0f')} s, of which training {stat('train', '.0f')} s "
        f"({ips:.0f} img/s, {ips * gflop:.1f} GFLOP/s = {ips * gflop / peak:.0%} of the fp32 "
        f"matmul peak), whitening init "
        f"{stat('init', '.1f')} s, final eval {stat('final_eval', '.0f')} s, other (data scan/"
        f"decode, validation, checkpoints) {stat('other', '.0f')} s",
        flush=True,
    )


# --- the reference: the recipe as the loop a person would write -------------------------------
# Same net (cnnkit's speedrun_net class, imported: the point is the loop), same hyperparameters
# (read from the resolved cnnkit config), same precision and layout (cnnkit's runtime choice),
# data already in memory as uint8. Nothing of cnnkit's loop, loaders, optimizer or callbacks.


def reference_data(cfg) -> dict:
    """Train and test images decoded once by cnnkit (not timed) as uint8 (N, C, H, W) tensors."""
    splits = cnnkit_data.build(cfg.data, seed=cfg.train.seed)
    for split in (splits.train, splits.test):
        if getattr(split, "decoded", None) is None:
            raise SystemExit("--reference needs the images decoded in memory (data.decode_cache)")
    return {
        "train": (splits.train.decoded.images, torch.tensor(splits.train.targets)),
        "test": (splits.test.decoded.images, torch.tensor(splits.test.targets)),
        "mean": torch.tensor(splits.mean).view(1, -1, 1, 1) * 255,
        "std": torch.tensor(splits.std).view(1, -1, 1, 1) * 255,
        "augment": splits.augment,
        "classes": len(splits.classes),
    }


def random_crop(x: torch.Tensor, pad: int, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Pad uint8 (B, C, H, W) by ``pad`` and crop each image back at a random offset."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad,) * 4, mode="reflect" if mode == "reflect" else "constant")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=gen)
    out = torch.empty_like(x)
    for oy in range(2 * pad + 1):  # images grouped by offset: a slice copy per group
        for ox in range(2 * pad + 1):
            sel = ((dy == oy) & (dx == ox)).nonzero()[:, 0]
            out[sel] = padded[sel, :, oy : oy + h, ox : ox + w]
    return out


def reference_batches(d: dict, batch: int, epoch: int, coins, gen, layout):
    """One epoch of (normalised float images, labels); the last partial batch dropped."""
    images, labels = d["train"]
    aug, order = d["augment"], torch.randperm(len(labels), generator=gen)
    for i in range(len(labels) // batch):
        idx = order[i * batch : (i + 1) * batch]
        x = images[idx]  # uint8 (B, C, H, W): geometry on bytes, then float once
        if aug.pad_crop:
            x = random_crop(x, aug.pad_crop, aug.pad_mode, gen)
        if aug.hflip == "alternate":  # a fixed coin per image, inverted on odd epochs
            flip = coins[idx] ^ bool(epoch % 2)
        else:
            flip = torch.rand(len(idx), generator=gen) < (aug.hflip or 0.0)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        x = x.contiguous(memory_format=layout).float()
        yield x.sub_(d["mean"]).div_(d["std"]), labels[idx]


def triangle(step: int, total: int) -> float:
    """airbench's lr factor: 0.2 -> 1 linearly until 23% of the steps, then down to 0.07."""
    peak = max(1, round(0.23 * total))
    if step < peak:
        return 0.2 + 0.8 * step / peak
    return 1 - 0.93 * min(1.0, (step - peak) / max(1, total - peak))


def linear(step: int, total: int) -> float:
    """airbench94_muon's lr factor: 1 -> 0 linearly over the run."""
    return max(0.0, 1 - step / total)


SCHEDULES = {"triangle": triangle, "linear": linear}


class ReferenceMuon(torch.optim.Optimizer):
    """Muon as its paper writes it, for 4-d conv filters: Nesterov momentum, the filter's norm
    reset to sqrt(out), minus lr x the orthogonalised direction (cnnkit's Newton-Schulz)."""

    def __init__(self, params, lr: float, momentum: float):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(p.grad)
                d = p.grad.add(buf, alpha=g["momentum"])
                p.mul_(p.shape[0] ** 0.5 / p.norm())
                p.sub_(g["lr"] * orthogonalise(d.reshape(len(d), -1)).view_as(d))


def reference_sgd(model: nn.Module, oc, early_steps: int = 0) -> list[torch.optim.Optimizer]:
    """Nesterov SGD: conv/linear weights decay; batch-norm biases at norm_bias_lr_mult x lr;
    decoupled decay (weight_decay is the shrink per step at peak lr, so divided by the lr).
    ``early_steps``: unused (airbench94 trains its whitening bias all run)."""
    bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    weights = [p for p in model.parameters() if p.ndim > 1]
    raised = [p for p in model.parameters() if id(p) in bn_biases]
    other = [p for p in model.parameters() if p.ndim <= 1 and id(p) not in bn_biases]
    wd = oc.weight_decay / oc.lr if oc.decoupled_wd else oc.weight_decay
    groups = [
        {"params": weights, "lr": oc.lr, "weight_decay": wd},
        {"params": raised, "lr": oc.lr * oc.norm_bias_lr_mult, "weight_decay": 0.0},
        {"params": other, "lr": oc.lr, "weight_decay": 0.0},
    ]
    for g in groups:
        g["peak_lr"] = g["lr"]
    sgd = torch.optim.SGD(
        groups, lr=oc.lr, momentum=oc.momentum, nesterov=oc.nesterov, foreach=True
    )
    return [sgd]


def reference_muon(model: nn.Module, oc, early_steps: int = 0) -> list[torch.optim.Optimizer]:
    """Muon over the conv filters; Nesterov SGD over the head (decaying), the batch-norm biases
    (raised lr) and the whitening bias (raised lr, trained for ``early_steps`` only)."""
    filters = [p for p in model.parameters() if p.ndim == 4 and p.requires_grad]
    bn_biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    head = [p for p in model.parameters() if p.ndim == 2]
    whiten = [model.whiten.bias]
    raised = oc.lr * oc.norm_bias_lr_mult
    groups = [
        {"params": head, "lr": oc.lr, "weight_decay": oc.weight_decay / oc.lr},
        {"params": bn_biases, "lr": raised, "weight_decay": 0.0},
        {"params": whiten, "lr": raised, "weight_decay": 0.0, "until": early_steps},
    ]
    muon = ReferenceMuon(filters, lr=oc.muon_lr, momentum=oc.muon_momentum)
    sgd = torch.optim.SGD(groups, lr=oc.lr, momentum=oc.momentum, nesterov=True, foreach=True)
    for g in [*groups, *muon.param_groups]:
        g["peak_lr"] = g["lr"]
    return [sgd, muon]


# optim.name -> builder of the optimizers that together update every parameter
REFERENCE_OPTIMIZERS = {"sgd": reference_sgd, "muon": reference_muon}


def reference_run(cfg, d: dict, rt, phase=None) -> dict:
    """Train as the recipe says; per-epoch seconds and img/s, and the plain test accuracy.
    ``phase(name)``: a context timing a part of the step (``speedrun_profile.py``)."""
    phase = phase or (lambda name: contextlib.nullcontext())
    tc, oc, batch = cfg.train, cfg.optim, cfg.data.batch_size
    if oc.scheduler not in SCHEDULES:
        raise SystemExit(f"--reference knows {', '.join(SCHEDULES)} schedules, not {oc.scheduler}")
    schedule = SCHEDULES[oc.scheduler]
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    images, labels = d["train"]
    model = cnnkit.create_model(cfg.model.name, num_classes=d["classes"], **cfg.model.kwargs)
    model.init_from_data(images[:5000])
    model = model.to(rt.device, memory_format=rt.memory_format)
    steps = len(labels) // batch
    total = tc.epochs * steps
    early = round((oc.whiten_bias_epochs or 0) * steps)
    optimizers = REFERENCE_OPTIMIZERS[oc.name](model, oc, early)
    # progressive resizing: the side of each epoch, as cnnkit schedules it
    sides = [scaled_side(images.shape[-1], scale) for scale in progressive_scales(tc)]
    fast = [t for t in model.state_dict().values() if t.is_floating_point()]
    slow = [t.clone() for t in fast]  # lookahead's slow weights (and batch-norm statistics)
    coins = torch.rand(len(labels), generator=gen) < 0.5
    step, epochs = 0, []
    for epoch in range(tc.epochs):
        model.train()
        loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.long)
        start, cpu = time.perf_counter(), time.process_time()
        batches = reference_batches(d, batch, epoch, coins, gen, rt.memory_format)
        for x, y in timed(batches, phase, "data"):
            with phase("lr schedule"):
                for opt in optimizers:
                    for g in opt.param_groups:
                        if g.get("until"):  # the whitening bias: down to 0 at its own step
                            g["lr"] = g["peak_lr"] * max(0.0, 1 - step / g["until"])
                        else:
                            g["lr"] = g["peak_lr"] * schedule(step, total)
                if sides[epoch] != x.shape[-1]:
                    x = F.interpolate(x, size=sides[epoch], mode="bilinear", antialias=True)
            with phase("forward+backward"):
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                with rt.autocast():
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=tc.label_smoothing)
                loss.backward()
            with phase("optimizer"):
                for opt in optimizers:
                    opt.step()
            step += 1
            with phase("lookahead"):
                if tc.lookahead and (step % tc.lookahead_every == 0 or step == total):
                    decay = 0.95**tc.lookahead_every * (step / total) ** 3 if step < total else 1
                    with torch.no_grad():
                        for f, s in zip(fast, slow, strict=True):
                            f.copy_(s.lerp_(f, 1 - decay))
            with phase("metrics"):
                loss_sum += loss.detach()
                correct += (logits.argmax(1) == y).sum()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        ips = steps * batch / seconds
        epochs.append({"seconds": seconds, "cpu_seconds": cpu, "images_per_s": ips})
        print(
            f"  reference epoch {epoch + 1}: {seconds:.1f} s, {ips:.0f} img/s,"
            f" train loss {loss_sum.item() / steps:.4f} acc {correct.item() / (steps * batch):.4f}",
            flush=True,
        )
    return {"epochs": epochs, "test_acc": reference_test_acc(model, d, rt, batch)}


def timed(iterable, phase, name: str):
    """``iterable``'s items, the time to make each one counted as phase ``name``."""
    iterator = iter(iterable)
    while True:
        with phase(name):
            item = next(iterator, None)
        if item is None:
            return
        yield item


def warm_up(cfg, d: dict, rt, steps: int = 2) -> None:
    """A few untimed training steps, so neither side's first epoch pays for creating the
    kernels (oneDNN primitives) of these shapes."""
    images, labels = d["train"]
    batch = cfg.data.batch_size
    model = cnnkit.create_model(cfg.model.name, num_classes=d["classes"], **cfg.model.kwargs)
    model.init_from_data(images[:batch])
    model = model.to(rt.device, memory_format=rt.memory_format).train()
    optimizer = REFERENCE_OPTIMIZERS[cfg.optim.name](model, cfg.optim)
    gen = torch.Generator().manual_seed(0)
    coins = torch.zeros(len(labels), dtype=torch.bool)
    batches = reference_batches(d, batch, 0, coins, gen, rt.memory_format)
    for _, (x, y) in zip(range(steps), batches, strict=False):
        with rt.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        for opt in optimizer:
            opt.step()


@torch.inference_mode()
def reference_test_acc(model: nn.Module, d: dict, rt, batch: int) -> float:
    """Plain (no TTA) test accuracy: a check that the reference trained like the recipe."""
    model.eval()
    images, labels = d["test"]
    correct = 0
    for i in range(0, len(labels), batch):
        x = images[i : i + batch].contiguous(memory_format=rt.memory_format).float()
        with rt.autocast():
            logits = model(x.sub_(d["mean"]).div_(d["std"]))
        correct += int((logits.argmax(1) == labels[i : i + batch]).sum())
    return correct / len(labels)


def reference_main(args) -> None:
    """ref, cnnkit, ref, cnnkit, ...: epoch throughput of both in one sitting, and the ratio."""
    recipe = args.recipes.split(",")[0]
    overrides = overrides_for(recipe, args)
    cfg = resolve_config(args.data, recipe=recipe, overrides=overrides)
    rt = runtime.resolve(cfg.runtime)
    print(f"settings: data {args.data}, {args.rounds} round(s) of ref + cnnkit, overrides "
          f"{overrides}; {rt.describe()}; model {cfg.model.name} {cfg.model.kwargs}; "
          f"optim {cfg.optim}; train epochs {cfg.train.epochs} smoothing "
          f"{cfg.train.label_smoothing} lookahead {cfg.train.lookahead_every} tta {cfg.train.tta}",
          flush=True)  # fmt: skip
    start = time.perf_counter()
    d = reference_data(cfg)
    print(f"decoded (not timed in the epochs): {time.perf_counter() - start:.1f} s; augment "
          f"{d['augment']}", flush=True)  # fmt: skip
    warm_up(cfg, d, rt)
    ref, ours = [], []
    for round_ in range(args.rounds):
        result = reference_run(cfg, d, rt)
        ref += result["epochs"]
        print(f"round {round_ + 1} reference: test acc (no TTA) {result['test_acc']:.4f}")
        with tempfile.TemporaryDirectory() as out:
            run = run_once(args.data, recipe, cfg.train.seed, overrides, out)
        ours += run.pop("rows")
        print(f"round {round_ + 1} cnnkit: {run}", flush=True)
        tail = run["final_eval"] + run["report"]
        print(
            f"round {round_ + 1} cnnkit end of run: final eval with TTA {run['final_eval']:.1f} s"
            f" + report {run['report']:.1f} s = {tail:.1f} s = {tail / run['wall']:.1%} of this "
            f"run's wall {run['wall']:.0f} s; of a {FULL_EPOCHS}-epoch run at this epoch speed: "
            f"{tail / (run['wall'] + (FULL_EPOCHS - run['epochs']) * run['epoch_s']):.1%}",
            flush=True,
        )
    ref_ips = statistics.median(e["images_per_s"] for e in ref)
    our_ips = statistics.median(r["images_per_s"] for r in ours)
    print(
        f"reference: median epoch {statistics.median(e['seconds'] for e in ref):.1f} s, "
        f"{ref_ips:.0f} img/s; cnnkit: median epoch "
        f"{statistics.median(r['epoch_time'] for r in ours):.1f} s, {our_ips:.0f} img/s; "
        f"ratio cnnkit/reference throughput {our_ips / ref_ips:.3f}x",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/tmp/cifar10-lead", help="folder with train/ and test/")
    parser.add_argument("--recipes", default="speedrun,default", help="comma-separated")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs")
    parser.add_argument("--widths", default=None, help="speedrun_net widths, e.g. 32,128,128")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="speedrun only: a hand-written loop of the recipe against cnnkit.train, alternated",
    )
    parser.add_argument("--rounds", type=int, default=2, help="--reference: ref+cnnkit rounds")
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    print(f"machine: {machine()}")
    if args.reference:
        reference_main(args)
        return
    peak = matmul_peak_gflops()
    print(f"measured fp32 matmul peak: {peak:.0f} GFLOP/s (contended machines read low)")
    print(
        f"settings: data {args.data}, recipes {recipes}, seeds {args.seeds}, "
        f"epochs {args.epochs or 'recipe'}, speedrun widths {args.widths or 'recipe'}"
    )
    summary = {}
    airbench94 = airbench94_flops()
    for recipe in recipes:
        overrides = overrides_for(recipe, args)
        cfg = resolve_config(args.data, recipe=recipe, overrides=overrides)
        gflop = image_flops(cfg, 32) / 1e9
        flops = training_flops(cfg)
        print(
            f"{recipe}: model {cfg.model.name} {cfg.model.kwargs}, batch {cfg.data.batch_size}, "
            f"{cfg.train.epochs} epochs at sides {flops['sides']}, optimizer {cfg.optim.name}, "
            f"tta {cfg.train.tta}, {gflop:.3f} GFLOP per training image at 32 px; training "
            f"{flops['total'] / 1e12:.1f} TFLOP = {flops['total'] / airbench94:.3f}x airbench94's "
            f"{airbench94 / 1e12:.0f}; overrides {overrides}",
            flush=True,
        )
        runs = []
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as out:
                runs.append(run_once(args.data, recipe, seed, overrides, out))
            runs[-1].pop("rows")
            print(f"{recipe} seed {seed}: {runs[-1]}", flush=True)
        report(recipe, runs, gflop, peak)
        summary[recipe] = runs
    if "speedrun" in summary and "default" in summary:
        fast, base = summary["speedrun"], summary["default"]
        ratio = statistics.mean(r["wall"] for r in base) / statistics.mean(r["wall"] for r in fast)
        print(f"ratio default/speedrun wall time: {ratio:.2f}x")


if __name__ == "__main__":
    main()
