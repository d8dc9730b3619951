"""Tiny, randomly initialised diffusion transformers built from configs (no downloads),
for the tests, the demo and `python -m difffuse report --model ...`."""
