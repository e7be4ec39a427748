"""Training FLOPs of a CIFAR-10 recipe, counted, against airbench94's.

A run's training FLOPs: for each epoch, the images it trains on (the batches a drop-last loader
gives) x the forward + backward FLOPs of one image at that epoch's side (progressive resizing),
counted with ``torch.utils.flop_counter`` on the recipe's own model; plus the optimizer's
matrix products (Muon's Newton-Schulz iterations, counted from the filter shapes). Test-time
augmentation and evaluation are not training FLOPs and are left out, as is the one-off whitening
init (a 12x12 covariance of 5000 images: under 0.1 GFLOP).

The yardstick is the issue's: airbench94 trains 10 epochs of 50,000 images at 32 px, about
0.71 GFLOP each, 355 TFLOP; ``airbench94_flops`` counts it with the same counter.

    python benchmarks/flops.py                      # speedrun and airbench94 recipes
    python benchmarks/flops.py train.epochs=6       # overrides apply to every recipe
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

import cnnkit
from cnnkit.config import Config
from cnnkit.config import resolve as resolve_config
from cnnkit.engine.fit import progressive_scales
from cnnkit.engine.loop import scaled_side
from cnnkit.engine.optim import NS_STEPS

CIFAR_TRAIN = 50_000
AIRBENCH94_EPOCHS = 10


def image_flops(cfg: Config, side: int, num_classes: int = 10) -> float:
    """Forward + backward FLOPs of one training image of ``side`` px (counted on a batch of 8)."""
    model = cnnkit.create_model(cfg.model.name, num_classes=num_classes, **cfg.model.kwargs)
    x = torch.randn(8, 3, side, side)
    if hasattr(model, "init_from_data"):
        model.init_from_data(torch.randn(64, 3, 32, 32))
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 8


def optimizer_flops_per_step(cfg: Config, num_classes: int = 10) -> float:
    """Muon: per step and filter (r x c after putting the short side first), NS_STEPS x
    (X X^T: 2 r^2 c, A A: 2 r^3, B X: 2 r^2 c); elementwise updates are left out (O(params))."""
    if cfg.optim.name != "muon":
        return 0.0
    model = cnnkit.create_model(cfg.model.name, num_classes=num_classes, **cfg.model.kwargs)
    total = 0.0
    for p in model.parameters():
        if p.ndim == 4 and p.requires_grad:
            r, c = sorted((p.shape[0], p[0].numel()))
            total += NS_STEPS * (4 * r * r * c + 2 * r**3)
    return total


def training_flops(cfg: Config, num_train: int = CIFAR_TRAIN) -> dict:
    """Training FLOPs of ``cfg`` on ``num_train`` images: total, per-epoch sides, and parts."""
    batch = cfg.data.batch_size
    steps = num_train // batch if num_train > batch else 1  # the train loader drops the last
    per_epoch_images = steps * batch
    side = cfg.data.input_size if isinstance(cfg.data.input_size, int) else 32
    sides = [scaled_side(side, s) for s in progressive_scales(cfg.train)]
    cache: dict[int, float] = {}
    net = 0.0
    for s in sides:
        if s not in cache:
            cache[s] = image_flops(cfg, s)
        net += per_epoch_images * cache[s]
    opt = optimizer_flops_per_step(cfg) * steps * len(sides)
    return {"total": net + opt, "net": net, "optimizer": opt, "sides": sides, "per_image": cache}


def airbench94_flops() -> float:
    """The yardstick: 10 epochs x 50,000 images x speedrun_net's FLOPs per image at 32 px."""
    cfg = resolve_config("digits", recipe="airbench94")
    return AIRBENCH94_EPOCHS * CIFAR_TRAIN * image_flops(cfg, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="speedrun,airbench94")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every recipe")
    args = parser.parse_args()
    base = airbench94_flops()
    print(f"airbench94 yardstick: {base / 1e12:.1f} TFLOP (10 x 50,000 images at 32 px)")
    for recipe in args.recipes.split(","):
        cfg = resolve_config("digits", recipe=recipe, overrides=args.overrides)
        f = training_flops(cfg)
        per_image = ", ".join(f"{s} px {v / 1e9:.3f}" for s, v in sorted(f["per_image"].items()))
        print(
            f"{recipe}: {cfg.train.epochs} epochs at sides {f['sides']}, batch "
            f"{cfg.data.batch_size}, optimizer {cfg.optim.name}: {f['total'] / 1e12:.1f} TFLOP "
            f"= {f['total'] / base:.3f}x airbench94 (net {f['net'] / 1e12:.1f}, optimizer "
            f"{f['optimizer'] / 1e12:.2f}); GFLOP per training image: {per_image}"
        )


if __name__ == "__main__":
    main()
