"""Evaluation: metrics and, in later issues, reports, plots, Grad-CAM and the lr finder.

(Named ``evaluation`` so that the package does not shadow the ``cnnkit.evaluate`` function.)
"""
