"""``model: auto`` (the default): the net and training side a run takes when the user names none.

The choice table (``choose``), from the training images' median shorter side, their number and
the device:

- under 32 px (digits, MNIST): ``simple_cnn`` at the native size; it reaches ~97% on digits in
  seconds and anything bigger is slower for nothing;
- 32-40 px (CIFAR-like; resized to 32): ``resnet20`` on CPU (41 MFLOPs), ``resnet18_cifar`` on a
  GPU, where its 0.56 GFLOPs are cheap;
- larger (photos): ``resnet10_slim`` (CPU, under 5,000 images) or ``resnet18_slim``, a
  stride-2-stem ResNet at half ResNet-18's widths, trained at ``PHOTO_SIDE`` px. On ants/bees
  (245 photos, 2-core AMD EPYC with bf16, shared) 128 px beat 96 px (66.0% vs 64.7% test, in
  about the same time); ``benchmarks/photos.py`` has the zero-flag figures;
- image and mask folders (segmentation): ``unet_small`` at their size, at most 256 px on a CPU
  (``choose_segmentation``), with the task's training defaults (``segmentation_settings``);
- published ImageNet weights of a ResNet backbone (``cnnkit.models.published``: torch hub
  cache, timm's in the Hugging Face cache, or downloaded when online) or a ``--weights`` file
  whose architecture is known: fine-tune those at the weights' own side (224 px).

Nothing here touches the network; ``published.fetch`` does, with a short timeout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cnnkit.models.published import Published

AUTO = "auto"
DIGITS_MAX_SIDE = 31  # median shorter side (px) below which data is digits-like
SMALL_MAX_SIDE = 40  # up to this, data.stats resizes to 32 px: CIFAR-like
PHOTO_SIDE = 128  # training side for photos from scratch (time to accuracy, see above)
SMALL_PHOTO_SET = 5000  # fewer training images than this: the 10-layer slim net is enough
# A few hundred photos at batch 128 give 2 steps an epoch; batch 32 and 30 epochs give the
# from-scratch net ~200 steps (ants/bees: 66.0% test at 20 epochs, 68.0% at 30). Flip TTA for
# the final score: 68.0% -> 70.6% on the same weights (153 test photos, so +-3.7 points).
# Progressive resizing (train.progressive_min) is not among them: measured on ants/bees (3 seeds,
# same sitting), starting at half the side over the first half of the run lost 3.3 points
# (64.9% vs 68.2% mean test) to save 2.5 s of 21 (the run is that short), and 0.75 lost 1.7.
PHOTO_SETTINGS = (("data", "batch_size", 32), ("train", "epochs", 30), ("train", "tta", "flip"))
# Segmentation (image + mask folders), model auto: the U-Net at SEGMENTATION_SIDE px on a CPU.
SEGMENTATION_MODEL = "unet_small"
SEGMENTATION_SIDE = {"cpu": 256}  # other devices: SEGMENTATION_SIDE_ACCEL (a guess, unmeasured)
SEGMENTATION_SIDE_ACCEL = 512
SEGMENTATION_BATCH = 4
SEGMENTATION_ADAMW_LR = 3e-3  # membrane 0.919 / shapes 0.943 against 0.910 / 0.924 at 1e-3
SEGMENTATION_STEPS = 300  # optimizer steps the default epochs aim at
SEGMENTATION_EPOCHS = (10, 100)  # the default epochs' range
PRETRAINED_ARCH = "resnet18"  # torchvision backbone --pretrained downloads with model auto
PRETRAINED_SIDE = 224  # the side those weights were trained at
PRETRAINED_BODY_LR_MULT = 0.1  # body lr / head lr after the head-only epoch (fastai-like)


@dataclass(frozen=True)
class Choice:
    """What ``model: auto`` resolved to; ``input_size`` None keeps the data's own size."""

    name: str
    input_size: int | None
    pretrained: bool
    reason: str
    settings: tuple = ()  # (section, key, value) applied where the config holds the default
    kwargs: dict = field(default_factory=dict)  # model.kwargs (timm: load from the cached file)

    def line(self) -> str:
        """The one line a run prints: what, why, and how to choose otherwise."""
        side = f" at {self.input_size} px" if self.input_size else ""
        start = "pretrained" if self.pretrained else "from scratch"
        unset = ", ".join(f"{key} {value}" for _, key, value in self.settings)
        unset = f"; where not set: {unset}" if unset else ""
        return (
            f"model auto: {self.name}{side}, {start} ({self.reason}{unset}); "
            f"choose another with --model NAME (cnnkit models), --weights FILE, --input-size N"
        )


