/* Bitmask sparse times dense products for pruned linear layers on the CPU, in the dtypes models ship in:
 * y = x W^T (+ bias), W (rows x cols) held as
 *   - mask: per row, ceil(cols / 64) uint64 words, bit j of word w marking column 64 w + j as non-zero;
 *   - rowoff: int64 (rows + 1) offsets of each row's first value;
 *   - values: the non-zeros in row-major order, of one kind:
 *       VALUE_F32, VALUE_BF16, VALUE_F16: the weights themselves;
 *       VALUE_Q8 (one uint8 code each), VALUE_Q4 (two codes a byte, low nibble first): a per-row grid,
 *       w = scale[r] * (code - zero[r]) (the GPTQ/SparseGPT asymmetric grid), multiplied without
 *       expanding the matrix: y_r = scale[r] * sum_c (code_c - zero[r]) x_c.
 *   The values array carries 16 spare elements (zeros) past its end: vector loads may read past the last row.
 * x and y are (batch x cols) and (batch x rows), row-major, fp32, bf16 or fp16 (IO_*); bias is fp32.
 * Accumulation is in fp32 (as PyTorch's reduced-precision CPU products), rounded once to y's dtype.
 *
 * Why these loops (benchmarks in docs/BENCHMARKS.md, `bench --kernel --dtype`):
 * - one token (decoding) is bound by the bytes read: 1 bit per weight plus the kept values, against
 *   the dense matrix's itemsize per weight. With AVX2 each 8 columns cost one byte of mask: its 8 values
 *   (those the byte's set bits claim, consecutive in `values`) are loaded, widened to fp32 and moved to
 *   their columns by one permutation from a 256-entry table, masked, and multiplied with x by one FMA.
 *   Without AVX2 the same walk runs scalar, bit by bit.
 * - several tokens: x is transposed into blocks of 16 tokens, and every set bit multiplies its value with
 *   one contiguous 16-float vector (as the CSR kernel does, the column index decoded from the mask).
 * Compiled with the CSR kernels (native.py), -O3 -march=native -fopenmp: the path is chosen by what the
 * processor has (an AVX-512 machine runs the AVX2 path).
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define BM_AVX2 1
#endif

enum { VALUE_F32 = 0, VALUE_BF16 = 1, VALUE_F16 = 2, VALUE_Q8 = 3, VALUE_Q4 = 4 };
enum { IO_F32 = 0, IO_BF16 = 1, IO_F16 = 2 };

typedef float bm_vec16 __attribute__((vector_size(64)));
#define BM_TOKENS 16

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float io_load(const void* x, int kind, int64_t i) {
    if (kind == IO_BF16) return bf16_to_f32(((const uint16_t*)x)[i]);
    if (kind == IO_F16) return (float)((const _Float16*)x)[i];
    return ((const float*)x)[i];
}

static inline void io_store(void* y, int kind, int64_t i, float v) {
    if (kind == IO_BF16) ((uint16_t*)y)[i] = f32_to_bf16(v);
    else if (kind == IO_F16) ((_Float16*)y)[i] = (_Float16)v;
    else ((float*)y)[i] = v;
}

/* One stored value as fp32 (codes as their integer value; the grid is applied by the caller). */
#define LOAD_ONE_F32(v, p) (((const float*)(v))[p])
#define LOAD_ONE_BF16(v, p) bf16_to_f32(((const uint16_t*)(v))[p])
#define LOAD_ONE_F16(v, p) ((float)((const _Float16*)(v))[p])
#define LOAD_ONE_Q8(v, p) ((float)((const uint8_t*)(v))[p])
#define LOAD_ONE_Q4(v, p) ((float)((((const uint8_t*)(v))[(p) >> 1] >> (((p) & 1) * 4)) & 15))

#ifdef BM_AVX2
static __m256i expand_index[256]; /* byte -> lane j takes value number popcount(byte & ((1 << j) - 1)) */
static __m256i expand_mask[256];  /* byte -> all ones in the lanes of its set bits */

