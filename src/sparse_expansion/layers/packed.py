"""A pruned matrix held as a bitmask and its kept values, in the model's dtype or as codes on a 4-/8-bit grid.

`PackedWeight` is the form the CPU products of `kernels/bitmask_kernels.c` read: per row, ceil(cols / 64)
uint64 words of mask and the row's non-zeros, one after another. At sparsity s a decoded token reads
1/8 + (1 - s) x itemsize bytes per weight: 0.725 for bf16 at 70% (dense bf16: 2), 0.275 for 4-bit codes.
A `--bits` model's weights lie on a per-row grid w = scale (code - zero); `recover_grid` finds that grid
from the stored values, checked bit for bit, so the codes are held instead of the floats.

`choose_form` picks, per matrix, the form a decoded token reads the fewest bytes of: this bitmask form,
or CSR (fp32 only, `sparse_linear.CSRWeight`), which wins only above ~94% sparsity.
"""

from __future__ import annotations

import numpy as np
import torch

from ..kernels import native
from .protocol import tensor_bytes
from .switch import Switched

IO_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
VALUE_KINDS = {**IO_KINDS, 8: 3, 4: 4}  # a float dtype, or the bits of a grid's codes
SPARE = 16  # values past the end that the vector loads may read (zeros)

__all__ = ["IO_KINDS", "PackedWeight", "bitmask_bytes", "choose_form", "pack_rows", "packed_stack", "recover_grid"]


def bitmask_bytes(rows: int, cols: int, nnz: int, itemsize: float) -> float:
    """What one token reads of a bitmask matrix: its mask words, values and row offsets."""
    return rows * ((cols + 63) // 64) * 8 + nnz * itemsize + 8 * (rows + 1)


def choose_form(rows: int, cols: int, nnz: int, dtype: torch.dtype, bits: int | None = None) -> str:
    """`bitmask` or `csr`: the fewer bytes per decoded token (CSR: 16-bit column indices, fp32 values; there is
    a CSR kernel for fp32 only)."""
    if bits is not None or dtype != torch.float32:
        return "bitmask"
    csr = nnz * (4 + (2 if cols <= native.UINT16_COLUMNS else 4)) + 8 * (rows + 1)
    return "csr" if csr < bitmask_bytes(rows, cols, nnz, 4) else "bitmask"


def pack_rows(nonzero: np.ndarray) -> torch.Tensor:
    """A (rows, cols) bool array as (rows, words) uint64 mask words (bit j of word w: column 64 w + j), held
    in an int64 tensor."""
    rows, cols = nonzero.shape
    words = (cols + 63) // 64
    if cols % 64:
        nonzero = np.pad(nonzero, ((0, 0), (0, words * 64 - cols)))
    packed = np.packbits(nonzero, axis=1, bitorder="little")  # little-endian hosts: bytes in word order
    return torch.from_numpy(np.ascontiguousarray(packed).view(np.int64).reshape(rows, words))


def _row_counts(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.bitwise_count(mask.numpy().view(np.uint64)).sum(1, dtype=np.int64))


def _with_spare(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values.reshape(-1), values.new_zeros(SPARE)])


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes < 16, two a byte, low nibble first."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _fit_grid(v: torch.Tensor, row_of: torch.Tensor, counts: torch.Tensor, maxq: int, levels) -> tuple:
    """Try, row by row, the scales amax / level for each candidate level count (a (rows,) tensor each) and the
    floats an ulp or two around them; keep the first that reproduces every value of the row exactly."""
    rows = counts.numel()
    amax = torch.zeros(rows).scatter_reduce(0, row_of, v.abs(), "amax")
    scale, zero, found = torch.ones(rows), torch.zeros(rows), counts == 0
    codes = torch.zeros(v.numel(), dtype=torch.int64)
    for level in levels:
        base = amax / level.clamp(1, maxq)
        for ulps in (0, 1, -1, 2, -2):  # the scale that rounds to the largest value lies within an ulp or two
            candidate = base
            for _ in range(abs(ulps)):
                candidate = torch.nextafter(candidate, candidate * (2.0 if ulps > 0 else 0.0))
            candidate = torch.where(candidate > 0, candidate, torch.ones(rows))
            k = torch.round(v / candidate[row_of])
            exact = (candidate[row_of] * k == v).to(torch.int64)
            low = torch.zeros(rows).scatter_reduce(0, row_of, k, "amin")  # the initial 0 keeps low <= 0 <= high
            high = torch.zeros(rows).scatter_reduce(0, row_of, k, "amax")
            ok = (torch.zeros(rows, dtype=torch.int64).scatter_add(0, row_of, exact) == counts) & (high - low <= maxq)
            new = ok & ~found
            if bool(new.any()):
                scale, zero = torch.where(new, candidate, scale), torch.where(new, -low, zero)
                codes = torch.where(new[row_of], (k - low[row_of]).to(torch.int64), codes)
                found |= new
            if bool(found.all()):
                return codes, scale, zero, found
    return codes, scale, zero, found


