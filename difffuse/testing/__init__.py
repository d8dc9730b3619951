"""Tiny, randomly initialised diffusion transformers built from configs (no downloads),
for the tests, the demo and `python -m difffuse report --model ...`: tiny_models (Wan
T2V / I2V / TI2V, per-frame Wan), tiny_dits (Flux, Qwen-Image, HunyuanVideo, LTX-Video,
CogVideoX), tiny_pipelines (Wan pipelines, and `call` to run one); sites (eager site
counter, report honesty), expected (matches, sites, attention calls and misses per model
as functions of the block count: the one place these are stated), compiled (one shared
compile per model and case); vendor_stubs (stand-in `sgl_kernel_npu`, `torch_npu` and
`aiter` packages with the real signatures and asserts, to test the NPU / ROCm lowerings
without the hardware); distributed (`free_port` for a local process group); fuzz (the
pattern fuzzer)."""
