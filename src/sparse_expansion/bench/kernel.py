"""Dense against sparse matrix-vector and matrix-matrix products on random weights (CPU), in fp32, bf16 or
fp16, and with the kept values on a 4- or 8-bit grid.

Candidates: dense torch (`F.linear`) in the weight's dtype; our kernel in the form a model would hold
(`kernel`: bitmask + values, the grid's codes with `bits`, or CSR where that reads fewer bytes); for plain fp32
also both of our forms (`bitmask_kernel`, `csr_kernel`: the measurement behind the choice), torch CSR with int32
indices and scipy CSR. `layer` is what a model runs: a `SparseLinear` that takes our kernel or the dense product
according to the switch it measured for its shape; it is compared with `dense_layer`, the same `nn.Linear`
without the sparse path. Each is timed as the median over repeated blocks of calls. `speedup` is the dense
layer's time over the sparse layer's, for one token; `kernel_speedup` is dense over our kernel alone (below 1
where the layer falls back to dense).

The physical limit: a one-token product is bound by memory traffic, so next to each time the result
gives the bytes it must read (weights, indices or mask, input and output) and the time those bytes take at the
machine's read bandwidth, measured in the same process; `bandwidth_fraction` is that limit over our kernel's time.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..kernels import native
from ..kernels.timing import paired_medians_ms
from ..layers.packed import PackedWeight
from ..layers.sparse_linear import CSRWeight, SparseLinear, SwitchCache, apply_switch, sparse_form
from ..pruning.quantization import ChannelQuantizer
from ..runtime import parse_dtype
from ..settings import SettingError


def random_sparse_weight(rows: int, cols: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    return weight.masked_fill(torch.rand(rows, cols, generator=generator) < sparsity, 0)


def read_bandwidth_gbs(megabytes: int = 1024, min_run_time: float = 0.5) -> float:
    """Memory read bandwidth: a sum over a buffer far larger than the caches (GB/s, 1e9 bytes)."""
    buffer = torch.ones(megabytes * 2 ** 20 // 4)
    seconds = paired_medians_ms({"sum": buffer.sum}, min_run_time)["sum"] * 1e-3
    return buffer.numel() * 4 / seconds / 1e9


def product_bytes(rows: int, cols: int, nnz: int, index_bytes: int, tokens: int = 1,
                  itemsize: int = 4) -> dict[str, int]:
    """Bytes one product must move: the weight in dense and CSR form (fp32 values), plus the tokens' input and
    output in the activations' dtype."""
    activations = itemsize * tokens * (rows + cols)
    return {"dense": itemsize * rows * cols + activations,
            "csr": nnz * (4 + index_bytes) + 8 * (rows + 1) + activations}


