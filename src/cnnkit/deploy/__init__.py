"""Using a trained model: batched prediction (export and serving come in later issues)."""
