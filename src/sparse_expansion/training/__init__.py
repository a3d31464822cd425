"""Small-scale training for the Sparsing Law study: tiny decoder LMs from scratch, checkpoints, resume."""
