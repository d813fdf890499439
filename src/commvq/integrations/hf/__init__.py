"""Hugging Face transformers integration: model loading, projection capture.

This is the only package of commvq that imports transformers.
"""

from commvq.integrations.hf.attention import register_commvq_attention, use_commvq  # noqa: E402,F401
