"""Model side of the workers: the architecture registry (no TensorFlow) and the loader (TensorFlow)."""
