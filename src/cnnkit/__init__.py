"""cnnkit: build, train, check, explain and ship convolutional image classifiers with PyTorch.

Public API::

    cnnkit.train(data, model=..., epochs=...)      -> TrainResult (run folder, history, test)
    cnnkit.create_model(name, num_classes, ...)   -> nn.Module with the classifier contract
    cnnkit.list_models(pattern)                   -> registered names
    @cnnkit.register_model(input_size=(C, H, W))   your own builder, listed by `cnnkit models`
    cnnkit.load_model(run_or_model_file)          -> nn.Module (eval mode) with .meta
    cnnkit.evaluate(run_or_model_file, data)      -> metrics dict
    cnnkit.predict(run_or_model_file, images)     -> top-k per image
    cnnkit.report(run_dir, data=None)             -> path of the rebuilt report.html
    cnnkit.explain(model_file, images, out_dir)   -> Grad-CAM overlay PNGs
    cnnkit.lr_find(data, model=...)               -> loss-vs-lr sweep and a suggested lr
    cnnkit.tune(data, trials=..., model=...)      -> optuna.Study (runs/<study>/, best.yaml)

The names are imported on first use so that ``cnnkit --help`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import os as _os

# OpenMP threads that wait by spinning (libgomp's default, "ACTIVE") collapse when anything else
# runs on the same cores: measured on this 2-core machine with other processes busy, 5 epochs of
# the default digits run took 15.6 s at ~230 img/s with spinning and 7.1 s at ~5,000 img/s with
# PASSIVE waiting. Set before torch starts its OpenMP runtime; a value the user set wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_EXPORTS = {
    "train": "cnnkit.run",
    "lr_find": "cnnkit.run",
    "tune": "cnnkit.study",
    "load_model": "cnnkit.deploy.formats",
    "evaluate": "cnnkit.evaluation.scoring",
    "report": "cnnkit.evaluation.scoring",
    "predict": "cnnkit.deploy.predictor",
    "explain": "cnnkit.evaluation.explain",
    "create_model": "cnnkit.models",
    "list_models": "cnnkit.models",
    "register_model": "cnnkit.models",
    "Config": "cnnkit.config",
    "CnnkitError": "cnnkit.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cnnkit' has no attribute '{name}'")
