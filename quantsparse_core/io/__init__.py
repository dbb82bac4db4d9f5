"""Reading and writing QuantSparse compressed checkpoints (see docs/FORMAT.md)."""
from .checkpoint import FORMAT_NAME, FORMAT_VERSION, CheckpointError, load_compressed, save_compressed

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "CheckpointError", "load_compressed", "save_compressed"]
