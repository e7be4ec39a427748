"""cnnkit.models: each registered model honours the classifier contract; spec, adapters, weights."""

from __future__ import annotations

import sys
import urllib.error

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cnnkit.errors import CnnkitError
from cnnkit.models import (
    create_model,
    head_parameters,
    list_models,
    load_state_into,
    model_info,
    register_model,
    summary_rows,
)

ALL_MODELS = list_models(include_test=True, task="classification")  # unet: test_segmentation
CFG_KEYS = {"input_size", "mean", "std", "feature_layer", "classifier", "architecture"}
# Models meant for tiny images: they must run on 8x8 (sklearn digits) as well as 32x32.
SMALL_INPUT_MODELS = ["simple_cnn", "lenet5", "resnet20", "resnet18_cifar", "test_resnet"]

SPEC_YAML = """
- {conv: 16, kernel: 3, stride: 1, padding: 1, groups: 1, dilation: 1, bias: false}
- {bn: true}
- {act: relu}
- {pool: max, kernel: 2, stride: 2}
- {conv: 32, bn: true, act: silu}
- {dropout: 0.1}
- {flatten: true}
- {linear: 24}
- {act: relu}
- {dropout: 0.25}
"""


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batches of 2 gain nothing from threads, and on a 2-core machine with any other load two
    OpenMP threads spin against each other (measured: 100x slower forward passes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_zoo_model_contract(name):
    model = create_model(name, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    model.eval()  # no dropout, running batch-norm stats: the split must equal forward()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.ndim == 4 and feats.shape[0] == 2
        assert torch.allclose(model.forward_head(feats), model(x), atol=1e-5)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
        model.reset_classifier(3)
        assert model(x).shape == (2, 3) and model.num_classes == 3
        model.reset_classifier(0)  # features only
        assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_default_cfg_resolves(name):
    model = create_model(name, num_classes=4, in_chans=1)
    cfg = model.default_cfg
    assert CFG_KEYS <= cfg.keys() and cfg["architecture"] == name
    assert cfg["input_size"][0] == 1 and len(cfg["mean"]) == len(cfg["std"]) == 1
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    seen = []
    hook = model.get_submodule(cfg["feature_layer"]).register_forward_hook(
        lambda _m, _i, o: seen.append(o)
    )
    model.eval()(torch.randn(1, 1, 32, 32))
    hook.remove()
    assert seen and seen[-1].ndim == 4  # a (B, C, h, w) map Grad-CAM can use


@pytest.mark.parametrize("name", SMALL_INPUT_MODELS)
@pytest.mark.parametrize("size", [8, 28])
def test_small_grayscale_inputs(name, size):
    model = create_model(name, num_classes=10, in_chans=1)
    out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_simple_cnn_runs_on_large_inputs_and_is_small():
    model = create_model("simple_cnn", num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 224, 224)).shape == (1, 10)
    assert sum(p.numel() for p in model.parameters()) < 200_000


@pytest.mark.parametrize("name", ["simple_cnn", "lenet5", "test_resnet", "test_mobilenetv2"])
def test_zoo_models_export_with_dynamic_batch(name):
    model = create_model(name, num_classes=3, in_chans=1).eval()
    x = torch.randn(2, 1, 28, 28)
    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).module()
    assert torch.allclose(exported(x), model(x), atol=1e-5)
    assert exported(torch.randn(5, 1, 28, 28)).shape == (5, 3)


