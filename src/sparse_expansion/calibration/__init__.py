"""Block-by-block calibration: capture the first block's inputs, then walk the blocks in order."""

from .engine import BlockBatch, SequentialCalibration
from .hooks import record_inputs

__all__ = ["BlockBatch", "SequentialCalibration", "record_inputs"]
