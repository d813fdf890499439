"""Corpora (documents -> packed token sequences) and the sharded KV store."""