def recover_grid(values: torch.Tensor, counts: torch.Tensor, bits: int) -> tuple | None:
    """The per-row grid of a quantized matrix from its kept values (row-major, `counts` per row): codes
    (uint8), scale and zero (fp32 per row) with scale * (code - zero) == value bit for bit in fp32, as the
    quantizer computed it, and codes in [0, 2**bits - 1]; None when some row has no such grid (the values
    were not quantized to `bits`)."""
    rows, maxq = counts.numel(), 2 ** bits - 1
    v = values.to(torch.float32).reshape(-1)
    row_of = torch.repeat_interleave(torch.arange(rows), counts)
    # The smallest step between the row's levels (0 is always one): amax / step levels, or a multiple of that.
    order = torch.argsort(v, stable=True)
    order = order[torch.argsort(row_of[order], stable=True)]
    sv, sr = v[order], row_of[order]
    step = torch.full((rows,), float("inf")).scatter_reduce(0, row_of, v.abs(), "amin")
    if v.numel() > 1:
        gap = sv[1:] - sv[:-1]
        same = (sr[1:] == sr[:-1]) & (gap > 0)
        step = step.scatter_reduce(0, sr[1:][same], gap[same], "amin")
    amax = torch.zeros(rows).scatter_reduce(0, row_of, v.abs(), "amax")
    ratio = torch.where(amax > 0, amax / step, torch.ones(rows))
    codes, scale, zero, found = _fit_grid(v, row_of, counts, maxq, (torch.round(ratio * span) for span in range(1, 5)))
    if not bool(found.all()):  # rows with few values: every level count, on those rows alone
        left = (~found).nonzero().flatten()
        take = ~found[row_of]
        remap = torch.full((rows,), -1, dtype=torch.int64)
        remap[left] = torch.arange(left.numel())
        sub = _fit_grid(v[take], remap[row_of[take]], counts[left], maxq,
                        (torch.full((left.numel(),), float(level)) for level in range(1, maxq + 1)))
        if not bool(sub[3].all()):
            return None
        codes[take], scale[left], zero[left] = sub[0], sub[1], sub[2]
    return codes.to(torch.uint8), scale, zero