def test_builder_kwargs_and_unknown_kwarg():
    model = create_model("test_mobilenetv2", num_classes=2, width_mult=0.5, drop_rate=0.0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    wide = create_model("test_mobilenetv2", num_classes=2, width_mult=2.0)
    assert model_info(wide, (3, 32, 32))["params"] > model_info(model, (3, 32, 32))["params"]
    with pytest.raises(CnnkitError, match="widht_mult.*width_mult"):
        create_model("mobilenetv2", widht_mult=0.5)
    with pytest.raises(CnnkitError, match="activation 'relux'"):
        create_model("test_resnet", act="relux")


def test_unknown_name_suggests_close_names():
    with pytest.raises(CnnkitError, match="resnet18"):
        create_model("resnet19")
    with pytest.raises(CnnkitError, match="tv:resnet18"):
        create_model("tv:resnet81")


def test_pretrained_zoo_model_is_refused():
    with pytest.raises(CnnkitError, match="no published weights"):
        create_model("resnet20", pretrained=True)


def test_bad_sizes_are_refused():
    with pytest.raises(CnnkitError, match="num_classes"):
        create_model("test_resnet", num_classes=-1)
    with pytest.raises(CnnkitError, match="in_chans"):
        create_model("test_resnet", in_chans=0)


def test_duplicate_registration_raises():
    with pytest.raises(CnnkitError, match="already registered"):

        @register_model
        def resnet18(**kwargs):  # noqa: F811 - the point of the test
            return nn.Identity()


def test_list_models_patterns_and_test_variants():
    assert "simple_cnn" in list_models()
    assert not any(n.startswith("test_") for n in list_models())
    assert "test_resnet" in list_models(include_test=True)
    assert list_models("resnet*") == ["resnet10_slim", "resnet18", "resnet18_cifar"] + [
        "resnet18_slim",
        "resnet20",
        "resnet32",
        "resnet34",
        "resnet50",
        "resnet56",
    ]


# --- spec -----------------------------------------------------------------------------------


def test_spec_from_yaml_string():
    model = create_model("spec", num_classes=10, in_chans=1, layers=SPEC_YAML)
    for size in (8, 32):
        out = model(torch.randn(2, 1, size, size))
        assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert model.forward_features(torch.randn(2, 1, 8, 8)).shape == (2, 32, 4, 4)
    assert model.num_features == 24
    assert model.forward_head(torch.randn(2, 32, 4, 4), pre_logits=True).shape == (2, 24)
    # Grad-CAM layer: the act of the last conv block (the shorthand conv entry itself here).
    assert model.default_cfg["feature_layer"] == "features.4"
    assert isinstance(model.get_submodule("features.4"), nn.Sequential)
    assert model.features[0].bias is None  # bias: false honoured
    model.reset_classifier(3)
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 3)


def test_spec_without_flatten_gets_global_pool_head():
    layers = [{"conv": 8}, {"bn": True}, {"act": "relu"}, {"pool": "avg"}, {"conv": 12}]
    model = create_model("spec", num_classes=4, layers=layers)
    assert model.features[0].bias is None  # a bn follows, so no bias
    assert model.features[4].bias is not None
    assert model.default_cfg["feature_layer"] == "features.4"
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([{"conv": 8, "kernal": 3}], r"layers\[0\]: unknown key 'kernal'"),
        ([{"conv": 8}, {"convolution": 8}], r"layers\[1\]: first key 'convolution'"),
        ([{"conv": 8}, {"linear": 4}], r"layers\[1\]: linear needs flat .* a \(B, 8, H, W\)"),
        ([{"conv": 8}, {"flatten": True}, {"conv": 4}], r"layers\[2\]: conv .* \(B, 8\) after"),
        ([{"conv": "8"}], r"layers\[0\] conv must be int"),
        ([{"act": "relux"}], r"layers\[0\]: unknown act 'relux'"),
        ([{"dropout": 1.5}], r"layers\[0\]: dropout must be in"),
        ([{"conv": 8, "stride": 0}], r"layers\[0\]: conv.stride must be >= 1"),
        ("- {conv: 8\n", "not valid YAML"),
        ([], "non-empty list"),
    ],
)
def test_spec_errors_name_the_entry(layers, message):
    with pytest.raises(CnnkitError, match=message):
        create_model("spec", layers=layers)


def test_spec_needs_layers_and_rejects_other_kwargs():
    with pytest.raises(CnnkitError, match="needs layers"):
        create_model("spec")
    with pytest.raises(CnnkitError, match="no option 'depth'"):
        create_model("spec", layers=[{"conv": 4}], depth=3)


# --- weights --------------------------------------------------------------------------------


def test_load_state_into_replaces_head_on_class_change():
    source = create_model("test_resnet", num_classes=10)
    target = create_model("test_resnet", num_classes=100)
    fresh_head = target.head.fc.weight.clone()
    wrapped = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    skipped = load_state_into(target, wrapped)
    assert skipped == ["head.fc.bias", "head.fc.weight"]
    assert torch.equal(target.stem.conv.weight, source.stem.conv.weight)
    assert torch.equal(target.head.fc.weight, fresh_head)
    assert head_parameters(target) == list(target.head.parameters())


def test_load_state_into_rejects_other_architectures_and_leaves_model_untouched():
    target = create_model("test_resnet", num_classes=10)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    other = create_model("test_resnet_bottleneck", num_classes=10).state_dict()
    with pytest.raises(CnnkitError, match="do not fit the model 'test_resnet'"):
        load_state_into(target, other)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    with pytest.raises(CnnkitError, match="not a tensor"):
        load_state_into(target, {"model": target.state_dict()})


