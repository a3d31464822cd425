"""Native CPU kernels (C, compiled at first use, called through ctypes) and fair timing of candidates."""