class PackedWeight(Switched):
    """A (rows x cols) matrix as mask words, row offsets and kept values (`values` in `dtype`, or codes of a
    `bits`-bit grid with per-row `scale` and `zero`). Products take and give the layer's dtype."""

    def __init__(self, rows: int, cols: int, mask: torch.Tensor, rowoff: torch.Tensor, values: torch.Tensor,
                 dtype: torch.dtype, bits: int | None = None, scale: torch.Tensor | None = None,
                 zero: torch.Tensor | None = None):
        super().__init__()
        self.rows, self.cols, self.words = rows, cols, (cols + 63) // 64
        self.mask, self.rowoff, self.values = mask.contiguous(), rowoff.contiguous(), values.contiguous()
        self.dtype, self.bits = dtype, bits
        self.scale = None if scale is None else scale.to(torch.float32).contiguous()
        self.zero = None if zero is None else zero.to(torch.float32).contiguous()
        self.kind = VALUE_KINDS[bits if bits is not None else dtype]
        self.nnz = int(rowoff[-1])
        self._lib = None

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, dtype: torch.dtype | None = None) -> PackedWeight:
        """A dense (rows x cols) matrix, its values held in `dtype` (default: its own)."""
        weight = weight.detach().to("cpu")
        dtype = dtype or weight.dtype
        nonzero = weight != 0
        return cls.from_mask(pack_rows(nonzero.numpy()), weight[nonzero], *weight.shape, dtype)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, values: torch.Tensor, rows: int, cols: int, dtype: torch.dtype,
                  bits: int | None = None) -> PackedWeight:
        """Mask words (`pack_rows`) and the kept values in row-major order; with `bits`, the values are held as
        codes of their recovered grid (`recover_grid`), else (no grid found) as floats in `dtype`."""
        counts = _row_counts(mask)
        rowoff = torch.zeros(rows + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=rowoff[1:])
        grid = recover_grid(values, counts, bits) if bits is not None else None
        if grid is None:
            return cls(rows, cols, mask, rowoff, _with_spare(values.to(dtype)), dtype)
        codes, scale, zero = grid
        stored = _pack_nibbles(codes) if bits == 4 else codes
        return cls(rows, cols, mask, rowoff, _with_spare(stored), dtype, bits, scale, zero)

    # -- what it holds ---------------------------------------------------------------------------------------
    @property
    def density(self) -> float:
        return self.nnz / (self.rows * self.cols) if self.rows * self.cols else 0.0

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.mask, self.rowoff, self.values, self.scale, self.zero)

    def bytes_at_one_token(self, dense: torch.Tensor) -> int:
        """Weight bytes one token reads: these arrays when the kernel runs at one token, else the matrix
        (`dense`: the layer's weight, or a stand-in of its shape and dtype)."""
        return self.nbytes if self.use_sparse(1) else dense.numel() * dense.element_size()

    def use_sparse(self, tokens: int) -> bool:
        return self.use_fast(tokens)

    def _args(self):
        def ptr(t):
            return None if t is None else t.data_ptr()

        return (self.kind, self.rows, self.cols, self.words, ptr(self.mask), ptr(self.rowoff), ptr(self.values),
                ptr(self.scale), ptr(self.zero))

    def _library(self):
        if self._lib is None:
            self._lib = native.library()
        return self._lib

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The matrix back: exactly the stored weights (a grid's as scale * (code - zero) in fp32), in `dtype`."""
        dtype = dtype or self.dtype
        out = torch.empty(self.rows, self.cols, dtype=dtype)
        kind, rows, cols, words, *arrays = self._args()
        self._library().bm_decode(kind, rows, cols, words, *arrays, out.data_ptr(), IO_KINDS[dtype])
        return out

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (tokens x cols), contiguous on the CPU in fp32/bf16/fp16 -> x W^T + bias in x's dtype; `bias` fp32."""
        tokens = x.shape[0]
        out = torch.empty(tokens, self.rows, dtype=x.dtype)
        io = IO_KINDS[x.dtype]
        bias_ptr = None if bias is None else bias.data_ptr()
        lib = self._library()
        if tokens == 1:
            failed = lib.bm_matvec(*self._args(), x.data_ptr(), io, bias_ptr, out.data_ptr(), io)
        else:
            kind, rows, cols, words, *arrays = self._args()
            failed = lib.bm_matmul(kind, rows, cols, words, tokens, *arrays, x.data_ptr(), io, bias_ptr,
                                   out.data_ptr(), io)
        if failed:
            raise MemoryError("sparse kernel could not allocate its input buffer")
        return out


def packed_stack(mask: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                 bits: int | None = None) -> list[PackedWeight]:
    """The matrices of a (..., rows, cols) tensor stored as a bitmask (`mask`: uint8, a bit per element of the
    row-major tensor, little-endian bit order; `values`: its non-zeros in row-major order), each as a
    `PackedWeight`, without decoding any of them to dense."""
    rows, cols = shape[-2], shape[-1]
    matrices = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    words = (cols + 63) // 64
    if cols % 64 == 0:  # rows start on word boundaries: the file's bits are the mask words as they are
        all_words = mask[:matrices * rows * cols // 8].contiguous().view(torch.int64).reshape(matrices * rows, words)
    else:
        flat = np.unpackbits(mask.numpy(), count=matrices * rows * cols, bitorder="little").view(bool)
        all_words = pack_rows(flat.reshape(matrices * rows, cols))
    counts = _row_counts(all_words).reshape(matrices, rows).sum(1).tolist()
    offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
    return [PackedWeight.from_mask(all_words[m * rows:(m + 1) * rows].clone(), values[offsets[m]:offsets[m + 1]],
                                   rows, cols, dtype, bits) for m in range(matrices)]
