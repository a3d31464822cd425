"""Writing results so that an interrupted or failed run never leaves a partial file or directory."""

from .atomic import atomic_output_dir, atomic_write_text, check_output_path

__all__ = ["atomic_output_dir", "atomic_write_text", "check_output_path"]
