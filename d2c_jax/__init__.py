"""d2c_jax: data-driven clustering and merging of LoRA adapters (D²C) in JAX."""
