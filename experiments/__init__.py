"""Experiments built on the d2c_jax core: the paper's Table 1 report and the benchmark against
torch + PEFT. They may import torch (the `test` extra); the core never imports this package."""
