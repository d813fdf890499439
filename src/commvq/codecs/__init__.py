"""Thin stateful codecs over the pure math in ``commvq.quant``."""
