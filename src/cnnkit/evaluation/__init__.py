"""Evaluation: what the model learned, after training.

- ``metrics``: per-class precision/recall/F1, balanced accuracy, top-k, calibration (ECE)
- ``report``: the self-contained report.html and its PNG figures (``plots``, Jinja2 template)
- ``gradcam``: Grad-CAM / Grad-CAM++ through the classifier contract's ``feature_layer``;
  ``explain`` writes overlays for image files
- ``lr_finder``: the learning-rate sweep behind ``cnnkit lr-find`` and ``--lr auto``

(Named ``evaluation`` so that the package does not shadow the ``cnnkit.evaluate`` function.)
"""
