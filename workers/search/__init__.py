"""Similarity search over a features job's vectors, exact or compressed to fit memory (FAISS, no TensorFlow)."""
