"""difffuse benchmarks (a CUDA GPU; diffusers for the model-level ones). Run each from the
repository root as a module, e.g. `python -m benchmarks.wan_step --model 1.3b`; results,
with date, device and versions, are in benchmarks/RESULTS.md, the runs' output in
benchmarks/logs/.

- harness: what the scripts share (timing, clocks, the compile modes and the fair
  attention peer, the Wan model at real shapes, step timing and profiling, tables / CSV);
- kernels: per subgraph at Wan shapes; qk_candidates: the two qk-norm+rope kernels;
  tune_triton: num_warps / qk head-chunk sweep; graph_kernel_probe: a kernel in the
  compiled graph against a direct launch;
- attention: attention per call (every installed exact kernel, key-count sweep, FA4 cold
  start); attention_layout: which attention op, strides and cuDNN engine each mode runs;
- wan_step / dit_step: one denoising step of Wan / another DiT, modes alternated;
  wan_pipeline: the whole 480p Wan pipeline; wan_cp: context parallel (under torchrun).

The scripts with a result table take `--csv PATH` to also write it as CSV, except
tune_triton (its arguments are positional: the WARPS json to write, a kernel filter).
"""
