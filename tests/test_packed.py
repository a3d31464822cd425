"""Bitmask + values products in bf16/fp16/fp32 and on 4-/8-bit grids, and models held in that form from the file."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import sparse_expansion
from conftest import make_model, random_windows
from sparse_expansion.errors import UsageError
from sparse_expansion.evaluation import perplexity
from sparse_expansion.expansion import ExpansionConfig, ExpertLinear, expand_model
from sparse_expansion.inference import accelerate
from sparse_expansion.layers.packed import PackedWeight, choose_form, pack_rows, packed_stack, recover_grid
from sparse_expansion.layers.sparse_linear import SparseLinear
from sparse_expansion.models import discover
from sparse_expansion.models.model_dir import load_model_dir
from sparse_expansion.pruning import PruneOptions, SparsitySpec, get_method, prune_model
from sparse_expansion.pruning.quantization import ChannelQuantizer

LLAMA_7B_SHAPES = [(11008, 4096), (4096, 11008)]  # gate/up and down projections
EMBEDDED_SHAPES = [(1536, 576), (576, 1536)]


def pruned(rows, cols, sparsity=0.7, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    return weight.masked_fill(torch.rand(rows, cols, generator=generator) < sparsity, 0).to(dtype)


def assert_close_to_exact(got, x, weight, rtol):
    """Against the float64 product of the same (rounded) operands, relative to sum |w||x| per output: fp32
    accumulation error plus one rounding of the output to its dtype."""
    exact = F.linear(x.double(), weight.double())
    scale = F.linear(x.double().abs(), weight.double().abs())
    error = (got.double() - exact).abs()
    assert bool((error <= rtol * scale + 1e-6).all()), float((error / (scale + 1e-30)).max())


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 2 ** -8), (torch.float16, 2 ** -11)])
@pytest.mark.parametrize("rows,cols", LLAMA_7B_SHAPES + EMBEDDED_SHAPES)
def test_reduced_precision_products_match_dense(dtype, rtol, rows, cols):
    if (rows, cols) in LLAMA_7B_SHAPES:
        rows = 2048 if dtype == torch.bfloat16 else 512  # the 7B rows' lengths, fewer of them: the same inner loops
    weight = pruned(rows, cols, dtype=dtype)
    packed = PackedWeight.from_dense(weight)
    assert packed.dtype == dtype and packed.nnz == int(torch.count_nonzero(weight))
    assert torch.equal(packed.to_dense(), weight)
    for tokens in (1, 16, 128):
        x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens)).to(dtype)
        got = packed.matmul(x)
        assert got.dtype == dtype and got.shape == (tokens, rows)
        assert_close_to_exact(got, x, weight, rtol)
        # within bf16/fp16 tolerance of torch's own dense product in that dtype
        torch.testing.assert_close(got.float(), F.linear(x, weight).float(), rtol=8 * rtol, atol=8 * rtol * cols ** 0.5)


@pytest.mark.parametrize("rows,cols", [(37, 29), (5, 130), (64, 576), (3, 64)])
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_fp32_products_odd_shapes_bias_and_empty_rows(rows, cols, tokens):
    weight = pruned(rows, cols, 0.6, seed=rows)
    weight[0] = 0
    packed = PackedWeight.from_dense(weight)
    bias = torch.randn(rows)
    x = torch.randn(tokens, cols)
    exact = F.linear(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(packed.matmul(x, bias).double(), exact, rtol=1e-5, atol=1e-5)
    assert torch.equal(PackedWeight.from_dense(torch.zeros(4, 9)).matmul(torch.randn(2, 9)), torch.zeros(2, 4))


def quantized(rows, cols, bits, sparsity=0.7, seed=0):
    """A pruned matrix on the quantizer's grid: every kept weight is scale * (q - zero) (ChannelQuantizer)."""
    weight = pruned(rows, cols, sparsity, seed)
    quantizer = ChannelQuantizer(bits).fit(weight)
    on_grid = torch.stack([quantizer.quantize(weight[:, c]) for c in range(cols)], 1)
    return on_grid * (weight != 0), quantizer


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows,cols", [(37, 29), (256, 576), (96, 1536)])
def test_quantized_products_match_the_dequantized_dense_product(bits, rows, cols):
    weight, quantizer = quantized(rows, cols, bits)
    nonzero = weight != 0
    packed = PackedWeight.from_mask(pack_rows(nonzero.numpy()), weight[nonzero], rows, cols, torch.float32, bits)
    assert packed.bits == bits  # the grid was found: codes are held, not floats
    assert packed.values.dtype == torch.uint8
    assert packed.values.numel() <= (packed.nnz + 1) // (2 if bits == 4 else 1) + 16
    assert torch.equal(packed.to_dense(torch.float32), weight)  # scale * (code - zero), bit for bit
    for tokens in (1, 16, 33):
        x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
        assert_close_to_exact(packed.matmul(x), x, weight, 1e-5)
        xb = x.to(torch.bfloat16)
        assert_close_to_exact(PackedWeight.from_mask(packed.mask, weight[nonzero], rows, cols, torch.bfloat16, bits)
                              .matmul(xb), xb, weight, 2 ** -8)


