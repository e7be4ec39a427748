"""Command-line interface: one thin module per verb; parsing and printing only, the work is in
the library (``cnnkit.run``, ``cnnkit.evaluation``, ``cnnkit.deploy``...). Verbs import the library
inside their function so that ``cnnkit --help`` and torch-free verbs (doctor) stay fast."""