def test_load_state_into_same_classes_loads_everything():
    source = create_model("spec", num_classes=3, layers=SPEC_YAML)
    target = create_model("spec", num_classes=3, layers=SPEC_YAML)
    assert load_state_into(target, source.state_dict()) == []
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(source.eval()(x), target.eval()(x))


# --- adapters -------------------------------------------------------------------------------


def test_torchvision_adapter_contract_and_state_dict():
    model = create_model("tv:resnet18", num_classes=10)
    cfg = model.default_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["classifier"] == "model.fc"
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    feats = model.forward_features(x)
    assert feats.shape == (2, 512, 1, 1)
    assert model.get_submodule(cfg["feature_layer"]) is model.model.layer4
    model.eval()
    assert torch.allclose(model.forward_head(model.forward_features(x)), model(x), atol=1e-5)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 512)

    # A bare torchvision state dict (1000 classes) loads; the 10-class head is kept fresh.
    reference = torchvision.models.resnet18(num_classes=1000)
    fresh_fc = model.model.fc.weight.clone()
    skipped = load_state_into(model, reference.state_dict())
    assert skipped == ["model.fc.bias", "model.fc.weight"]
    assert torch.equal(model.model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.model.fc.weight, fresh_fc)
    assert head_parameters(model) == list(model.model.fc.parameters())
    model.reset_classifier(4)
    assert model(x).shape == (2, 4)


def test_torchvision_adapter_grayscale_and_sequential_head():
    model = create_model("tv:mobilenet_v3_small", num_classes=3, in_chans=1)
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 3)
    assert model.default_cfg["mean"] == (0.449,)
    # RGB filters of a 3-channel state dict are summed into the 1-channel first conv.
    reference = torchvision.models.mobilenet_v3_small()
    assert load_state_into(model, reference.state_dict()) == [
        "model.classifier.3.bias",
        "model.classifier.3.weight",
    ]
    first = model.model.features[0][0].weight
    assert torch.allclose(first, reference.features[0][0].weight.sum(1, keepdim=True))
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 1024)


def test_torchvision_pretrained_offline_is_one_clear_error(monkeypatch, tmp_path):
    def offline(*_args, **_kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(CnnkitError, match=r"tv:resnet18 .*checkpoints.*--weights"):
        create_model("tv:resnet18", num_classes=10, pretrained=True)


def test_timm_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    with pytest.raises(CnnkitError, match="pip install timm"):
        create_model("timm:resnet18")


def test_timm_adapter():
    pytest.importorskip("timm")
    model = create_model("timm:resnet18", num_classes=6, in_chans=1)
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 6)
    cfg = model.default_cfg
    assert cfg["input_size"][0] == 1 and cfg["classifier"] == "model.fc"
    assert model.get_submodule(cfg["feature_layer"]) is model.model.layer4
    model.reset_classifier(2)
    assert model(x).shape == (2, 2)


# --- info -----------------------------------------------------------------------------------


def test_model_info_counts_exactly():
    layers = [{"conv": 4, "kernel": 3}]  # 1 -> 4 channels, with bias (no bn after it)
    model = create_model("spec", num_classes=2, in_chans=1, layers=layers)
    info = model_info(model, (1, 8, 8))
    assert info["params"] == (4 * 9 + 4) + (4 * 2 + 2)
    conv_flops = 2 * (8 * 8) * 4 * 9  # 2 FLOPs per multiply-add, per output pixel and channel
    assert info["gflops"] * 1e9 == pytest.approx(conv_flops + 2 * 4 * 2)


def test_zoo_matches_torchvision_sizes():
    with torch.device("meta"):
        ours = create_model("resnet50")
        theirs = torchvision.models.resnet50()
    info = model_info(ours, (3, 224, 224))
    assert info["params"] == sum(p.numel() for p in theirs.parameters()) == 25_557_032
    assert info["gflops"] == pytest.approx(model_info(theirs, (3, 224, 224))["gflops"], rel=1e-3)


class _RealTensors(TorchDispatchMode):
    """Notes the size of every tensor an operation produces outside the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                self.elements.append(value.numel())
        return out


def test_summary_rows_cover_the_zoo_without_computing():
    # quick because every model is built and measured on the meta device: no weights are
    # allocated or initialised, no convolution runs (resnet50 alone would be 25M weights)
    with _RealTensors() as real:
        rows = summary_rows()
    assert max(real.elements, default=0) < 1000, sorted(real.elements)[-5:]
    assert [r["name"] for r in rows] == list_models()
    resnet18 = next(r for r in rows if r["name"] == "resnet18")
    assert resnet18["params"] == 11_689_512 and 3.5 < resnet18["gflops"] < 3.8
    assert resnet18["input_size"] == (3, 224, 224)
