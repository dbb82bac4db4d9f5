"""Quantizers, packing and quantized linears."""