__attribute__((constructor)) static void bm_tables(void) {
    for (int b = 0; b < 256; ++b) {
        int32_t index[8], mask[8], seen = 0;
        for (int j = 0; j < 8; ++j) {
            const int set = (b >> j) & 1;
            index[j] = set ? seen : 0;
            mask[j] = set ? -1 : 0;
            seen += set;
        }
        expand_index[b] = _mm256_loadu_si256((const __m256i*)index);
        expand_mask[b] = _mm256_loadu_si256((const __m256i*)mask);
    }
}

/* Eight consecutive stored values from element p, widened to fp32. */
#define LOAD8_F32(v, p) _mm256_loadu_ps((const float*)(v) + (p))
#define LOAD8_BF16(v, p) _mm256_castsi256_ps(_mm256_slli_epi32(                                        \
    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)(v) + (p)))), 16))
#define LOAD8_F16(v, p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)(v) + (p))))
#define LOAD8_Q8(v, p) _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(                                         \
    _mm_loadl_epi64((const __m128i*)((const uint8_t*)(v) + (p)))))
static inline __m256 load8_q4(const void* v, int64_t p) {
    uint64_t word;
    memcpy(&word, (const uint8_t*)v + (p >> 1), 8);
    word >>= (p & 1) * 4;
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int32_t)(uint32_t)word), shifts),
                                           _mm256_set1_epi32(15));
    return _mm256_cvtepi32_ps(codes);
}
#define LOAD8_Q4(v, p) load8_q4(v, p)

static inline float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One mask byte's 8 columns: their values (consecutive from element q) moved to their lanes, times x. */
#define EXPAND_FMA(ACC, LOAD8, GRID, q, byte, xv)                                                     \
    do {                                                                                              \
        const unsigned b_ = (byte);                                                                   \
        __m256 v_ = LOAD8(values, q);                                                                 \
        if (GRID) v_ = _mm256_sub_ps(v_, z);                                                          \
        v_ = _mm256_and_ps(_mm256_permutevar8x32_ps(v_, expand_index[b_]),                            \
                           _mm256_castsi256_ps(expand_mask[b_]));                                     \
        ACC = _mm256_fmadd_ps(v_, _mm256_loadu_ps(xv), ACC);                                          \
    } while (0)

/* Sum over one row of (value - zero) * x. The offsets of a word's 8 bytes are computed independently
 * (popcounts of the bits below each byte), so loads do not wait on each other; four accumulators. */
