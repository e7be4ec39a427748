"""Using a trained model: prediction from any format, export with parity checks, bench, server."""
