/* Sparse (CSR) times dense products for pruned linear layers on the CPU: y = x W^T (+ bias).
 *
 * W (rows x cols) is stored as CSR: int64 row pointers, column indices (uint16 when cols <= 65536,
 * else int32) and fp32 values. x is (batch x cols) and y is (batch x rows), both row-major.
 *
 * Compiled at first use by sparse_expansion/inference/native.py with -O3 -march=native -fopenmp and
 * loaded with ctypes. OpenMP resolves to the libgomp that PyTorch has already loaded, so the kernels
 * share PyTorch's thread pool and thread count.
 *
 * Why these loops (measured in benchmarks/bench_kernels.py, see docs/BENCHMARKS.md):
 * - one token: a row's dot product with x; `omp simd reduction` lets the compiler vectorise the
 *   indexed loads and sum in any order (hence fp32-tolerance, not bitwise, agreement with dense);
 * - several tokens: x is transposed into blocks of 16 tokens so that every non-zero weight multiplies
 *   one contiguous 16-float vector; four independent accumulators hide the FMA latency.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

typedef float vec16 __attribute__((vector_size(64)));
#define TOKENS_PER_BLOCK 16

#define DEFINE_KERNELS(SUFFIX, INDEX)                                                                  \
void csr_matvec_##SUFFIX(int64_t rows, const int64_t* rowptr, const INDEX* col, const float* values,   \
                         const float* x, const float* bias, float* y) {                                \
    _Pragma("omp parallel for schedule(static)")                                                      \
    for (int64_t r = 0; r < rows; ++r) {                                                              \
        float acc = 0.f;                                                                              \
        const int64_t end = rowptr[r + 1];                                                            \
        _Pragma("omp simd reduction(+:acc)")                                                          \
        for (int64_t k = rowptr[r]; k < end; ++k) acc += values[k] * x[col[k]];                       \
        y[r] = bias ? acc + bias[r] : acc;                                                            \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
int csr_matmul_##SUFFIX(int64_t rows, int64_t cols, int64_t batch, const int64_t* rowptr,             \
                        const INDEX* col, const float* values, const float* x, const float* bias,     \
                        float* y) {                                                                   \
    const int64_t blocks = (batch + TOKENS_PER_BLOCK - 1) / TOKENS_PER_BLOCK;                         \
    vec16* xt = aligned_alloc(64, (size_t)blocks * (size_t)cols * sizeof(vec16));                     \
    if (!xt) return 1;                                                                                \
    _Pragma("omp parallel for schedule(static)")                                                      \
    for (int64_t c = 0; c < cols; ++c)                                                                \
        for (int64_t jb = 0; jb < blocks; ++jb) {                                                     \
            float* dst = (float*)&xt[jb * cols + c];                                                  \
            for (int t = 0; t < TOKENS_PER_BLOCK; ++t) {                                              \
                const int64_t b = jb * TOKENS_PER_BLOCK + t;                                          \
                dst[t] = b < batch ? x[b * cols + c] : 0.f;                                           \
            }                                                                                         \
        }                                                                                             \
    _Pragma("omp parallel for schedule(static)")                                                      \
    for (int64_t r = 0; r < rows; ++r) {                                                              \
        const int64_t start = rowptr[r], end = rowptr[r + 1];                                         \
        const float b0 = bias ? bias[r] : 0.f;                                                        \
        for (int64_t jb = 0; jb < blocks; ++jb) {                                                     \
            const vec16* xb = xt + jb * cols;                                                         \
            vec16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                             \
            int64_t k = start;                                                                        \
            for (; k + 4 <= end; k += 4) {                                                            \
                a0 += values[k] * xb[col[k]];                                                         \
                a1 += values[k + 1] * xb[col[k + 1]];                                                 \
                a2 += values[k + 2] * xb[col[k + 2]];                                                 \
                a3 += values[k + 3] * xb[col[k + 3]];                                                 \
            }                                                                                         \
            for (; k < end; ++k) a0 += values[k] * xb[col[k]];                                        \
            const vec16 acc = (a0 + a1) + (a2 + a3);                                                  \
            const int64_t left = batch - jb * TOKENS_PER_BLOCK;                                       \
            const int64_t stop = left < TOKENS_PER_BLOCK ? left : TOKENS_PER_BLOCK;                   \
            for (int64_t t = 0; t < stop; ++t) y[(jb * TOKENS_PER_BLOCK + t) * rows + r] = acc[t] + b0; \
        }                                                                                             \
    }                                                                                                 \
    free(xt);                                                                                         \
    return 0;                                                                                         \
}

DEFINE_KERNELS(u16, uint16_t)
DEFINE_KERNELS(i32, int32_t)

/* Activation-sparse products for a thresholded FFN down projection: y = mask(x) W^T (+ bias), where
 * mask(x)_i = x_i if |x_i| >= thr[i], else 0.
 *
 * W^T is given as wt (in x out, row-major): the out weights that neuron i feeds are one contiguous row,
 * so only the rows of active neurons are read. Each thread owns a slice of the outputs and walks the
 * active neurons; the slice (out / threads floats per token) stays in cache while the rows stream in.
 * `active` returns, per token, the number of neurons that passed their threshold.
 */
