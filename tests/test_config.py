"""Config: defaults, YAML, dotted overrides, and errors that name the key or type."""

import pytest

from cnnkit.config import Config, load, parse_override
from cnnkit.errors import CnnkitError


def test_defaults_train_on_digits():
    cfg = Config()
    assert cfg.data.source == "digits"
    assert cfg.model.name == "auto"  # resolved by the run: simple_cnn for digits (test_auto)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("optim:\n  name: adamw\n  lr: 0.003\ntrain:\n  epochs: 3\n")
    cfg = load(path, ["optim.weight_decay=5e-4", "train.epochs=7", "model.kwargs={width: 8}"])
    assert cfg.optim.name == "adamw" and cfg.optim.lr == 0.003
    assert cfg.optim.weight_decay == pytest.approx(5e-4)
    assert cfg.train.epochs == 7
    assert cfg.model.kwargs == {"width": 8}


def test_int_accepted_for_float_and_null_for_optional():
    cfg = load(None, ["optim.lr=1", "data.input_size=null"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.input_size is None


def test_saved_config_round_trips(tmp_path):
    cfg = load(None, ["train.seed=3", "data.mixup=0.2"])
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    assert load(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "optim.weight_decy=1",
            "unknown config key 'weight_decy' in section 'optim'. Did you mean 'weight_decay'?",
        ),
        ("optimizer.lr=1", "unknown config key 'optimizer' at the top level"),
        ("train.epochs=ten", "config key 'train.epochs' expects int, got 'ten'"),
        ("train.epochs=true", "expects int, got True"),
        ("lr=0.1", "must look like section.key=value"),
    ],
)
def test_override_errors(override, message):
    with pytest.raises(CnnkitError, match=message.replace("?", r"\?").replace(".", r"\.")):
        load(None, [override])


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  sorce: x\n")
    with pytest.raises(CnnkitError) as e:
        load(path)
    assert "Valid keys: source, val, test" in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(CnnkitError, match="config file not found"):
        load(tmp_path / "nope.yaml")


def test_parse_override_reads_yaml_values():
    assert parse_override("optim.betas=[0.9, 0.95]") == {"optim": {"betas": [0.9, 0.95]}}


LITERAL_CASES = [  # (section.key, a wrong value, the suggestion expected)
    ("runtime.precision", "bf61", "bf16"),
    ("runtime.compile", "onn", "on"),
    ("runtime.channels_last", "of", "off"),
    ("optim.name", "adam", "adamw"),
    ("optim.scheduler", "cosin", "cosine"),
    ("train.tta", "flip_translat", "flip_translate"),
    ("train.monitor", "val_accuracy", "val_acc"),
    ("train.balance", "sampl", "sampler"),
    ("train.nan_policy", "skipp", "skip"),
    ("train.progress", "plan", "plain"),
    ("train.recipe", "speedrn", "speedrun"),
    ("data.decode_cache", "of", "off"),
    ("data.pad_mode", "reflec", "reflect"),
    ("data.auto_augment", "trivia", "trivial"),
    ("data.hflip", "alternat", "alternate"),
    ("data.batch_size", "autoo", "auto"),
    ("optim.lr", "aut", "auto"),
]


@pytest.mark.parametrize(("key", "value", "suggestion"), LITERAL_CASES)
def test_choices_are_refused_when_the_config_loads(key, value, suggestion):
    with pytest.raises(CnnkitError, match=f"'{key}'.*Did you mean '{suggestion}'"):
        load(None, [f"{key}={value}"])
    section, name = key.split(".")
    assert getattr(getattr(load(None, [f"{key}={suggestion}"]), section), name) == suggestion


def test_numbers_and_words_share_a_key():
    cfg = load(None, ["data.batch_size=64", "data.hflip=0.25", "optim.lr=5e-4"])
    assert (cfg.data.batch_size, cfg.data.hflip, cfg.optim.lr) == (64, 0.25, 5e-4)
    with pytest.raises(CnnkitError, match="'data.batch_size' expects int or 'auto', got 'big'"):
        load(None, ["data.batch_size=big"])
    with pytest.raises(CnnkitError, match="data.batch_size must be >= 1"):
        load(None, ["data.batch_size=0"])
    with pytest.raises(CnnkitError, match=r"data.hflip is a probability in \[0, 1\], got 1.5"):
        load(None, ["data.hflip=1.5"])
    with pytest.raises(CnnkitError, match="data.cutout must be >= 0"):
        load(None, ["data.cutout=-2"])


def test_every_choice_has_an_implementation():
    """The config's Literal choices and the tables that implement them name the same things."""
    import typing

    from cnnkit.config import OptimConfig, RuntimeConfig, TrainConfig
    from cnnkit.engine.optim import OPTIMIZERS, SCHEDULERS
    from cnnkit.engine.runtime import PRECISIONS
    from cnnkit.evaluation.tta import TTA_MODES

    def choices(cls, key):
        return set(typing.get_args(typing.get_type_hints(cls)[key]))

    assert choices(OptimConfig, "name") == set(OPTIMIZERS)
    assert choices(OptimConfig, "scheduler") == set(SCHEDULERS)
    assert choices(TrainConfig, "tta") == set(TTA_MODES)
    assert choices(RuntimeConfig, "precision") == {"auto", *PRECISIONS}
