"""The compressed safetensors format: exact round trips and the choice of encoding."""

import pytest
import torch

from sparse_expansion import UsageError
from sparse_expansion.io import is_compressed_file, load_compressed, save_compressed
from sparse_expansion.io.compressed import encoded_sizes


def sparse_tensor(shape, sparsity, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    return t.masked_fill(torch.rand(shape, generator=g) < sparsity, 0)


@pytest.mark.parametrize("sparsity, expected", [(0.0, "dense"), (0.5, "bitmask"), (0.7, "bitmask"),
                                                (0.99, "csr")])
def test_encoding_is_the_smallest(sparsity, expected, tmp_path):
    t = sparse_tensor((64, 256), sparsity)
    index = save_compressed({"w": t}, tmp_path / "w.safetensors")
    assert index["w"]["encoding"] == expected
    sizes = encoded_sizes(t)
    # Random normal values: the exponent byte plane compresses a little, the rest is kept raw.
    assert index["w"]["bytes"] <= min(sizes.values())
    assert index["w"]["bytes"] > 0.8 * min(sizes.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact(dtype, tmp_path):
    shared = sparse_tensor((48, 40), 0.3, dtype)
    state = {
        "dense": sparse_tensor((32, 64), 0.0, dtype),
        "half": sparse_tensor((32, 64), 0.5, dtype, seed=1),
        "very_sparse": sparse_tensor((40, 100), 0.995, dtype, seed=2),
        "experts": sparse_tensor((3, 16, 48), 0.7, dtype, seed=3),
        "wide": sparse_tensor((2, 40000), 0.99, dtype, seed=4),  # int32 column indices
        "bias": torch.randn(7).to(dtype),
        "all_zero": torch.zeros(64, 64, dtype=dtype),
        "tied_a": shared,
        "tied_b": shared,
    }
    path = tmp_path / "m.safetensors"
    index = save_compressed(state, path)
    assert index["tied_b"] == {"encoding": "alias", "target": "tied_a"}
    assert is_compressed_file(path)
    loaded = load_compressed(path)
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_a_compressed_70_percent_matrix_takes_a_third_of_its_dense_size(tmp_path):
    t = sparse_tensor((512, 512), 0.7)
    save_compressed({"w": t}, tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").stat().st_size < 0.36 * t.numel() * 4


def test_damaged_files_are_rejected(tmp_path):
    path = tmp_path / "w.safetensors"
    save_compressed({"w": sparse_tensor((64, 64), 0.5)}, path)
    path.write_bytes(path.read_bytes()[:100])
    assert not is_compressed_file(path)
    with pytest.raises(UsageError, match="corrupted or truncated"):
        load_compressed(path)


def test_repetitive_values_are_entropy_coded_exactly(tmp_path):
    # Weights dequantized from 4-bit blocks take few distinct values: the byte planes compress well.
    g = torch.Generator().manual_seed(0)
    palette = torch.randn(16, generator=g)
    t = palette[torch.randint(0, 16, (128, 256), generator=g)]
    path = tmp_path / "w.safetensors"
    index = save_compressed({"w": t}, path)
    assert index["w"]["encoding"] == "dense" and "packed" in index["w"]
    assert path.stat().st_size < 0.5 * t.numel() * 4
    assert torch.equal(load_compressed(path)["w"], t)


def test_a_damaged_compressed_plane_is_rejected(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(16, generator=g)[torch.randint(0, 16, (64, 64), generator=g)]
    path = tmp_path / "w.safetensors"
    save_compressed({"w": t}, path)
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    start = 8 + header
    data[start:start + 64] = bytes(64)  # zero the first bytes of the packed payload
    path.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="corrupted or truncated"):
        load_compressed(path)
