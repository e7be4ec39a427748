"""``python -m cnnkit`` runs the CLI (torchrun launches it this way too)."""

from cnnkit.cli.main import main

main()
