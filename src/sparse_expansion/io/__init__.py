"""Writing results: atomically (no partial file or directory, ever), sparse weights compressed, and the one
model directory format (model_dir.py)."""

from .atomic import atomic_output_dir, atomic_write_text, check_output_path
from .compressed import is_compressed_file, load_compressed, save_compressed
from .model_dir import read_manifest, update_manifest, write_model_dir

__all__ = ["atomic_output_dir", "atomic_write_text", "check_output_path", "is_compressed_file", "load_compressed",
           "read_manifest", "save_compressed", "update_manifest", "write_model_dir"]