#define DEFINE_ROW_DOT(NAME, LOAD8, GRID)                                                              \
static inline float row_dot_##NAME(const uint64_t* m, int64_t words, const void* values, int64_t p,   \
                                   const float* x, float zero) {                                       \
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                                       \
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();                                       \
    const __m256 z = _mm256_set1_ps(zero);                                                           \
    (void)z;                                                                                         \
    for (int64_t w = 0; w < words; ++w) {                                                            \
        const uint64_t bits = m[w];                                                                  \
        if (!bits) continue;                                                                         \
        const float* xw = x + w * 64;                                                                \
        const int64_t o1 = p + __builtin_popcountll(bits & 0xffull);                                 \
        const int64_t o2 = p + __builtin_popcountll(bits & 0xffffull);                               \
        const int64_t o3 = p + __builtin_popcountll(bits & 0xffffffull);                             \
        const int64_t o4 = p + __builtin_popcountll(bits & 0xffffffffull);                           \
        const int64_t o5 = p + __builtin_popcountll(bits & 0xffffffffffull);                         \
        const int64_t o6 = p + __builtin_popcountll(bits & 0xffffffffffffull);                       \
        const int64_t o7 = p + __builtin_popcountll(bits & 0xffffffffffffffull);                     \
        EXPAND_FMA(a0, LOAD8, GRID, p, bits & 255u, xw);                                             \
        EXPAND_FMA(a1, LOAD8, GRID, o1, (bits >> 8) & 255u, xw + 8);                                 \
        EXPAND_FMA(a2, LOAD8, GRID, o2, (bits >> 16) & 255u, xw + 16);                               \
        EXPAND_FMA(a3, LOAD8, GRID, o3, (bits >> 24) & 255u, xw + 24);                               \
        EXPAND_FMA(a0, LOAD8, GRID, o4, (bits >> 32) & 255u, xw + 32);                               \
        EXPAND_FMA(a1, LOAD8, GRID, o5, (bits >> 40) & 255u, xw + 40);                               \
        EXPAND_FMA(a2, LOAD8, GRID, o6, (bits >> 48) & 255u, xw + 48);                               \
        EXPAND_FMA(a3, LOAD8, GRID, o7, bits >> 56, xw + 56);                                        \
        p += __builtin_popcountll(bits);                                                             \
    }                                                                                                \
    return hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));                       \
}
#else
#define DEFINE_ROW_DOT(NAME, LOAD8, GRID)                                                                  \
static inline float row_dot_##NAME(const uint64_t* m, int64_t words, const void* values, int64_t p,   \
                                   const float* x, float zero) {                                       \
    float acc = 0.f;                                                                                 \
    for (int64_t w = 0; w < words; ++w)                                                              \
        for (uint64_t bits = m[w]; bits; bits &= bits - 1, ++p)                                      \
            acc += (LOAD_ONE_##NAME(values, p) - zero) * x[w * 64 + __builtin_ctzll(bits)];          \
    return acc;                                                                                      \
}
#define LOAD8_F32 0
#define LOAD8_BF16 0
#define LOAD8_F16 0
#define LOAD8_Q8 0
#define LOAD8_Q4 0
#endif

DEFINE_ROW_DOT(F32, LOAD8_F32, 0)
DEFINE_ROW_DOT(BF16, LOAD8_BF16, 0)
DEFINE_ROW_DOT(F16, LOAD8_F16, 0)
DEFINE_ROW_DOT(Q8, LOAD8_Q8, 1)
DEFINE_ROW_DOT(Q4, LOAD8_Q4, 1)

/* One specialised loop per value kind. */
#define BY_VALUE_KIND(LOOP)                                                                            \
    switch (value_kind) {                                                                             \
    case VALUE_BF16: LOOP(BF16) break;                                                                \
    case VALUE_F16: LOOP(F16) break;                                                                  \
    case VALUE_Q8: LOOP(Q8) break;                                                                    \
    case VALUE_Q4: LOOP(Q4) break;                                                                    \
    default: LOOP(F32) break;                                                                         \
    }

/* x (cols) into fp32, zero-padded to words * 64: the vector path reads whole mask words of x. */
static float* padded_input(const void* x, int kind, int64_t cols, int64_t words) {
    float* xf = aligned_alloc(64, (size_t)words * 64 * sizeof(float));
    if (!xf) return NULL;
    for (int64_t c = 0; c < cols; ++c) xf[c] = io_load(x, kind, c);
    for (int64_t c = cols; c < words * 64; ++c) xf[c] = 0.f;
    return xf;
}

#define ROW_LOOP(NAME)                                                                                 \
    _Pragma("omp parallel for schedule(static)")                                                      \
    for (int64_t r = 0; r < rows; ++r) {                                                              \
        const float zero_r = zero ? zero[r] : 0.f;                                                    \
        float acc = row_dot_##NAME(mask + r * words, words, values, rowoff[r], xf, zero_r);          \
        if (scale) acc *= scale[r];                                                                   \
        io_store(y, y_kind, r, bias ? acc + bias[r] : acc);                                           \
    }

/* One token: y (rows) = W x + bias. Returns 1 when a buffer cannot be allocated. */
int bm_matvec(int value_kind, int64_t rows, int64_t cols, int64_t words, const uint64_t* mask,
              const int64_t* rowoff, const void* values, const float* scale, const float* zero, const void* x,
              int x_kind, const float* bias, void* y, int y_kind) {
    float* xf = padded_input(x, x_kind, cols, words);
    if (!xf) return 1;
    BY_VALUE_KIND(ROW_LOOP)
    free(xf);
    return 0;
}

/* Several tokens: x transposed into blocks of 16 tokens, one vector FMA per set bit and block. */
#define BLOCK_LOOP(NAME)                                                                               \
    _Pragma("omp parallel for schedule(static)")                                                      \
    for (int64_t r = 0; r < rows; ++r) {                                                              \
        const uint64_t* m = mask + r * words;                                                         \
        const float zero_r = zero ? zero[r] : 0.f, scale_r = scale ? scale[r] : 1.f;                  \
        const float b0 = bias ? bias[r] : 0.f;                                                        \
        for (int64_t jb = 0; jb < blocks; ++jb) {                                                     \
            const bm_vec16* xb = xt + jb * padded;                                                    \
            bm_vec16 a0 = {0}, a1 = {0};                                                              \
            int64_t p = rowoff[r];                                                                    \
            for (int64_t w = 0; w < words; ++w) {                                                     \
                uint64_t bits = m[w];                                                                 \
                const bm_vec16* xw = xb + w * 64;                                                     \
                while (bits) {                                                                        \
                    const int j0 = __builtin_ctzll(bits);                                             \
                    bits &= bits - 1;                                                                 \
                    a0 += (LOAD_ONE_##NAME(values, p) - zero_r) * xw[j0];                             \
                    ++p;                                                                              \
                    if (!bits) break;                                                                 \
                    const int j1 = __builtin_ctzll(bits);                                             \
                    bits &= bits - 1;                                                                 \
                    a1 += (LOAD_ONE_##NAME(values, p) - zero_r) * xw[j1];                             \
                    ++p;                                                                              \
                }                                                                                     \
            }                                                                                         \
            const bm_vec16 acc = (a0 + a1) * scale_r;                                                 \
            const int64_t left = batch - jb * BM_TOKENS;                                              \
            const int64_t stop = left < BM_TOKENS ? left : BM_TOKENS;                                 \
            for (int64_t t = 0; t < stop; ++t) io_store(y, y_kind, (jb * BM_TOKENS + t) * rows + r, acc[t] + b0); \
        }                                                                                             \
    }

int bm_matmul(int value_kind, int64_t rows, int64_t cols, int64_t words, int64_t batch, const uint64_t* mask,
              const int64_t* rowoff, const void* values, const float* scale, const float* zero, const void* x,
              int x_kind, const float* bias, void* y, int y_kind) {
    const int64_t blocks = (batch + BM_TOKENS - 1) / BM_TOKENS;
    const int64_t padded = words * 64; /* xt covers whole mask words: columns past cols are never read */
    bm_vec16* xt = aligned_alloc(64, (size_t)blocks * (size_t)padded * sizeof(bm_vec16));
    if (!xt) return 1;
    _Pragma("omp parallel for schedule(static)")
    for (int64_t c = 0; c < padded; ++c)
        for (int64_t jb = 0; jb < blocks; ++jb) {
            float* dst = (float*)&xt[jb * padded + c];
            for (int t = 0; t < BM_TOKENS; ++t) {
                const int64_t b = jb * BM_TOKENS + t;
                dst[t] = (b < batch && c < cols) ? io_load(x, x_kind, b * cols + c) : 0.f;
            }
        }
    BY_VALUE_KIND(BLOCK_LOOP)
    free(xt);
    return 0;
}

/* The dense matrix back (rows x cols, row-major, in out_kind): exactly the stored weights, a grid's
 * values as scale * (code - zero) in fp32 (the quantizer's own arithmetic), then rounded to out_kind. */
#define DECODE_LOOP(NAME)                                                                              \
    _Pragma("omp parallel for schedule(static)")                                                      \
    for (int64_t r = 0; r < rows; ++r) {                                                              \
        memset((char*)out + r * cols * out_size, 0, (size_t)cols * out_size);                        \
        const float zero_r = zero ? zero[r] : 0.f;                                                    \
        int64_t p = rowoff[r];                                                                        \
        for (int64_t w = 0; w < words; ++w)                                                           \
            for (uint64_t bits = mask[r * words + w]; bits; bits &= bits - 1, ++p) {                  \
                float v = LOAD_ONE_##NAME(values, p);                                                 \
                if (scale) v = scale[r] * (v - zero_r);                                               \
                io_store(out, out_kind, r * cols + w * 64 + __builtin_ctzll(bits), v);                \
            }                                                                                         \
    }

void bm_decode(int value_kind, int64_t rows, int64_t cols, int64_t words, const uint64_t* mask,
               const int64_t* rowoff, const void* values, const float* scale, const float* zero, void* out,
               int out_kind) {
    const int64_t out_size = out_kind == IO_F32 ? 4 : 2;
    BY_VALUE_KIND(DECODE_LOOP)
}
