"""Integrations with model libraries. Only ``commvq.integrations.hf`` imports transformers."""
