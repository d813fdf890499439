"""Evaluations: key-codebook errors, perplexity and KL, synthetic retrieval, LongBench."""
