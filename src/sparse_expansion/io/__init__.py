"""Writing results: atomically (no partial file or directory, ever), and sparse weights compressed."""

from .atomic import atomic_output_dir, atomic_write_text, check_output_path
from .compressed import is_compressed_file, load_compressed, save_compressed

__all__ = ["atomic_output_dir", "atomic_write_text", "check_output_path", "is_compressed_file", "load_compressed",
           "save_compressed"]
