"""One ``Augment`` spec, two executors: every op run through the per-sample ``SampleAugment`` and
the batched ``BatchAugment`` and compared, pixel for pixel on the same parameters and in the
distribution of the parameters each draws itself."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from cnnkit.config import DataConfig, from_dict
from cnnkit.data import Augment, build, make_loader
from cnnkit.data.augment import OPS, resolve
from cnnkit.data.batchaug import BatchAugment, batchable
from cnnkit.data.datasets import TensorImageDataset
from cnnkit.data.memory import MemoryLoader, run_loader
from cnnkit.data.transforms import SampleAugment, make_preprocessing
from cnnkit.errors import CnnkitError

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
GREY_LEVEL = 1 / (255 * min(STD))  # one uint8 step, normalised


@dataclass
class Case:
    op: str  # the op of ``OPS`` the case is about
    aug: Augment
    stored: tuple[int, int] = (32, 32)  # (H, W) of the uint8 images the executors get
    out: tuple[int, int] = (32, 32)  # (H, W) of the input size
    # per sample, torchvision resamples uint8 in fixed point and rounds (off by one level at most);
    # the batched resample stays in float
    atol: float = 0.0

    def __str__(self) -> str:
        return self.op + "-" + "-".join(f"{k}={v}" for k, v in vars(self.aug).items() if v)


BOTH = [
    Case("pad_crop", Augment(pad_crop=4)),
    Case("pad_crop", Augment(pad_crop=3, pad_mode="reflect")),
    Case("hflip", Augment(hflip=0.5)),
    Case("hflip", Augment(hflip="alternate")),
    Case("cutout", Augment(cutout=8)),
    # stored smaller than the output: only upscaling, where antialiasing changes nothing
    Case(
        "random_resized_crop",
        Augment(random_resized_crop=True, rrc_scale=(0.25, 1.0)),
        stored=(16, 20),
        out=(24, 24),
        atol=1.001 * GREY_LEVEL,
    ),
    Case("pad_crop", Augment(pad_crop=2, pad_mode="reflect", hflip=0.5, cutout=6)),
    Case("rotate", Augment(rotate=20.0), stored=(24, 32), out=(24, 32)),
    Case("rotate", Augment(rotate=10.0, pad_crop=2, hflip=0.5)),
]
PER_SAMPLE_ONLY = [
    Augment(auto_augment="trivial"),
    Augment(auto_augment="rand"),
    Augment(random_erasing=0.5),
]


def executors(case: Case, seed: int = 5) -> tuple[BatchAugment, SampleAugment]:
    pre = make_preprocessing(3, case.out, MEAN, STD, "none")
    return BatchAugment(case.aug, MEAN, STD, case.out, seed=seed), SampleAugment(
        case.aug, pre, seed
    )


def images(case: Case, b: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (b, 3, *case.stored), generator=g, dtype=torch.uint8)


def one(params: dict, i: int) -> dict:
    """Image ``i``'s parameters from a batch draw, in the per-sample executor's form."""
    out = {}
    for key, value in params.items():
        if key == "flip":
            out[key] = bool(value[i])
        elif key == "angle":
            out[key] = float(value[i])
        else:
            out[key] = tuple(value[i].long().tolist())
    return out


def test_every_op_runs_through_both_executors_or_is_per_sample_only():
    covered = {case.op for case in BOTH} | {op for aug in BOTH for op in aug.aug.ops()}
    per_sample = {op for aug in PER_SAMPLE_ONLY for op in aug.ops()}
    assert covered | per_sample == set(OPS) and not covered & per_sample
    assert all(batchable(case.aug) for case in BOTH)
    assert not any(batchable(aug) for aug in PER_SAMPLE_ONLY)


@pytest.mark.parametrize("case", BOTH, ids=str)
def test_same_parameters_give_the_same_pixels(case):
    batch_aug, sample_aug = executors(case)
    batch = images(case)
    indices = torch.arange(100, 100 + len(batch))
    params = batch_aug.draw(batch.shape, indices, epoch=3, step=2, device="cpu")
    out = batch_aug.apply(batch, params)
    for i in range(len(batch)):
        ours = sample_aug.apply(batch[i], one(params, i))
        torch.testing.assert_close(ours, out[i], rtol=0, atol=case.atol)
        if case.atol:  # the same geometry: a float image is not rounded on the way
            exact = sample_aug.apply(batch[i].float(), one(params, i))
            torch.testing.assert_close(exact, out[i], rtol=0, atol=0.01 * GREY_LEVEL)


@pytest.mark.parametrize("case", BOTH, ids=str)
def test_each_executor_draws_from_the_same_distribution(case):
    batch_aug, sample_aug = executors(case)
    n = 4000
    image = images(case, b=1)[0]
    indices = torch.arange(n)
    batched = batch_aug.draw((n, 3, *case.stored), indices, epoch=1, step=0, device="cpu")
    torch.manual_seed(1)  # the per-sample executor draws from the global RNG (the loader seeds it)
    drawn = [sample_aug.draw(image, i, epoch=1) for i in range(n)]
    for key, value in batched.items():
        ours = torch.tensor([d[key] for d in drawn], dtype=torch.float64).view(n, -1)
        theirs = value.double().view(n, -1)
        if key == "box":  # compare what a box is: its area share and aspect
            ours, theirs = _box_shape(ours, case.stored), _box_shape(theirs, case.stored)
        if key == "angle":  # in units of the largest turn
            ours, theirs = ours / case.aug.rotate, theirs / case.aug.rotate
        torch.testing.assert_close(ours.mean(0), theirs.mean(0), rtol=0.05, atol=0.02)
        torch.testing.assert_close(ours.std(0), theirs.std(0), rtol=0.08, atol=0.02)
    if case.aug.hflip == "alternate":  # no randomness left: the very same flips
        assert [d["flip"] for d in drawn] == batched["flip"].tolist()


def _box_shape(boxes: torch.Tensor, stored: tuple[int, int]) -> torch.Tensor:
    """(N, 4) boxes (top, left, height, width) -> (N, 2): area share, log aspect (w / h)."""
    area = boxes[:, 2] * boxes[:, 3] / (stored[0] * stored[1])
    return torch.stack([area, torch.log(boxes[:, 3] / boxes[:, 2])], dim=1)


@pytest.mark.parametrize("aug", PER_SAMPLE_ONLY, ids=lambda a: "-".join(a.ops()))
def test_per_sample_only_ops_run_per_sample_and_are_refused_batched(aug):
    with pytest.raises(ValueError, match="no batched step"):
        BatchAugment(aug, MEAN, STD, (32, 32))
    pre = make_preprocessing(3, (32, 32), MEAN, STD, "none")
    sample_aug = SampleAugment(aug, pre, seed=0)
    plain = SampleAugment(Augment(), pre, seed=0)
    batch = images(Case("", aug), b=200)
    torch.manual_seed(0)
    changed = [not torch.equal(sample_aug(x, i), plain(x, i)) for i, x in enumerate(batch)]
    share = sum(changed) / len(changed)
    # erasing: its probability; trivial/rand augment: most images (identity is one of the ops)
    assert abs(share - aug.random_erasing) < 0.1 if aug.random_erasing else share > 0.7


def test_alternate_flip_batches_are_identical_on_both_paths():
    """hflip=alternate is the same rule per sample (DataLoader) and batched (in memory)."""
    aug = Augment(hflip="alternate")
    batch = images(Case("", aug, stored=(8, 8)), b=40)
    targets = list(range(40))
    pre = make_preprocessing(3, (8, 8), MEAN, STD, "none")
    per_sample = TensorImageDataset(batch, targets, SampleAugment(aug, pre, seed=3))
    loader = make_loader(per_sample, 8, train=True, seed=3)
    cfg = DataConfig(decode_cache="on")
    memory = run_loader(
        per_sample, pre, aug, cfg, 8, train=True, seed=3, device=torch.device("cpu")
    )
    assert isinstance(memory, MemoryLoader)
    seen = {}
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        memory.set_epoch(epoch)
        for (x, y), (bx, by) in zip(loader, memory, strict=True):
            assert torch.equal(y, by) and torch.equal(x, bx)
            for image, label in zip(x, y.tolist(), strict=True):
                seen.setdefault(label, []).append(image)
    assert all(torch.equal(a.flip(2), b) for a, b in seen.values())  # both ways in 2 epochs


def test_resolve_takes_the_config_then_the_preset_then_the_size_default():
    small, large = resolve(DataConfig(), (32, 32)), resolve(DataConfig(), (224, 224))
    assert (small.pad_crop, small.hflip, small.random_resized_crop) == (4, 0.5, False)
    assert (large.pad_crop, large.random_resized_crop, large.rrc_scale) == (0, True, (0.08, 1.0))
    preset = {"hflip": 0.0, "pad_crop": 2}
    assert resolve(DataConfig(), (28, 28), preset).pad_crop == 2
    assert resolve(DataConfig(pad_crop=0, hflip="alternate"), (28, 28), preset) == Augment(
        pad_crop=0, hflip="alternate", rrc_scale=(0.25, 1.0)
    )
    given = from_dict({"data": {"rrc_scale": [0.35, 1]}}).data
    assert resolve(given, (224, 224)).rrc_scale == (0.35, 1.0)
    for bad in ([0.5, 0.2], [0, 1], [0.5], ["a", 1]):
        with pytest.raises(CnnkitError, match="data.rrc_scale"):
            from_dict({"data": {"rrc_scale": bad}})
    # choices are refused when the config loads (tests/test_config.py), not by the spec
    with pytest.raises(CnnkitError, match="alternate"):
        from_dict({"data": {"hflip": "sometimes"}})
    with pytest.raises(CnnkitError, match="trivial"):
        from_dict({"data": {"auto_augment": "wild"}})


def test_build_resolves_the_spec_once_and_the_train_split_runs_it():
    splits = build(DataConfig(hflip="alternate", cutout=2, pad_crop=1), seed=4)
    aug = splits.augment
    assert (aug.hflip, aug.cutout, aug.pad_crop) == ("alternate", 2, 1)
    transform = splits.train.transform
    assert isinstance(transform, SampleAugment) and transform.aug is aug and transform.seed == 4