def on_grid(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """A pruned fp32 weight with every kept value moved to its row's `bits`-bit grid (what `--bits` pruning
    stores), zeros kept."""
    quantizer = ChannelQuantizer(bits).fit(weight)
    scale, zero = quantizer.scale.unsqueeze(1), quantizer.zero.unsqueeze(1)
    grid = scale * (torch.clamp(torch.round(weight / scale) + zero, 0, quantizer.maxq) - zero)
    return grid * (weight != 0)


def _sparse_forms(weight: torch.Tensor, bits: int | None) -> dict:
    """Our kernel in the form a model would hold (`kernel`) and, for plain fp32, both forms it chooses between."""
    forms = {"kernel": sparse_form(weight, bits)}
    if weight.dtype == torch.float32 and bits is None:
        forms.update(bitmask_kernel=PackedWeight.from_dense(weight), csr_kernel=CSRWeight(weight))
    return forms


def kernel_benchmark(rows: int, cols: int, sparsity: float, batch: int = 128, min_run_time: float = 0.5,
                     seed: int = 0, dtype: str = "float32", bits: int | None = None) -> dict:
    """Dense against sparse products of a random `rows` x `cols` weight with `sparsity` zeros, in `dtype` (its kept
    values on a `bits`-bit grid, held as codes, when given), at 1 and `batch` tokens (the sizes and the sparsity
    as BenchSettings checks them)."""
    import scipy.sparse

    torch_dtype = parse_dtype(dtype)
    weight = random_sparse_weight(rows, cols, sparsity, seed)
    if bits is not None:
        weight = on_grid(weight, bits)
    weight = weight.to(torch_dtype)
    nnz = int(torch.count_nonzero(weight))
    plain = torch_dtype == torch.float32 and bits is None  # torch's and scipy's CSR serve plain fp32
    result = {"rows": rows, "cols": cols, "sparsity": sparsity, "batch": batch, "nnz": nnz,
              "dtype": str(torch_dtype).split(".")[-1], "bits": bits, "threads": torch.get_num_threads(),
              "kernel_available": native.available()}
    forms, layer = {}, None
    if result["kernel_available"]:
        forms = _sparse_forms(weight, bits)
        result["form"] = "csr" if isinstance(forms["kernel"], CSRWeight) else "bitmask"
        result["held_bits"] = getattr(forms["kernel"], "bits", None)
        linear = nn.Linear(cols, rows, bias=False, dtype=torch_dtype)
        linear.weight.data = weight
        # The switch is measured at 1 token and at the batch size of this benchmark only.
        apply_switch(SwitchCache(batch_sizes=tuple(sorted({1, batch}))), forms["kernel"], weight)
        layer = SparseLinear(linear, forms["kernel"])
    else:
        result["kernel_unavailable_reason"] = native.unavailable_reason()
    if plain:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = weight.to_sparse_csr()
            torch_csr = torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
                                                csr.values(), size=weight.shape, check_invariants=False)
        scipy_csr = scipy.sparse.csr_matrix(weight.numpy())
    result["bandwidth_gbs"] = read_bandwidth_gbs()
    itemsize = weight.element_size()
    tolerance = 1e-4 if torch_dtype == torch.float32 else 2e-2
    for label, tokens in (("single", 1), ("batched", batch)):
        x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(seed + 1)).to(torch_dtype)
        expected = F.linear(x.float(), weight.float())
        sparse = {name: (lambda form=form: form.matmul(x)) for name, form in forms.items()}
        if plain:
            xt = x.t().contiguous()
            xn = xt.numpy()
            sparse.update(torch_csr=lambda: torch_csr @ xt, scipy_csr=lambda: scipy_csr @ xn)
        for name, fn in sparse.items():
            out = fn()
            out = torch.from_numpy(out) if not isinstance(out, torch.Tensor) else out
            out = out.t() if name in ("torch_csr", "scipy_csr") else out
            if not torch.allclose(out.float(), expected, rtol=tolerance, atol=tolerance * cols ** 0.5):
                raise RuntimeError(f"{name} disagrees with the dense product")
        references = {"dense": lambda: F.linear(x, weight)}
        if layer is not None:
            # Layer against layer: both pay the nn.Module call, so the ratio is what a model sees.
            references.update(dense_layer=lambda: linear(x), layer=lambda: layer(x))
        with torch.no_grad():
            medians = paired_medians_ms({**sparse, **references}, min_run_time)
        timings = {f"{name}_ms": ms for name, ms in medians.items()}
        if layer is not None:
            timings["layer_uses_kernel"] = forms["kernel"].use_sparse(tokens)
        for name in sparse:
            timings[f"{name}_speedup"] = timings["dense_ms"] / timings[f"{name}_ms"]
        timings["speedup"] = timings.get("dense_layer_ms", 1.0) / timings.get("layer_ms", 1.0)
        moved = product_bytes(rows, cols, nnz, 2 if cols <= native.UINT16_COLUMNS else 4, tokens, itemsize)
        activations = itemsize * tokens * (rows + cols)
        timings["dense_bytes"] = moved["dense"]
        timings["dense_limit_ms"] = moved["dense"] / result["bandwidth_gbs"] / 1e6
        if plain:
            timings["csr_bytes"] = moved["csr"]
            timings["csr_limit_ms"] = moved["csr"] / result["bandwidth_gbs"] / 1e6
        for name, form in forms.items():
            prefix = "sparse" if name == "kernel" else name.removesuffix("_kernel")
            timings[f"{prefix}_bytes"] = form.nbytes + activations
            timings[f"{prefix}_limit_ms"] = timings[f"{prefix}_bytes"] / result["bandwidth_gbs"] / 1e6
        if "kernel_ms" in timings:
            timings["bandwidth_fraction"] = timings["sparse_limit_ms"] / timings["kernel_ms"]
        result[label] = timings
    result["speedup"] = result["single"]["speedup"]
    result["kernel_speedup"] = result["single"].get("kernel_speedup")
    return result


