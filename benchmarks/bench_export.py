"""CPU inference throughput of exported models against eager PyTorch, and the int8 accuracy cost.

For resnet20 (32x32) and resnet18 (224x224): images/s at batch N for eager fp32 (channels_last,
what `cnnkit predict` runs), ONNX Runtime fp32 and ONNX Runtime int8 (static QDQ), measured in the
same run, with ratios to eager fp32; batch-1 p50/p99 latency too. The issue's aim: int8 >= 2x eager
fp32 with <= 1 point accuracy change on CIFAR-10.

Weights are random unless --run gives a trained run folder for one of the models (its own model
is then benched, and `cnnkit export --format int8` on it prints the parity check and the accuracy
change on the run's validation split; the run's test split is scored fp32 vs int8 too). Speed does
not depend on the weights. Not a test: run it by hand, on a quiet machine if you can.

    python benchmarks/bench_export.py --run runs/resnet20-cifar10-1 --seconds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

import cnnkit
from cnnkit.data.transforms import make_preprocessing
from cnnkit.deploy.bench import bench
from cnnkit.modelfile import save_model_file

MODELS = {"resnet20": 32, "resnet18": 224}


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )


def random_model_file(name: str, side: int, folder: Path) -> Path:
    """A model file with random weights and the metadata a trained one would carry."""
    model = cnnkit.create_model(name, num_classes=10)
    cfg = model.default_cfg
    pre = make_preprocessing(3, (side, side), cfg["mean"], cfg["std"], crop="center")
    meta = {
        "arch": name,
        "kwargs": {},
        "num_classes": 10,
        "in_chans": 3,
        "classes": [f"c{i}" for i in range(10)],
        "input_size": [side, side],
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "preprocessing": pre,
        "cnnkit_version": cnnkit.__version__,
    }
    path = folder / f"{name}.safetensors"
    save_model_file(path, model.state_dict(), meta)
    return path


def int8_accuracy(run: Path) -> None:
    """`cnnkit export --format int8` on the run, then fp32 vs int8 accuracy on its test split.

    When the export's parity gate refuses (top-1 agreement < 99%), the same int8 model is
    written without the gate, so the accuracy change is still measured and printed."""
    from cnnkit.deploy.export import export, parity_data, write_int8
    from cnnkit.errors import CnnkitError

    source = run / "model.safetensors"
    try:
        path = export(source, "int8").path
        print(f"int8 export passed its parity check: {path}")
    except CnnkitError as e:
        print(f"int8 export refused: {e}")
        model = cnnkit.load_model(source)
        path = run / "model.int8-ungated.onnx"
        write_int8(model, path, parity_data(source, model.meta, None).calibration)
    fp32 = cnnkit.evaluate(source, device="cpu")
    int8 = cnnkit.evaluate(path, device="cpu")
    change = 100 * (int8["acc"] - fp32["acc"])
    print(
        f"{fp32['split']} split ({fp32['images']} images): fp32 acc {fp32['acc']:.4f}, "
        f"int8 acc {int8['acc']:.4f}, change {change:+.2f} points"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="trained run folder of resnet20 or resnet18")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    print(machine())
    trained = cnnkit.load_model(args.run).meta["arch"] if args.run else None
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, side in MODELS.items():
            path = args.run / "model.safetensors" if name == trained else None
            path = path or random_model_file(name, side, Path(tmp))
            rows[name] = bench(path, args.batch_size, args.seconds, ["eager", "ort", "int8"])
            print(f"\n{name} {side}x{side} ({'trained' if name == trained else 'random weights'})")
            for r in rows[name]:
                print(
                    f"  {r['runtime']:<11} {r['throughput']:8.0f} images/s (b={args.batch_size})"
                    f"  {r['speedup']:.2f}x eager   b=1 p50 {r['latency_p50_ms']:.2f} ms"
                    f"  p99 {r['latency_p99_ms']:.2f} ms"
                )
    if args.run:
        print()
        int8_accuracy(args.run)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