def test_a_grid_is_recovered_exactly_or_refused():
    weight, quantizer = quantized(64, 200, 4)
    counts = (weight != 0).sum(1)
    codes, scale, zero = recover_grid(weight[weight != 0], counts, 4)
    assert int(codes.max()) <= 15
    row_of = torch.repeat_interleave(torch.arange(64), counts)
    assert torch.equal(scale[row_of] * (codes.float() - zero[row_of]), weight[weight != 0])
    assert recover_grid(torch.randn(50), torch.tensor([50]), 4) is None  # 50 random floats are on no 16-level grid
    assert recover_grid(weight[weight != 0], counts, 2) is None  # more levels than 2 bits hold


def test_storage_form_follows_the_bytes_a_token_reads():
    # 70% bf16: bitmask 0.125 + 0.6 bytes per weight against CSR's 0.3 x 4; fp32 CSR only far past 90%.
    assert choose_form(4096, 4096, int(0.3 * 4096 ** 2), torch.bfloat16) == "bitmask"
    assert choose_form(4096, 4096, int(0.3 * 4096 ** 2), torch.float32) == "bitmask"
    assert choose_form(4096, 4096, int(0.02 * 4096 ** 2), torch.float32) == "csr"
    assert choose_form(4096, 4096, int(0.02 * 4096 ** 2), torch.float32, bits=4) == "bitmask"


def test_a_file_bitmask_becomes_packed_matrices_without_decoding():
    import numpy as np

    stack = torch.stack([pruned(48, cols_, seed=s) for s, cols_ in enumerate([100] * 3)])
    for tensor in (stack, pruned(70, 128, seed=9).unsqueeze(0)):
        nonzero = (tensor != 0).numpy().reshape(-1)
        bits = torch.from_numpy(np.packbits(nonzero, bitorder="little"))
        kernels = packed_stack(bits, tensor[tensor != 0], tuple(tensor.shape), torch.float32)
        assert [torch.equal(k.to_dense(), m) for k, m in zip(kernels, tensor)] == [True] * tensor.shape[0]


@pytest.fixture(scope="module")
def directories(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("packed")
    windows = random_windows()
    model = make_model("llama")
    expand_model(model, discover(model), windows, SparsitySpec(0.7), ExpansionConfig(experts=4, pca_reduction=8),
                 progress=False)
    sparse_expansion.save(model, tokenizer, out / "expanded")
    model = make_model("llama")
    prune_model(model, discover(model), windows, get_method("sparsegpt", 4), SparsitySpec(0.7),
                options=PruneOptions(bits=4), progress=False)
    sparse_expansion.save(model, tokenizer, out / "int4", manifest={"bits": 4})
    return out


def test_an_expanded_directory_loaded_compact_gives_the_same_perplexity(directories):
    whole, _, _ = load_model_dir(directories / "expanded")
    held, _, _ = load_model_dir(directories / "expanded", compact=True)
    experts = [m for m in held.modules() if isinstance(m, ExpertLinear)]
    assert experts and all(m.compacted and m.weight.untyped_storage().nbytes() <= 4 for m in experts)
    assert all(isinstance(k, PackedWeight) for m in experts for k in m.expert_kernels)
    windows = random_windows(4, 24, seed=3)
    expected = perplexity(whole, windows, batch_size=2, progress=False).ppl
    assert perplexity(held, windows, batch_size=2, progress=False).ppl == pytest.approx(expected, rel=1e-5)
    accelerate(held, "always")  # every product through the kernels (fp32 accumulation in another order)
    assert perplexity(held, windows, batch_size=2, progress=False).ppl == pytest.approx(expected, rel=1e-4)


def test_a_quantized_directory_is_held_as_codes(directories):
    whole, _, _ = load_model_dir(directories / "int4")
    for dtype in (torch.float32, torch.bfloat16):
        held, _, _ = load_model_dir(directories / "int4", dtype=dtype, compact=True)
        layers = [m for m in held.modules() if isinstance(m, SparseLinear)]
        assert layers and all(m.compacted and m.kernel.bits == 4 for m in layers)
        x = random_windows(2, 16, seed=4)
        with torch.no_grad():
            expected = whole(input_ids=x).logits
            accelerate(held, "always")
            got = held(input_ids=x).logits.float()
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def test_a_directory_of_a_newer_format_is_refused_in_one_line(directories, tmp_path):
    import shutil

    shutil.copytree(directories / "int4", tmp_path / "newer")
    manifest = json.loads((tmp_path / "newer" / "manifest.json").read_text())
    manifest["version"] = 3
    (tmp_path / "newer" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="version 3 is not supported") as refused:
        load_model_dir(tmp_path / "newer", compact=True)
    assert "\n" not in str(refused.value)
