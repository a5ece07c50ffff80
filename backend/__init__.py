"""Finetune Studio's backend: everything that works without a browser (the CLI too)."""