def choose(
    side: float,
    num_images: int,
    device: str,
    published: Published | None = None,
    weights_arch: str | None = None,
    download: bool = False,
    no_weights: str = "no pretrained weights on disk",
) -> Choice:
    """The model for data whose training images have median shorter side ``side`` px.

    ``published``: ImageNet weights on disk (``published.find`` or ``fetch``); ``weights_arch``:
    the architecture of the user's ``--weights`` file (``weights_architecture``), which wins;
    ``download``: the user asked for published weights (``--pretrained``), so fetching is fine;
    ``no_weights``: where photos found no weights (the reason given for training from scratch)."""
    if weights_arch is not None:
        return Choice(weights_arch, None, False, "the architecture of the --weights file")
    if download and published is None:
        why = "ImageNet weights downloaded, as --pretrained asks"
        return Choice(f"tv:{PRETRAINED_ARCH}", PRETRAINED_SIDE, True, why)
    if side <= DIGITS_MAX_SIDE:
        return Choice("simple_cnn", None, False, f"small images ({side:g} px)")
    if side <= SMALL_MAX_SIDE:
        name = "resnet18_cifar" if device == "cuda" else "resnet20"
        return Choice(name, None, False, f"{side:g} px images, CIFAR-like, on {device}")
    if published is not None:
        why = f"photos ({side:g} px); ImageNet weights at {published.path}"
        return Choice(published.name, published.side, True, why, kwargs=published.kwargs)
    slim = num_images < SMALL_PHOTO_SET and device == "cpu"
    name = "resnet10_slim" if slim else "resnet18_slim"
    train_side = min(PHOTO_SIDE, int(side))
    why = f"{num_images} photos of {side:g} px on {device}; {train_side} px for time to accuracy"
    return Choice(name, train_side, False, f"{why}; {no_weights}", PHOTO_SETTINGS if slim else ())


def choose_segmentation(side: float, num_images: int, device: str) -> Choice:
    """model: auto for a segmentation run: the U-Net, at the images' own size while their
    shorter side is within the device's ``SEGMENTATION_SIDE``, else at that side (the U-Net
    pads its input to a multiple of its stride, so any size works); the task's training
    defaults come from ``segmentation_settings``."""
    cap = SEGMENTATION_SIDE.get(device, SEGMENTATION_SIDE_ACCEL)
    why = f"{num_images} image/mask pairs of {side:g} px on {device}"
    if side <= cap:
        return Choice(SEGMENTATION_MODEL, None, False, f"{why}; trained at their own size")
    return Choice(SEGMENTATION_MODEL, cap, False, f"{why}; {cap} px for time to accuracy")


def segmentation_settings(num_images: int, optimizer: str = "sgd") -> tuple:
    """(section, key, value) defaults of a segmentation run, applied where the config holds
    the classification default: small batches (a mask is thousands of targets), AdamW at lr
    3e-3 (unless ``optimizer``, the configured one, is another the user chose), no label
    smoothing, no random resized crop (flips and the shapes' own scale), and epochs enough for
    about ``SEGMENTATION_STEPS`` optimizer steps, within [SEGMENTATION_EPOCHS]."""
    steps_per_epoch = max(1, -(-num_images // SEGMENTATION_BATCH))
    low, high = SEGMENTATION_EPOCHS
    epochs = min(high, max(low, round(SEGMENTATION_STEPS / steps_per_epoch)))
    adamw = optimizer in ("sgd", "adamw")  # sgd: the default, so AdamW's lr follows
    return (
        ("data", "batch_size", SEGMENTATION_BATCH),
        ("train", "epochs", epochs),
        ("optim", "name", "adamw"),
        *((("optim", "lr", SEGMENTATION_ADAMW_LR),) if adamw else ()),
        ("train", "label_smoothing", 0.0),
        ("data", "random_resized_crop", False),
    )


# torchvision ResNet state dicts told apart by their keys: (block key that must exist, arch)
_TV_RESNETS = (
    ("layer1.0.conv3.weight", "resnet50"),  # bottleneck blocks
    ("layer3.5.conv1.weight", "resnet34"),  # six blocks in stage 3
    ("layer4.1.conv2.weight", "resnet18"),
)


def weights_architecture(state: dict, meta: dict | None) -> str | None:
    """The model name a ``--weights`` file fits: a cnnkit model file says it (``meta['arch']``);
    a torchvision ResNet state dict is known by its keys; anything else is not guessed."""
    if meta and meta.get("arch"):
        return str(meta["arch"])
    if "fc.weight" not in state:
        return None
    for key, arch in _TV_RESNETS:
        if key in state:
            return f"tv:{arch}"
    return None
