"""Whole-command benchmark of d2c_jax against the paper's way of working (torch + PEFT), used by
`launch/benchmark.py`: `fixture` (the random model, adapters and examples, cached), `torch_loop`
(the plain transformers + PEFT loop), `commands` (the columns, run one after the other as whole
commands, and the printed table) and `replay_counts` (what each engine change buys, in counts)."""
