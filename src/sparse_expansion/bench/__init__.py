"""Speed measurements: kernels on random weights (CPU CSR, GPU 2:4) and whole models against a dense baseline."""
