"""Block-by-block calibration: capture every block's arguments, then walk the blocks through observe ->
reduce -> modify -> propagate; statistics with update and merge."""

from .engine import (
    BlockBatch,
    BlockHooks,
    SequentialCalibration,
    Step,
    Watch,
    batch_starts,
    block_outputs,
    identity_reduce,
    move_non_block_parts,
    reduce_across_ranks,
    watching,
)
from .observers import Hessian, InputSquaredNorm, TokenRecorder

__all__ = ["BlockBatch", "BlockHooks", "batch_starts", "Hessian", "InputSquaredNorm", "SequentialCalibration", "Step",
           "TokenRecorder", "Watch", "block_outputs", "identity_reduce", "move_non_block_parts", "reduce_across_ranks",
           "watching"]
