"""The prediction server: a FastAPI app around one ``Predictor``, with micro-batching and limits.

Routes: ``POST /predict`` (multipart files, any field name, or one raw image as the body; returns
``{"results": [{"name", "top": [{"class", "index", "prob"}]}]}``), ``GET /health``,
``GET /metadata`` (``task`` says which answer ``/predict`` gives) and ``GET /`` (a page to drop an
image on). The model is loaded once at start; nothing a request says can make the server open a
file.

A segmentation model answers each image with ``{"name", "size": [w, h], "fractions": {class:
share of the pixels}, "mask_png": <base64 PNG>}``: the mask at the image's own size, a palette
PNG whose pixel values are the class indices (``predictor.palette_png``); ``?overlay=true`` adds
``"overlay_png"``, the class colours over the image (the page shows it). ``?format=png`` answers
one posted image with the mask PNG itself (``image/png``), e.g. ``curl --data-binary @in.jpg
'http://127.0.0.1:8000/predict?format=png' -o mask.png``.

Every refusal is an answer, never a crash, and is decided as early as it can be:
401 bad/missing bearer token -> 503 too many requests pending (``max_pending``) -> 413 body over
``max_body_bytes`` (from Content-Length, else while streaming) -> 415 format / 413 pixel count /
400 undecodable (see ``upload``) -> 504 no answer within ``timeout_s``. A timed-out request keeps
its pending slot until its work really ends, so ``max_pending`` bounds the work, not just waiting.

Grad-CAM: when the explain feature exists, add its overlay to each result as
``"explain": {"overlay_png": <base64 PNG>}``; the page already shows it when present.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
from dataclasses import asdict, dataclass
from importlib import resources

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from cnnkit.deploy.batching import MicroBatcher
from cnnkit.deploy.predictor import Predictor, overlay_png, palette_png
from cnnkit.deploy.upload import UploadError, decode_checked, open_checked

# Requests with at most this many pixels are decoded on the event loop (~0.1 ms for 32x32 PNGs);
# larger ones in a worker thread so they never stall other requests.
INLINE_PIXELS = 64 * 64 * 4


@dataclass
class ServeConfig:
    top_k: int = 5  # default classes per image; ?top_k= overrides per request
    max_batch: int = 32  # images per model call; 1 turns micro-batching off
    max_wait_ms: float = 5.0  # how long a batch waits for more requests once one arrived
    max_pending: int = 64  # requests in progress at once; more get 503
    timeout_s: float = 10.0  # per request, admission to answer; over it -> 504
    max_body_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000  # per image, read from the header before decoding
    max_files: int = 32  # images per request
    token: str | None = None  # when set, /predict and /metadata need "Authorization: Bearer ..."


def create_app(predictor: Predictor, cfg: ServeConfig) -> FastAPI:
    """The ASGI app; the micro-batcher starts and stops with it."""
    server = _Server(predictor, cfg)
    app = FastAPI(title="cnnkit", lifespan=server.lifespan, docs_url=None, redoc_url=None)
    page = resources.files("cnnkit.deploy").joinpath("static/index.html").read_text("utf-8")
    app.state.server = server

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict:
        return server.health()

    @app.get("/metadata")
    async def metadata(request: Request):
        return server.refuse_token(request) or server.metadata()

    @app.post("/predict")
    async def predict(
        request: Request, top_k: int | None = None, format: str = "json", overlay: bool = False
    ):
        answer = Answer(top_k, format, overlay)
        return server.refuse_token(request) or await server.predict(request, answer)

    return app


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@dataclass(frozen=True)
class Answer:
    """What a /predict request asked for: ``top_k`` classes (classification), ``format`` json or
    png (segmentation: the mask PNG of one image), ``overlay`` (segmentation, JSON)."""

    top_k: int | None = None
    format: str = "json"
    overlay: bool = False


class _Server:
    def __init__(self, predictor: Predictor, cfg: ServeConfig) -> None:
        self.predictor, self.cfg = predictor, cfg
        self.batcher = MicroBatcher(predictor.probabilities, cfg.max_batch, cfg.max_wait_ms / 1e3)
        self.pending = 0
        self.requests = 0

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.batcher.start()
        yield
        await self.batcher.stop()

    def health(self) -> dict:
        b = self.batcher
        return {
            "status": "ok",
            "pending": self.pending,
            "requests": self.requests,
            "batches": b.batches,
            "images": b.images,
        }

    def metadata(self) -> dict:
        meta = self.predictor.meta
        keys = ("arch", "classes", "input_size", "in_chans", "mean", "std", "preprocessing")
        info = {k: meta[k] for k in keys if k in meta}
        info["task"] = self.predictor.task.name
        info["cnnkit_version"] = meta.get("cnnkit_version")
        info["runtime"] = type(self.predictor.model).__name__
        info["limits"] = {k: v for k, v in asdict(self.cfg).items() if k != "token"}
        return info

    def refuse_token(self, request: Request) -> JSONResponse | None:
        if self.cfg.token is None:
            return None
        given = request.headers.get("authorization", "").encode()
        if secrets.compare_digest(given, f"Bearer {self.cfg.token}".encode()):
            return None
        return error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    async def predict(self, request: Request, answer: Answer) -> Response:
        if self.pending >= self.cfg.max_pending:
            return error(503, f"server busy: {self.pending} requests pending; retry shortly")
        self.pending += 1
        self.requests += 1
        deadline = asyncio.get_running_loop().time() + self.cfg.timeout_s
        work = asyncio.ensure_future(self._answer(request, answer, deadline))
        work.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.shield(work), self.cfg.timeout_s)
        except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
            return error(504, f"no answer within {self.cfg.timeout_s:g} s; try a smaller image")

    def _release(self, work: asyncio.Future) -> None:
        self.pending -= 1
        if not work.cancelled():
            work.exception()  # retrieved: a timed-out request's late error is not news

    async def _answer(self, request: Request, answer: Answer, deadline: float) -> Response:
        dense = self.predictor.task.name == "segmentation"
        try:
            if answer.format not in ("json", "png") or (answer.format == "png" and not dense):
                raise UploadError(400, f"format={answer.format}: use json (or png: segmentation)")
            files = await self._files(request)
            if answer.format == "png" and len(files) > 1:
                raise UploadError(
                    400, f"format=png answers one image; this request has {len(files)}"
                )
            images = self._open_all(files)
            names = [name for name, _ in files]
            if sum(img.width * img.height for img in images) <= INLINE_PIXELS:
                batch, decoded = self._preprocess(images, names)  # cheaper than a thread hop
            else:
                batch, decoded = await run_in_threadpool(self._preprocess, images, names)
            decoded = decoded if dense else None  # only masks are drawn at the image's size
            if asyncio.get_running_loop().time() > deadline:
                return error(504, "timed out")  # the caller has its 504; spare the model
            probs = await self.batcher.submit(batch)
        except UploadError as e:
            return error(e.status, e.message)
        if dense:  # PNG encoding takes milliseconds per large image: off the event loop
            return await run_in_threadpool(self._masks, probs, decoded, names, answer)
        tops = self.predictor.top(probs, answer.top_k or self.cfg.top_k)
        results = [{"name": name, "top": top} for (name, _), top in zip(files, tops, strict=True)]
        return JSONResponse({"results": results})

    def _masks(self, probs: torch.Tensor, images: list, names: list[str], answer: Answer):
        """Segmentation answers: each image's mask at its own size (see the module docstring)."""
        predictor = self.predictor
        results = []
        for name, image, small in zip(names, images, probs, strict=True):
            mask = predictor.full_mask(small, image.size).numpy()
            if answer.format == "png":
                return Response(palette_png(mask), media_type="image/png")
            result = {"name": name, "size": list(image.size)}
            result["fractions"] = predictor.fractions(torch.from_numpy(mask))
            result["mask_png"] = base64.b64encode(palette_png(mask)).decode()
            if answer.overlay:
                result["overlay_png"] = base64.b64encode(overlay_png(image, mask)).decode()
            results.append(result)
        return JSONResponse({"results": results})

    def _open_all(self, files: list[tuple[str, bytes]]) -> list:
        """Every file's header checked before any is decoded; all or none stay open."""
        images = []
        try:
            for name, data in files:
                images.append(open_checked(data, name, self.cfg.max_pixels))
        except UploadError:
            for img in images:
                img.close()
            raise
        return images

    def _preprocess(self, images: list, names: list[str]) -> tuple[torch.Tensor, list]:
        """Decode (first frame) and preprocess in a worker thread: (n, C, H, W), and the decoded
        images (a segmentation answer is at their size, its overlay over them)."""
        try:
            decoded = [
                decode_checked(img, name, self.predictor.mode)
                for img, name in zip(images, names, strict=True)
            ]
        finally:
            for img in images:
                img.close()
        return torch.stack([self.predictor.preprocess(img) for img in decoded]), decoded

    async def _files(self, request: Request) -> list[tuple[str, bytes]]:
        """(name, bytes) of each image: the parts of a multipart form, or the raw body."""
        body = await self._body(request)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            files = await self._parts(request, body)
        else:
            files = [("body", body)] if body else []
        if not files:
            raise UploadError(400, "no image in the request: send multipart files or a raw body")
        if len(files) > self.cfg.max_files:
            raise UploadError(413, f"{len(files)} images; at most {self.cfg.max_files} a request")
        return files

    async def _body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise UploadError(413, f"request body of {length} bytes; the limit is {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():  # chunked uploads have no length: count as we go
            size += len(chunk)
            if size > limit:
                raise UploadError(413, f"request body over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parts(self, request: Request, body: bytes) -> list[tuple[str, bytes]]:
        async def replay():
            yield body

        parser = MultiPartParser(request.headers, replay(), max_files=self.cfg.max_files + 1)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            if e.message.startswith("Too many files"):  # the parser's own count, past ours
                limit = self.cfg.max_files
                message = f"more than {limit} images; at most {limit} a request"
                raise UploadError(413, message) from None
            raise UploadError(400, f"bad multipart body: {e.message}") from None
        try:
            return [
                (value.filename or key, await value.read())
                for key, value in form.multi_items()
                if isinstance(value, UploadFile)
            ]
        finally:
            await form.close()  # spooled temp files: no file handle outlives the request


def serve(
    model,
    cfg: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    precision: str | None = None,
) -> None:
    """Load ``model`` (a ``cnnkit.load_model`` result) once and serve it until interrupted;
    ``precision``: default, the precision the run trained with."""
    import uvicorn  # the optional "serve" extra

    app = create_app(Predictor(model, device="cpu", precision=precision), cfg)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
