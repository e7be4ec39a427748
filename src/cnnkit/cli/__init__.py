"""Command-line interface: one thin module per verb; parsing only, the work is in cnnkit.api."""