void act_sparse_matmul(int64_t in, int64_t out, int64_t batch, const float* wt, const float* x,
                       const float* thr, const float* bias, float* y, int64_t* active) {
    for (int64_t b = 0; b < batch; ++b) {
        int64_t n = 0;
        for (int64_t i = 0; i < in; ++i) n += fabsf(x[b * in + i]) >= thr[i] && x[b * in + i] != 0.f;
        active[b] = n;
    }
    _Pragma("omp parallel")
    {
        const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t per = ((out + threads - 1) / threads + 15) / 16 * 16;  /* 64-byte aligned slices */
        const int64_t lo = t * per < out ? t * per : out, hi = lo + per < out ? lo + per : out;
        for (int64_t b = 0; b < batch; ++b)
            for (int64_t o = lo; o < hi; ++o) y[b * out + o] = bias ? bias[o] : 0.f;
        for (int64_t i = 0; i < in; ++i) {
            const float* row = wt + i * out;
            for (int64_t b = 0; b < batch; ++b) {
                const float v = x[b * in + i];
                if (v == 0.f || fabsf(v) < thr[i]) continue;
                float* yb = y + b * out;
                _Pragma("omp simd")
                for (int64_t o = lo; o < hi; ++o) yb[o] += v * row[o];
            }
        }
    }
}

/* The same product when the down projection is also pruned: W^T as CSR (row i = the non-zero weights that
 * neuron i feeds, int32 output indices), so a token reads only the non-zero weights of its active neurons.
 * Threads split the neurons and accumulate into private outputs, summed at the end. Returns 1 when a buffer
 * cannot be allocated. */
int act_sparse_csr_matmul(int64_t in, int64_t out, int64_t batch, const int64_t* rowptr, const int32_t* col,
                          const float* values, const float* x, const float* thr, const float* bias, float* y,
                          int64_t* active) {
    for (int64_t b = 0; b < batch; ++b) {
        int64_t n = 0;
        for (int64_t i = 0; i < in; ++i) n += fabsf(x[b * in + i]) >= thr[i] && x[b * in + i] != 0.f;
        active[b] = n;
        for (int64_t o = 0; o < out; ++o) y[b * out + o] = bias ? bias[o] : 0.f;
    }
    int failed = 0;
    _Pragma("omp parallel")
    {
        float* local = calloc((size_t)(batch * out), sizeof(float));
        if (!local) {
            _Pragma("omp atomic write")
            failed = 1;
        }
        _Pragma("omp for schedule(static)")
        for (int64_t i = 0; i < in; ++i) {
            if (!local) continue;
            const int64_t start = rowptr[i], end = rowptr[i + 1];
            for (int64_t b = 0; b < batch; ++b) {
                const float v = x[b * in + i];
                if (v == 0.f || fabsf(v) < thr[i]) continue;
                float* lb = local + b * out;
                for (int64_t k = start; k < end; ++k) lb[col[k]] += v * values[k];
            }
        }
        if (local) {
            _Pragma("omp critical")
            for (int64_t j = 0; j < batch * out; ++j) y[j] += local[j];
            free(local);
        }
    }
    return failed;
}
