"""QuantSparse core: low-bit quantization + sparse attention for HunyuanVideo-architecture DiTs.

Plain PyTorch. Importing this package never imports ComfyUI.
"""

__version__ = "0.1.0"
