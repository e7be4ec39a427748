"""Requests/s and latency of `cnnkit serve` under concurrent single-image requests, with
micro-batching on (max batch 32) and off (max batch 1), measured back to back in the same run.

Each setting starts a real server process on a free loopback port, warms it up, then 16 client
tasks (httpx, keep-alive) send a fixed number of single-image multipart requests each and record
per-request latency. The issue's aim: batching on >= 2x the requests/s of batching off. The
clients share the machine's cores with the server, as they would on a one-box deployment.

    python benchmarks/bench_server.py runs/resnet20-cifar10-1/model.safetensors --requests 40
    (without a model: a random-weight resnet20 at 32x32)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

SETTINGS = {
    "batching on": ["--max-batch", "32", "--max-wait-ms", "5"],
    "batching off": ["--max-batch", "1"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "cnnkit", "serve", str(model), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


def images(side: int, count: int = 64) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


async def load(url: str, bodies: list[bytes], clients: int, per_client: int, raw: bool) -> dict:
    latencies: list[float] = []
    failures = 0

    async def client(worker: int) -> None:
        nonlocal failures
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            for i in range(per_client):
                body = bodies[(worker * per_client + i) % len(bodies)]
                t = time.perf_counter()
                if raw:
                    r = await http.post("/predict", content=body)
                else:
                    r = await http.post("/predict", files={"file": ("x.png", body, "image/png")})
                latencies.append(time.perf_counter() - t)
                failures += r.status_code != 200

    start_time = time.perf_counter()
    await asyncio.gather(*(client(w) for w in range(clients)))
    seconds = time.perf_counter() - start_time
    ms = 1e3 * np.array(latencies)
    return {
        "requests": len(latencies),
        "failures": failures,
        "req_per_s": len(latencies) / seconds,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def random_resnet20(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_export import random_model_file

    return random_model_file("resnet20", 32, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=40, help="per client")
    parser.add_argument("--raw", action="store_true", help="raw image bodies, not multipart")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or random_resnet20(Path(tmp))
        from cnnkit.deploy.formats import load_model

        side = load_model(model).meta["input_size"][0]
        bodies = images(side)
        kind = "raw bodies" if args.raw else "multipart"
        print(f"{model}: {side}x{side} PNGs ({kind}), {args.clients} clients x {args.requests}")
        print(f"{os.cpu_count()} cores shared by server and clients")
        results = {}
        for name, extra in SETTINGS.items():
            proc, url = start(model, extra)
            try:
                asyncio.run(load(url, bodies, args.clients, 3, args.raw))  # warm-up
                results[name] = asyncio.run(
                    load(url, bodies, args.clients, args.requests, args.raw)
                )
                health = httpx.get(url + "/health").json()
            finally:
                proc.terminate()
                proc.wait()
            r = results[name]
            print(
                f"  {name:<13} {r['req_per_s']:7.1f} req/s  p50 {r['p50_ms']:6.1f} ms  "
                f"p99 {r['p99_ms']:6.1f} ms  failures {r['failures']}  "
                f"mean batch {health['images'] / max(health['batches'], 1):.1f}"
            )
    ratio = results["batching on"]["req_per_s"] / results["batching off"]["req_per_s"]
    print(f"batching on / off: {ratio:.2f}x requests/s")


if __name__ == "__main__":
    main()
