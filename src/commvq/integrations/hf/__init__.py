"""Hugging Face transformers integration: model loading, projection capture.

This is the only package of commvq that imports transformers.
"""
