"""Speed/memory benchmark of d2c_jax against the paper's way of working (torch + PEFT), used by
`launch/benchmark.py`: `fixture` (the random model, adapters and examples, cached), `sessions`
(the reference and d2c_jax columns, each in its own process) and `tables` (what is printed)."""
