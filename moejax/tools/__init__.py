"""Tooling that measures, plans, compares or injects faults; the library never imports it.

- `plan` (+ `hlo_stats`): what one train step costs per device at full size, without devices.
- `bench`, `bench_moe`, `bench_pipeline`: benchmarks (interleaved timing, the MoE layer, pipeline).
- `compare` (+ `compare_report`): the architecture comparison and its tables and plots.
- `gpu_check`: every GPU-specific check in one run (scripts/check_gpu.py).
- `kill_trials`: SIGKILL-and-resume trials of the training command (scripts/kill_resume.py).
"""
