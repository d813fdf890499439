"""commvq: CommVQ KV-cache compression for Llama-family LLMs.

Importing this package has no side effects: no patching, no logging set-up, no device probing.
"""

__version__ = "0.1.0"