def semi_structured_benchmark(rows: int, cols: int, batch: int = 128, dtype: torch.dtype = torch.float16,
                              min_run_time: float = 0.5) -> dict:
    """Dense against 2:4 semi-structured products on the GPU at 1 token and `batch` tokens, median of
    CUDA-synchronised runs, and what the layer (with its measured switch) does at each size."""
    from torch.utils import benchmark

    from ..layers.semi_structured import semi_structured_product, semi_structured_supported
    from ..layers.switch import measure_switch

    if not semi_structured_supported():
        raise SettingError("device", "{device} cuda: no CUDA GPU with 2:4 sparse tensor cores (compute capability "
                                     ">= 8.0)")
    mask = torch.tensor([0, 0, 1, 1], dtype=torch.bool, device="cuda").tile(rows, cols // 4)
    weight = (torch.randn(rows, cols, device="cuda", dtype=dtype) * mask).contiguous()
    sparse = torch.sparse.to_sparse_semi_structured(weight)
    result = {"rows": rows, "cols": cols, "batch": batch, "dtype": str(dtype).split(".")[-1],
              "device": torch.cuda.get_device_name()}
    sizes = tuple(sorted({1, batch}))
    for label, tokens in (("single", 1), ("batched", batch)):
        x = torch.randn(tokens, cols, device="cuda", dtype=dtype)
        torch.testing.assert_close(semi_structured_product(sparse, x, None), F.linear(x, weight), rtol=1e-2, atol=1e-2)
        timings = {}

        def semi(a, _w):
            return semi_structured_product(sparse, a, None)

        for name, fn in (("dense", F.linear), ("semi_structured", semi)):
            timer = benchmark.Timer(stmt="fn(x, w)", globals={"fn": fn, "x": x, "w": weight})
            timings[f"{name}_ms"] = timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
        timings["speedup"] = timings["dense_ms"] / timings["semi_structured_ms"]
        result[label] = timings
    # What a model's layer of this shape would do (accelerate converts it only where this lists sizes).
    measured = measure_switch(lambda a: semi_structured_product(sparse, a, None), lambda a: F.linear(a, weight),
                              cols, sizes, device="cuda", dtype=dtype)
    result["layer_uses_semi_structured_at"] = [t for t, faster, _, _ in measured if faster]
    return result


def activation_benchmark(rows: int, cols: int, activation_sparsity: float, batch: int = 16,
                         min_run_time: float = 0.5, seed: int = 0) -> dict:
    """A thresholded down projection (`rows` outputs, `cols` intermediate neurons) on inputs where a fraction
    `activation_sparsity` falls below its neuron's threshold: the dense product of the masked input against
    the activation-sparse kernel and the layer (kernel or dense, as its switch measured), at 1 and `batch`
    tokens, with the memory-bound limit (the bytes of the rows read). The sizes and `activation_sparsity` as
    BenchSettings checks them."""
    from ..layers import ThresholdedLinear
    from ..layers.protocol import AccelerateContext, kind_of
    from ..layers.thresholded_linear import mask_below

    if not native.available():
        raise UsageError(f"the activation-sparse kernel is unavailable: {native.unavailable_reason()}")
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(rows, cols, generator=generator))
    thresholds = torch.ones(cols)
    layer = ThresholdedLinear(linear, thresholds, 1 - activation_sparsity)
    kind_of(layer).accelerate(layer, AccelerateContext(switches=SwitchCache(batch_sizes=tuple(sorted({1, batch}))),
                                                       cpu_kernels=True))
    dense_layer = nn.Linear(cols, rows, bias=False)
    dense_layer.weight = linear.weight
    result = {"rows": rows, "cols": cols, "activation_sparsity": activation_sparsity, "batch": batch,
              "threads": torch.get_num_threads(), "bandwidth_gbs": read_bandwidth_gbs()}
    for label, tokens in (("single", 1), ("batched", batch)):
        passing = torch.rand(tokens, cols, generator=generator) >= activation_sparsity
        x = torch.where(passing, 2.0, 0.5) * torch.sign(torch.randn(tokens, cols, generator=generator))
        active = passing.sum(1).double().mean().item()
        union = passing.any(0).sum().item()
        with torch.no_grad():
            expected = F.linear(mask_below(x, thresholds), linear.weight)
            if not torch.allclose(layer.kernel.matmul(x), expected, rtol=1e-4, atol=1e-3):
                raise RuntimeError("the activation-sparse kernel disagrees with the dense product")
            medians = paired_medians_ms({"dense": lambda: dense_layer(x),
                                         "masked_dense": lambda: F.linear(mask_below(x, thresholds), linear.weight),
                                         "kernel": lambda: layer.kernel.matmul(x), "layer": lambda: layer(x)},
                                        min_run_time)
        timings = {f"{name}_ms": ms for name, ms in medians.items()}
        timings.update(active_neurons=active, rows_read=union, layer_uses_kernel=layer.kernel.use_fast(tokens),
                       speedup=timings["dense_ms"] / timings["layer_ms"],
                       kernel_speedup=timings["dense_ms"] / timings["kernel_ms"])
        timings["dense_limit_ms"] = 4 * (rows * cols + tokens * (rows + cols)) / result["bandwidth_gbs"] / 1e6
        timings["kernel_limit_ms"] = 4 * (rows * union + tokens * (rows + cols)) / result["bandwidth_gbs"] / 1e6
        result[label] = timings
    result["speedup"] = result["single"]["speedup"]
    return result
