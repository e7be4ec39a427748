"""Published weights for model auto beyond the torch hub cache: timm's in the Hugging Face hub
cache (random weights written in its layout), and the download when online, served here from a
loopback server; offline (a closed port, a server that never answers) the run falls back to
training from scratch within seconds, saying so in its one line."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
import time

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import cnnkit
from cnnkit.models import published
from cnnkit.models.adapters import IMAGENET_MEAN
from cnnkit.prepare import build_model, match_pretrained_normalisation, resolve_auto_model
from test_auto import photo_folder

TV_FILE = torchvision.models.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[1]


@pytest.fixture
def caches(monkeypatch, tmp_path):
    """Empty torch hub and HF caches; downloads allowed (no CI), to URLs the test sets."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    unset = ("CI", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME")
    for var in (*unset, "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):  # loopback direct
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def hf_snapshot(name: str, filename: str, state: dict):
    """``state`` saved as the HF hub cache holds a download of timm/``name``."""
    repo = published.hf_hub_cache() / f"models--timm--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    path = repo / "snapshots" / "0123abcd" / filename
    path.parent.mkdir(parents=True)
    if filename.endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def auto_model(folder, **options):
    """Resolve model auto for ``folder`` (what a run prints first), build the model and take
    the normalisation of its weights, as a run does."""
    cfg = cnnkit.config.resolve(str(folder), **options)
    choice = resolve_auto_model(cfg, "cpu")
    splits = cnnkit.data.build(cfg.data, seed=0)
    model = build_model(cfg, splits)
    match_pretrained_normalisation(cfg, splits, model)
    return cfg, choice, model


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_timm_weights_in_the_hf_cache_are_found_and_loaded(caches, filename, monkeypatch):
    pytest.importorskip("timm")
    monkeypatch.setattr(socket, "create_connection", pytest.fail)  # found on disk: no network
    saved = torchvision.models.resnet18().state_dict()  # timm's resnet18 has the same keys
    path = hf_snapshot("resnet18.a1_in1k", filename, saved)
    hf_snapshot("resnet50.a1_in1k", filename, {"x": torch.zeros(1)})  # a slower backbone
    cfg, choice, model = auto_model(photo_folder(caches / "photos", per_class=2))
    assert choice.name == cfg.model.name == "timm:resnet18.a1_in1k" and cfg.model.pretrained
    assert choice.input_size == 224 and str(path) in choice.line()
    assert cfg.model.kwargs == {"pretrained_cfg_overlay": {"file": str(path)}}
    loaded = model.state_dict()
    assert all(torch.equal(loaded[f"model.{k}"], v) for k, v in saved.items() if "fc." not in k)
    assert loaded["model.fc.weight"].shape == (2, 512)  # a fresh head for the 2 classes
    assert cfg.train.freeze_epochs == 1 and cfg.data.mean == pytest.approx(IMAGENET_MEAN)


def test_the_torch_hub_cache_comes_first_and_no_timm_skips_the_hf_cache(caches, monkeypatch):
    hf_snapshot("resnet18.a1_in1k", "model.safetensors", {"x": torch.zeros(1)})
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # timm not installed
    assert published.find() is None and "timm not installed" in published.looked_where()
    published.hub_checkpoints().mkdir(parents=True)
    torch.save({}, published.hub_checkpoints() / TV_FILE)
    assert published.find().name == "tv:resnet18"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_the_download_fails_fast_and_trains_from_scratch(caches, monkeypatch):
    folder = photo_folder(caches / "photos", per_class=2)
    url = f"http://127.0.0.1:{closed_port()}/{TV_FILE}"
    monkeypatch.setattr(published, "DOWNLOAD_URL", url)
    start = time.perf_counter()
    cfg = cnnkit.config.resolve(str(folder))
    choice = resolve_auto_model(cfg, "cpu")
    assert time.perf_counter() - start < 10
    assert (choice.name, choice.pretrained) == ("resnet10_slim", False)
    assert "from scratch (" in choice.line() and f"downloading {url} failed (" in choice.line()
    assert "--weights FILE" in choice.line() and "--model NAME" in choice.line()
    assert not (published.hub_checkpoints() / TV_FILE).exists()

    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setattr(published, "PROBE_S", 0.2)
        monkeypatch.setattr(
            published, "DOWNLOAD_URL", f"http://127.0.0.1:{silent.getsockname()[1]}/w.pth"
        )
        found, why = published.fetch(pytest.fail)
    assert found is None and "failed (" in why


@pytest.mark.parametrize("setting", ["never", "ci"])
def test_no_download_is_tried_when_switched_off_or_in_ci(caches, monkeypatch, setting):
    monkeypatch.setattr(socket, "create_connection", pytest.fail)
    if setting == "ci":
        monkeypatch.setenv("CI", "true")
    folder = photo_folder(caches / "photos", per_class=2)
    cfg = cnnkit.config.resolve(
        str(folder), overrides=["model.download=never"] * (setting == "never")
    )
    choice = resolve_auto_model(cfg, "cpu")
    why = "model.download is never" if setting == "never" else "CI is set"
    assert not choice.pretrained and f"not downloading: {why}" in choice.line()


@pytest.fixture
def weights_server(tmp_path):
    """A loopback HTTP server for tmp_path/served; yields its base URL."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_online_the_weights_are_downloaded_checked_and_fine_tuned(
    caches, weights_server, monkeypatch
):
    root, base = weights_server
    saved = torchvision.models.resnet18().state_dict()
    torch.save(saved, root / "w.pth")
    digest = hashlib.sha256((root / "w.pth").read_bytes()).hexdigest()
    (root / "w.pth").rename(root / f"resnet18-{digest[:8]}.pth")
    (root / "resnet18-00000000.pth").hardlink_to(root / f"resnet18-{digest[:8]}.pth")
    folder = photo_folder(caches / "photos", per_class=2)

    monkeypatch.setattr(published, "DOWNLOAD_URL", f"{base}/resnet18-{'0' * 8}.pth")
    found, why = published.fetch(print)
    assert found is None and "sha256 does not start with 00000000" in why

    monkeypatch.setattr(published, "DOWNLOAD_URL", f"{base}/resnet18-{digest[:8]}.pth")
    cfg, choice, model = auto_model(folder)
    assert (choice.name, choice.pretrained, cfg.train.freeze_epochs) == ("tv:resnet18", True, 1)
    assert (published.hub_checkpoints() / TV_FILE).is_file()  # where torchvision looks next time
    loaded = model.state_dict()
    assert all(torch.equal(loaded[f"model.{k}"], v) for k, v in saved.items() if "fc." not in k)
