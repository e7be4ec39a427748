"""Published ImageNet weights that ``model: auto`` starts photo runs from, and where they come from.

In this order:

1. torchvision's file in the torch hub cache ($TORCH_HOME/hub/checkpoints), taken as
   ``tv:resnet18`` (torchvision reads it from there itself);
2. timm's in the Hugging Face hub cache (``hf_hub_cache``:
   ``models--timm--resnet18.a1_in1k/snapshots/<rev>/model.safetensors`` or
   ``pytorch_model.bin``), taken as ``timm:<name>`` loaded from that file, when timm is
   installed (without timm that cache is not looked at);
3. a download of torchvision's file into the torch hub cache (``fetch``), unless
   ``model.download`` is never or CI / HF_HUB_OFFLINE is set (``why_not_download``). A header
   request with a ``PROBE_S`` timeout, DNS lookup included, goes first, so offline the run
   falls back to training from scratch within seconds instead of hanging.

Looking in the caches reads directory listings only, never the network.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cnnkit.fileio import atomic_write_bytes

TV_ARCH = "resnet18"  # torchvision backbone taken from the torch hub cache or downloaded
TV_SIDE = 224  # the side torchvision's ImageNet weights were trained at (px)
# timm backbones taken from the HF cache, fastest to fine-tune on a CPU first
TIMM_ARCHS = ("resnet18", "resnet18d", "resnet26d", "resnet34", "resnet34d", "resnet50")
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # in a snapshot, the first found is used
PROBE_S = 2.0  # seconds the weights' server has to answer a header request (DNS included)
READ_S = 20.0  # seconds a started download may stall between packets before it is given up
DOWNLOAD_URL: str | None = None  # None: torchvision's URL for TV_ARCH (tests point it elsewhere)
_HASH = re.compile(r"-([a-f0-9]+)\.")  # torchvision file names carry their sha256 prefix


@dataclass(frozen=True)
class Published:
    """Weights on disk and the model that takes them."""

    name: str  # tv:resnet18, timm:resnet18.a1_in1k
    path: Path
    side: int  # px they were trained at
    kwargs: dict = field(default_factory=dict)  # builder options that load them from ``path``


def find() -> Published | None:
    """Published weights already on disk (torch hub cache, then HF cache), or None."""
    return find_torch_hub() or find_hf_cache()


def looked_where() -> str:
    """Where ``find`` looked, for the line that says a run trains from scratch."""
    try:
        import timm  # noqa: F401 - only whether it is installed
    except ImportError:
        return f"torch hub cache {hub_checkpoints()}; HF cache skipped, timm not installed"
    return f"torch hub cache {hub_checkpoints()}, HF cache {hf_hub_cache()}"


def hub_checkpoints() -> Path:
    """Where torchvision keeps downloaded weights ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _tv_url(arch: str) -> str:
    import torchvision.models as tvm  # torchvision's weight tables: only when auto looks

    return tvm.get_model_weights(arch).DEFAULT.url


def find_torch_hub(arch: str = TV_ARCH) -> Published | None:
    """``arch``'s default torchvision weights when already downloaded (the file name comes
    from the weights' URL)."""
    path = hub_checkpoints() / os.path.basename(_tv_url(arch))
    return Published(f"tv:{arch}", path, TV_SIDE) if path.is_file() else None


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, resolved as huggingface_hub does (read at each call)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    cache = env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(env.get("HF_HOME") or os.path.join(cache, "huggingface")).expanduser() / "hub"


def find_hf_cache() -> Published | None:
    """timm weights of a ``TIMM_ARCHS`` backbone in the HF cache (timm installed), or None."""
    try:
        import timm  # optional: without it, timm's weights in the HF cache are not used
    except ImportError:
        return None
    root = hf_hub_cache()
    found = []
    for repo in sorted(root.glob("models--timm--*")) if root.is_dir() else ():
        name = repo.name.removeprefix("models--timm--")
        arch = name.partition(".")[0]
        path = _snapshot_file(repo) if arch in TIMM_ARCHS else None
        if path is not None and timm.is_model(name):
            found.append((TIMM_ARCHS.index(arch), name, path))
    if not found:
        return None
    _, name, path = min(found)
    cfg = timm.get_pretrained_cfg(name)
    side = cfg.input_size[-1] if cfg is not None else TV_SIDE
    # timm loads pretrained weights from this file instead of asking the hub (no network)
    return Published(f"timm:{name}", path, side, {"pretrained_cfg_overlay": {"file": str(path)}})


def _snapshot_file(repo: Path) -> Path | None:
    """The weights file of the revision refs/main names, else of any snapshot."""
    ref = repo / "refs" / "main"
    revisions = [ref.read_text().strip()] if ref.is_file() else []
    revisions += sorted(p.name for p in (repo / "snapshots").glob("*"))
    for revision in revisions:
        for name in HF_FILES:
            path = repo / "snapshots" / revision / name
            if path.is_file():
                return path
    return None


def why_not_download(setting: str) -> str:
    """Why no download is tried ("" when one may be): ``model.download`` never, or an
    environment that says offline (CI: tests and build machines, HF_HUB_OFFLINE)."""
    if setting == "never":
        return "model.download is never"
    for var in ("CI", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").lower() not in ("", "0", "false", "no"):
            return f"{var} is set"
    return ""


def fetch(announce: Callable[[str], None], arch: str = TV_ARCH) -> tuple[Published | None, str]:
    """Download ``arch``'s torchvision ImageNet weights into the torch hub cache: the weights,
    or None and why not (one phrase). ``announce`` gets one line once the server answers."""
    url = DOWNLOAD_URL or _tv_url(arch)
    dest = hub_checkpoints() / os.path.basename(_tv_url(arch))
    try:
        _probe(url)
        announce(f"model auto: downloading {url} to {dest}")
        body = _download(url)
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError is an OSError
        return None, f"downloading {url} failed ({_why(e)})"
    atomic_write_bytes(dest, body)
    return Published(f"tv:{arch}", dest, TV_SIDE), ""


def _probe(url: str) -> None:
    """Raise unless the server answers a HEAD request within ``PROBE_S``. It runs in a thread
    because the DNS lookup takes no timeout; a lookup still hanging is left to finish alone."""
    outcome: list[BaseException | None] = []

    def head() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_S)
            outcome.append(None)
        except urllib.error.HTTPError as e:  # it answered; some servers refuse HEAD itself
            outcome.append(None if e.code in (405, 501) else e)
        except Exception as e:  # noqa: BLE001 - re-raised in the caller's thread
            outcome.append(e)

    thread = threading.Thread(target=head, daemon=True)
    thread.start()
    thread.join(PROBE_S + 0.5)
    if not outcome:
        raise TimeoutError(f"no answer within {PROBE_S:g} s")
    if outcome[0] is not None:
        raise outcome[0]


def _download(url: str) -> bytes:
    """The file at ``url``; a sha256 prefix in its name (torchvision's) must match."""
    with urllib.request.urlopen(url, timeout=READ_S) as response:
        body = response.read()
    expected = _HASH.search(os.path.basename(url))
    if expected and not hashlib.sha256(body).hexdigest().startswith(expected.group(1)):
        raise ValueError(f"its sha256 does not start with {expected.group(1)}")
    return body


def _why(e: BaseException) -> str:
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    text = str(reason).splitlines()[0] if str(reason) else ""
    return text or type(reason).__name__
