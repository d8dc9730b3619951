"""Tiny, randomly initialised diffusion transformers built from configs (no downloads),
for the tests, the demo and `python -m difffuse report --model ...`: tiny_models (Wan
T2V / I2V / TI2V, per-frame Wan), tiny_dits (Flux, Qwen-Image, HunyuanVideo, LTX-Video,
CogVideoX), tiny_pipelines (Wan pipelines); sites (eager site counter, report honesty),
expected (matches and sites per model as functions of the block count), compiled (one
shared compile per model and case)."""
