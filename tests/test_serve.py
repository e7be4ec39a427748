"""`cnnkit serve` as a real process on a free loopback port, answered over real HTTP (httpx),
and its page driven in headless Chromium.

Two servers per module: a strict one (token, 1 MiB bodies, 0.5 s timeout, one request at a time)
for every refusal, and a plain one for predictions, batches, the load test and the page. The
strict one runs through tests/childhooks.py, whose gate holds the decode of an upload named
gate* until the test releases it: a request as slow as the test needs, without timing guesses.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import cnnkit

httpx = pytest.importorskip("httpx", reason="server tests need httpx (the 'dev' extra)")
pytest.importorskip("fastapi", reason="server tests need the 'serve' extra")

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HOOKS = Path(__file__).with_name("childhooks.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m cnnkit serve`` in a subprocess (through a childhooks.py ``hook`` when given);
    stopped (and its output shown) at teardown."""

    def __init__(self, model: Path, *args: str, env: dict | None = None, hook: tuple = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        src = str(Path(cnnkit.__file__).parents[1])
        full_env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", **(env or {})}
        runner = [str(HOOKS), *hook, "--"] if hook else ["-m", "cnnkit"]
        cmd = [sys.executable, *runner, "serve", str(model), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*cmd, *args], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 90.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited: {self.proc.stdout.read().decode()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        pytest.fail("server did not answer /health in time")

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def plain(digits_model):
    server = Server(digits_model, "--max-batch", "16", "--max-wait-ms", "20")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gate(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gate")


@pytest.fixture(scope="module")
def strict(digits_model, gate):
    server = Server(
        digits_model,
        *("--token-env", "CNNKIT_TEST_TOKEN", "--max-body-mb", "1", "--timeout", "0.5"),
        *("--max-pending", "1", "--max-pixels", "40000000"),
        env={"CNNKIT_TEST_TOKEN": TOKEN},
        hook=("gate-decode", str(gate)),
    )
    yield server
    (gate / "release").touch()  # never leave a decode waiting
    server.stop()


@pytest.fixture(scope="module")
def offline(digits_model, digit_pngs) -> dict[str, list[float]]:
    """Class probabilities of every test PNG from the Predictor in this process."""
    from cnnkit.deploy.predictor import Predictor

    predictor = Predictor(cnnkit.load_model(digits_model), device="cpu")
    rows = predictor.predict([str(p) for p, _ in digit_pngs], top_k=10)
    return {Path(r["input"]).name: _by_class(r["top"]) for r in rows}


def _by_class(top: list[dict]) -> list[float]:
    probs = [0.0] * len(top)
    for t in top:
        probs[t["index"]] = t["prob"]
    return probs


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but which holds one tiny IDAT: a bomb stand-in
    that can only be refused from its header (decoding it would fail, not allocate)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_predictions_match_the_predictor(plain, digit_pngs, offline):
    for path, _ in digit_pngs[:5]:
        answer = httpx.post(
            plain.url + "/predict?top_k=10",
            files={"file": (path.name, path.read_bytes(), "image/png")},
        )
        assert answer.status_code == 200, answer.text
        (result,) = answer.json()["results"]
        assert result["name"] == path.name
        assert _by_class(result["top"]) == pytest.approx(offline[path.name], abs=1e-5)
    raw = httpx.post(plain.url + "/predict", content=digit_pngs[0][0].read_bytes())
    assert raw.status_code == 200 and raw.json()["results"][0]["name"] == "body"
    assert len(raw.json()["results"][0]["top"]) == 5  # the server's default top_k


def test_batch_of_files_in_one_request_keeps_order(plain, digit_pngs, offline):
    picks = digit_pngs[5:12]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p, _ in picks]
    answer = httpx.post(plain.url + "/predict?top_k=10", files=files)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["name"] for r in results] == [p.name for p, _ in picks]
    for r in results:
        assert _by_class(r["top"]) == pytest.approx(offline[r["name"]], abs=1e-5)


def test_every_accepted_format(plain, digit_pngs):
    digit = Image.open(digit_pngs[0][0]).convert("RGB")  # 8x8
    white = Image.new("RGB", digit.size, (255, 255, 255))
    gif = io.BytesIO()
    digit.save(gif, "GIF", save_all=True, append_images=[white])  # animated: first frame used
    lossless = {
        "png": _encode(digit, "PNG"),
        "webp": _encode(digit, "WEBP", lossless=True),
        "bmp": _encode(digit, "BMP"),
        "gif": gif.getvalue(),
    }
    answers = {
        name: httpx.post(plain.url + "/predict?top_k=10", files={"file": (f"d.{name}", body)})
        for name, body in {**lossless, "jpg": _encode(digit, "JPEG", quality=95)}.items()
    }
    for name, answer in answers.items():
        assert answer.status_code == 200, (name, answer.text)
    probs = {name: _by_class(a.json()["results"][0]["top"]) for name, a in answers.items()}
    for name in lossless:  # the same pixels whatever the container (GIF: not the white frame)
        assert probs[name] == pytest.approx(probs["png"], abs=1e-5), name


def test_health_and_metadata(plain):
    health = httpx.get(plain.url + "/health").json()
    assert health["status"] == "ok"
    meta = httpx.get(plain.url + "/metadata").json()
    assert meta["classes"] == [str(d) for d in range(10)] and meta["input_size"] == [8, 8]
    assert meta["limits"]["max_batch"] == 16 and "token" not in meta["limits"]


def test_micro_batching_load_test(plain, digit_pngs, offline):
    """A fixed number of concurrent single-image requests; each answer matches its own image."""
    before = httpx.get(plain.url + "/health").json()
    jobs = [digit_pngs[i % len(digit_pngs)][0] for i in range(96)]
    answers: dict[int, dict] = {}

    def client(worker: int) -> None:
        with httpx.Client(base_url=plain.url, timeout=30) as http:
            for i in range(worker, len(jobs), 12):
                body = jobs[i].read_bytes()
                r = http.post("/predict?top_k=10", files={"file": (jobs[i].name, body)})
                answers[i] = {"status": r.status_code, **r.json()}

    threads = [threading.Thread(target=client, args=(w,)) for w in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(answers) == len(jobs)
    for i, path in enumerate(jobs):
        assert answers[i]["status"] == 200, answers[i]
        (result,) = answers[i]["results"]
        assert result["name"] == path.name
        assert _by_class(result["top"]) == pytest.approx(offline[path.name], abs=1e-5)
    after = httpx.get(plain.url + "/health").json()
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    assert images == len(jobs)
    assert batches < len(jobs)  # concurrent requests really shared model calls


def _chunks(data: bytes, size: int = 64 * 1024):
    """``data`` sent with Transfer-Encoding: chunked (no Content-Length): the server counts it."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _broken_multipart(good: bytes) -> bytes:
    return b"--xyz\r\nNo-Colon-In-This-Header\r\n\r\n" + good + b"\r\n--xyz--\r\n"


def test_limits_each_refused_and_server_keeps_answering(strict, gate, digit_pngs):
    good = digit_pngs[0][0].read_bytes()
    post = strict.url + "/predict"

    def ok() -> None:
        answer = httpx.post(post, content=good, headers=AUTH)
        assert answer.status_code == 200, answer.text

    ok()
    _timeout_and_queue_full(strict, post, gate, good)
    ok()
    chunked = httpx.post(post, content=_chunks(good, 50), headers=AUTH)
    assert chunked.status_code == 200, chunked.text  # a chunked body within the limit is fine
    baseline = None
    tiff = _encode(Image.new("RGB", (8, 8)), "TIFF")
    multipart = {**AUTH, "Content-Type": "multipart/form-data; boundary=xyz"}
    files_33 = [("files", (f"{i}.png", good)) for i in range(33)]  # the limit is 32 a request
    for round_ in range(3):
        cases = [
            (401, httpx.post(post, content=good)),
            (401, httpx.post(post, content=good, headers={"Authorization": "Bearer wrong"})),
            (413, httpx.post(post, content=os.urandom(1_200_000), headers=AUTH)),
            (413, httpx.post(post, content=_chunks(os.urandom(1_200_000)), headers=AUTH)),
            (413, httpx.post(post, files=files_33, headers=AUTH)),
            (413, httpx.post(post, content=png_header_only(100_000, 100_000), headers=AUTH)),
            (415, httpx.post(post, content=tiff, headers=AUTH)),
            (415, httpx.post(post, content=b"hello, not an image", headers=AUTH)),
            (400, httpx.post(post, content=good[: len(good) // 2], headers=AUTH)),
            (400, httpx.post(post, content=b"", headers=AUTH)),
            (400, httpx.post(post, content=_broken_multipart(good), headers=multipart)),
        ]
        for expected, answer in cases:
            assert answer.status_code == expected, (expected, answer.text)
            assert answer.json()["error"]
            ok()
        if round_ == 0:
            baseline = strict.open_files()  # after the first round: lazy set-up is done
    # Sockets of refused connections close asynchronously: a leak never comes back down.
    end = time.monotonic() + 10
    while strict.open_files() > baseline and time.monotonic() < end:
        time.sleep(0.2)
    assert strict.open_files() <= baseline, "open files grew with refused requests"


def test_refusals_say_what_was_wrong(strict, digit_pngs):
    good = digit_pngs[0][0].read_bytes()
    post = strict.url + "/predict"
    many = httpx.post(post, files=[("f", (f"{i}.png", good)) for i in range(33)], headers=AUTH)
    assert many.json()["error"] == "33 images; at most 32 a request"
    chunked = httpx.post(post, content=_chunks(os.urandom(1_200_000)), headers=AUTH)
    assert chunked.json()["error"] == "request body over the limit of 1048576 bytes"
    multipart = {**AUTH, "Content-Type": "multipart/form-data; boundary=xyz"}
    broken = httpx.post(post, content=_broken_multipart(good), headers=multipart)
    assert broken.json()["error"].startswith("bad multipart body: ")


def test_far_too_many_files_are_413_too(strict, digit_pngs):
    good = digit_pngs[0][0].read_bytes()
    files = [("files", (f"{i}.png", good)) for i in range(40)]
    answer = httpx.post(strict.url + "/predict", files=files, headers=AUTH)
    assert answer.status_code == 413, answer.text


def _timeout_and_queue_full(server: Server, post: str, gate: Path, good: bytes) -> None:
    """A request whose decode is held at the gate gets 504 after the 0.5 s timeout; the only
    pending slot stays taken meanwhile, and after its 504 too, until its work has really ended:
    other requests get 503 until the gate opens."""
    held: dict = {}
    image = _encode(Image.new("L", (200, 200), 3), "PNG")  # > INLINE_PIXELS: decoded off-loop

    def send_held() -> None:
        files = [("files", ("gate.png", image))]
        held["answer"] = httpx.post(post, files=files, headers=AUTH, timeout=30)

    for name in ("entered", "release"):
        (gate / name).unlink(missing_ok=True)
    thread = threading.Thread(target=send_held)
    thread.start()
    _wait_for(lambda: (gate / "entered").exists())  # admitted, and inside its decode
    busy = httpx.post(post, content=good, headers=AUTH)
    thread.join(timeout=30)
    assert busy.status_code == 503, busy.text
    assert held["answer"].status_code == 504, held["answer"].text
    after = httpx.post(post, content=good, headers=AUTH)
    assert after.status_code == 503, after.text  # answered, but its work goes on
    (gate / "release").touch()
    _wait_for(lambda: httpx.get(server.url + "/health").json()["pending"] == 0)


def _wait_for(condition, seconds: float = 30.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "the server never got there"
        time.sleep(0.01)


def test_page_shows_top_classes(plain, digit_pngs, offline, tmp_path, chromium):
    path = digit_pngs[3][0]
    expected = str(int(torch.tensor(offline[path.name]).argmax()))
    artifacts = Path(os.environ.get("CNNKIT_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    page = chromium.new_page()
    page.goto(plain.url + "/")
    page.wait_for_selector("#model:has-text('simple_cnn')")
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#bars .row")
    labels = page.locator("#bars .label").all_inner_texts()
    widths = page.locator("#bars .bar").evaluate_all("els => els.map(e => e.style.width)")
    page.screenshot(path=str(artifacts / "serve_page.png"), full_page=True)
    assert len(labels) == 5 and labels[0] == expected
    assert float(widths[0].rstrip("%")) >= float(widths[-1].rstrip("%"))
    assert (artifacts / "serve_page.png").stat().st_size > 1000
