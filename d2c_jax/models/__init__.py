"""Pure-function JAX decoders for the supported Hugging Face architectures."""
