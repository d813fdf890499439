"""GPU kernels (Triton), imported lazily; each has a pure-torch reference in ``commvq.quant``."""
