"""``cnnkit serve``: a JSON prediction API and a page to try the model, for any model format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cnnkit.cli.common import DEBUG, MODEL_PRECISION

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    model: Annotated[Path, typer.Argument(help="model.safetensors, .onnx file or run folder.")],
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    top_k: Annotated[int, typer.Option(help="Classes per image unless ?top_k= says.")] = 5,
    max_batch: Annotated[int, typer.Option(help="Images per model call; 1: no batching.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="Wait for a batch to fill, ms.")] = 5.0,
    max_pending: Annotated[int, typer.Option(help="Requests in progress; more get 503.")] = 64,
    timeout: Annotated[float, typer.Option(help="Seconds per request; over it: 504.")] = 10.0,
    max_body_mb: Annotated[float, typer.Option(help="Request body limit, MiB (413).")] = 20.0,
    max_pixels: Annotated[int, typer.Option(help="Pixels per image (413).")] = 40_000_000,
    token_env: Annotated[
        str | None,
        typer.Option(help="Environment variable holding a bearer token to require."),
    ] = None,
    precision: Annotated[str | None, MODEL_PRECISION] = None,
    debug: Annotated[bool, DEBUG] = False,
) -> None:
    """Serve POST /predict, GET /health, GET /metadata and a page at /."""
    from cnnkit.deploy.formats import require
    from cnnkit.errors import CnnkitError

    for module in ("fastapi", "uvicorn", "python_multipart"):
        require(module, "cnnkit serve")
    from cnnkit.deploy.formats import load_model
    from cnnkit.deploy.server import ServeConfig
    from cnnkit.deploy.server import serve as run_server

    token = None
    if token_env is not None:
        token = os.environ.get(token_env)
        if not token:
            raise CnnkitError(f"--token-env {token_env}: that environment variable is empty")
    if min(max_batch, max_pending, top_k) < 1 or min(timeout, max_body_mb, max_wait_ms) < 0:
        raise CnnkitError("--max-batch, --max-pending and --top-k must be >= 1; times >= 0")
    cfg = ServeConfig(
        top_k=top_k,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_pending=max_pending,
        timeout_s=timeout,
        max_body_bytes=int(max_body_mb * 2**20),
        max_pixels=max_pixels,
        token=token,
    )
    loaded = load_model(model, device="cpu")
    if host not in LOOPBACK and token is None:
        print(f"warning: serving on {host} without a token; anyone who can reach it can use it")
    print(f"serving {model} on http://{host}:{port}/  (Ctrl-C stops)", flush=True)
    run_server(loaded, cfg, host=host, port=port, precision=precision)
