"""Quantizers, smoothing + rotation, quantized linears and the layer policy (the int4 layout lives with
the kernels: quantsparse_core.dispatch.pack_int4)."""
