/* Decoding kernels for localgpt, x86-64 with AVX-512: the work of one decoding step of a few rows (one token, or
 * one per beam) in float32 and bfloat16 — products y (M, N) = x (M, K) · w (N, K)ᵀ, the one-token attention step
 * with its rotary embedding and cache write, RMSNorm, the SiLU-gated MLP's product, and a whole Llama-family layer
 * made of them (docs/architecture.md, "Native kernels").
 *
 * Why: decoding one token reads every weight once, so its speed is memory bandwidth over weight bytes, and on a
 * small model the dispatch of ~50 torch ops per layer costs as much again. torch's bfloat16 products read ~8-10
 * GB/s here for one row; these loops stream each weight row once, both cores splitting the rows, at 26-44 GB/s
 * (what the machine gives at the moment) in either dtype (docs/benchmarks.md). Built once per machine by
 * localgpt/native.py with the system C compiler (-O3 -march=native -fopenmp -ffp-contract=off); it joins torch's own
 * OpenMP runtime (same libgomp.so.1), so torch.set_num_threads applies and the two never compete for cores.
 *
 * Numerics: float32 products sum each row in a different order than MKL (last-bit differences, as between any two
 * BLAS); bfloat16 multiplies pairs exactly and sums in float32, then rounds to nearest even, like torch's CPU
 * bfloat16 linear. Elementwise steps round where torch's ops round. Any size works: tails are masked loads.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_ROWS 4 /* rows of x per pass over the weights: 4 x 2 accumulators stay in registers */

/* With 3-4 rows of x the loop computes long enough per byte that the hardware prefetchers fall behind: asking for
 * the weight lines 16 KB ahead into L2 took 4-row float32 products from 23 to 29 GB/s here (for 1-2 rows it cost
 * bandwidth, so they do not). */
#define PREFETCH_BYTES 16384
static inline void prefetch_ahead(const void *at, int lines) {
    for (int line = 0; line < lines; line++) _mm_prefetch((const char *)at + PREFETCH_BYTES + 64 * line, _MM_HINT_T1);
}

/* One weight row n against MB rows of x, two accumulators per x row to hide the FMA latency. */
#define F32_ROW(MB)                                                                                              \
    {                                                                                                            \
        __m512 acc[MB][2];                                                                                       \
        for (int m = 0; m < MB; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();                                \
        const float *wr = w + n * K;                                                                             \
        int64_t i = 0;                                                                                           \
        for (; i + 32 <= K; i += 32) {                                                                           \
            if (MB >= 3) prefetch_ahead(wr + i, 2);                                                              \
            __m512 w0 = _mm512_loadu_ps(wr + i), w1 = _mm512_loadu_ps(wr + i + 16);                              \
            for (int m = 0; m < MB; m++) {                                                                       \
                acc[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + m * K + i), w0, acc[m][0]);                      \
                acc[m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + m * K + i + 16), w1, acc[m][1]);                 \
            }                                                                                                    \
        }                                                                                                        \
        for (; i < K; i += 16) {                                                                                 \
            __mmask16 k = K - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - i)) - 1);                    \
            __m512 w0 = _mm512_maskz_loadu_ps(k, wr + i);                                                        \
            for (int m = 0; m < MB; m++)                                                                         \
                acc[m][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, xr + m * K + i), w0, acc[m][0]);             \
        }                                                                                                        \
        for (int m = 0; m < MB; m++) yr[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));   \
    }

/* The product entry point for one dtype: both threads stream their own half of the weight rows, MAX_ROWS rows of x
 * at a time, with a constant row count per switch case so the accumulators become registers. */
#define LINEAR(NAME, T, ROW)                                                                                     \
    void NAME(const T *x, const T *w, T *y, int64_t M, int64_t K, int64_t N) {                                   \
        _Pragma("omp parallel") {                                                                                \
            int t = omp_get_thread_num(), threads = omp_get_num_threads();                                      \
            int64_t n0 = N * t / threads, n1 = N * (t + 1) / threads;                                           \
            for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {                                                      \
                const T *xr = x + m0 * K; /* this pass's rows of x and y */                                      \
                T *yr = y + m0 * N;                                                                              \
                for (int64_t n = n0; n < n1; n++) switch (M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS) {               \
                    case 1: ROW(1) break;                                                                        \
                    case 2: ROW(2) break;                                                                        \
                    case 3: ROW(3) break;                                                                        \
                    default: ROW(4) break;                                                                       \
                    }                                                                                            \
            }                                                                                                    \
        }                                                                                                        \
    }

LINEAR(lg_linear_f32, float, F32_ROW)

static inline uint16_t round_to_bf16_scalar(float value) { /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t bits;
    __builtin_memcpy(&bits, &value, 4);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fff + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

static inline float bf16_to_float(uint16_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float result;
    __builtin_memcpy(&result, &bits, 4);
    return result;
}

int lg_has_bf16(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

#ifdef __AVX512BF16__
#define BF16_ROW(MB)                                                                                             \
    {                                                                                                            \
        __m512 acc[MB][2];                                                                                       \
        for (int m = 0; m < MB; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();                                \
        const uint16_t *wr = w + n * K;                                                                          \
        int64_t i = 0;                                                                                           \
        for (; i + 64 <= K; i += 64) {                                                                           \
            if (MB >= 3) prefetch_ahead(wr + i, 2);                                                              \
            __m512i w0 = _mm512_loadu_si512(wr + i), w1 = _mm512_loadu_si512(wr + i + 32);                       \
            for (int m = 0; m < MB; m++) {                                                                       \
                acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_loadu_si512(xr + m * K + i), (__m512bh)w0); \
                acc[m][1] =                                                                                      \
                    _mm512_dpbf16_ps(acc[m][1], (__m512bh)_mm512_loadu_si512(xr + m * K + i + 32), (__m512bh)w1); \
            }                                                                                                    \
        }                                                                                                        \
        for (; i < K; i += 32) {                                                                                 \
            __mmask32 k = K - i >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (K - i)) - 1);               \
            __m512i w0 = _mm512_maskz_loadu_epi16(k, wr + i);                                                    \
            for (int m = 0; m < MB; m++)                                                                         \
                acc[m][0] =                                                                                      \
                    _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_maskz_loadu_epi16(k, xr + m * K + i), (__m512bh)w0); \
        }                                                                                                        \
        for (int m = 0; m < MB; m++)                                                                             \
            yr[m * N + n] = round_to_bf16_scalar(_mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])));             \
    }

LINEAR(lg_linear_bf16, uint16_t, BF16_ROW)
#endif

/* Attention of one new token per batch row: out (B, h, hd) = softmax(q kᵀ · scale, optionally soft-capped) v over
 * S cached positions, grouped-query (query head j reads kv head j / (h / g)). Keys and values are rows of hd
 * elements (the cache layout), given by batch and head strides; q by batch and head strides too, so views of the
 * fused projection need no copy.
 *
 * Why: torch's scaled_dot_product_attention costs ~40-100 us per layer for a single query here (setup, not
 * arithmetic): over a third of a 135M model's decoding step outside the products. Sums run in float32 for both
 * dtypes and the result is normalised at the end, as in its flash kernel.
 */
static inline __m512 load_f32(const float *p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
static inline __m512 load_bf16(const uint16_t *p, __mmask16 k) { /* bfloat16 is the top half of a float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}
static inline void store_f32(float *p, __m512 value, __mmask16 k) { _mm512_mask_storeu_ps(p, k, value); }
/* e^x for 16 floats, Cephes' expf polynomial after an x = n ln2 + r reduction (within ~2 ulp of expf); scalef
 * applies 2^n and flushes x below -88 to 0, which is what softmax weights need. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-88.0f), x); /* this operand order keeps a NaN a NaN */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline void store_bf16(uint16_t *p, __m512 value, __mmask16 k) {
    float lanes[16];
    _mm512_storeu_ps(lanes, value);
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) p[i] = round_to_bf16_scalar(lanes[i]);
}

#define MAX_HEAD_CHUNKS 32 /* head_dim up to 512 */

#define DECODE_ATTENTION(NAME, T, LOAD, STORE)                                                                   \
    int NAME(const T *q, const T *k, const T *v, T *out, int64_t B, int64_t h, int64_t g, int64_t S, int64_t hd, \
             int64_t q_batch_stride, int64_t q_head_stride, int64_t kv_batch_stride, int64_t kv_head_stride,     \
             float scale, float softcap) {                                                                       \
        int64_t chunks = (hd + 15) / 16, group = h / g;                                                          \
        if (chunks > MAX_HEAD_CHUNKS || S < 1) return -1;                                                        \
        __mmask16 last = hd % 16 ? (__mmask16)((1u << (hd % 16)) - 1) : (__mmask16)0xffff;                      \
        int failed = 0;                                                                                          \
        _Pragma("omp parallel for collapse(2) if (B * h * S * hd >= 65536) reduction(| : failed)")              \
        for (int64_t b = 0; b < B; b++)                                                                          \
            for (int64_t head = 0; head < h; head++) {                                                           \
                const T *qh = q + b * q_batch_stride + head * q_head_stride;                                     \
                const T *kh = k + b * kv_batch_stride + head / group * kv_head_stride;                           \
                const T *vh = v + b * kv_batch_stride + head / group * kv_head_stride;                           \
                float *scores = malloc(S * sizeof(float));                                                       \
                if (!scores) { failed = 1; continue; }                                                           \
                __m512 query[MAX_HEAD_CHUNKS], acc[MAX_HEAD_CHUNKS];                                             \
                for (int64_t c = 0; c < chunks; c++) {                                                           \
                    query[c] = LOAD(qh + c * 16, c == chunks - 1 ? last : 0xffff);                               \
                    acc[c] = _mm512_setzero_ps();                                                                \
                }                                                                                                \
                float top = -INFINITY;                                                                           \
                for (int64_t s = 0; s < S; s++) {                                                                \
                    __m512 dot = _mm512_setzero_ps();                                                            \
                    for (int64_t c = 0; c < chunks; c++)                                                         \
                        dot = _mm512_fmadd_ps(query[c], LOAD(kh + s * hd + c * 16, c == chunks - 1 ? last : 0xffff), dot); \
                    float score = _mm512_reduce_add_ps(dot) * scale;                                             \
                    if (softcap > 0) score = tanhf(score / softcap) * softcap;                                    \
                    scores[s] = score;                                                                           \
                    top = score > top ? score : top;                                                             \
                }                                                                                                \
                __m512 totals = _mm512_setzero_ps();                                                             \
                for (int64_t s = 0; s < S; s += 16) {                                                            \
                    __mmask16 k = S - s >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (S - s)) - 1);            \
                    __m512 weights = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, scores + s), _mm512_set1_ps(top))); \
                    _mm512_mask_storeu_ps(scores + s, k, weights);                                               \
                    totals = _mm512_add_ps(totals, _mm512_maskz_mov_ps(k, weights));                             \
                }                                                                                                \
                float total = _mm512_reduce_add_ps(totals);                                                      \
                for (int64_t s = 0; s < S; s++) {                                                                \
                    __m512 w = _mm512_set1_ps(scores[s]);                                                        \
                    for (int64_t c = 0; c < chunks; c++)                                                         \
                        acc[c] = _mm512_fmadd_ps(w, LOAD(vh + s * hd + c * 16, c == chunks - 1 ? last : 0xffff), acc[c]); \
                }                                                                                                \
                free(scores);                                                                                    \
                __m512 inverse = _mm512_set1_ps(1.0f / total);                                                   \
                T *oh = out + (b * h + head) * hd;                                                               \
                for (int64_t c = 0; c < chunks; c++)                                                             \
                    STORE(oh + c * 16, _mm512_mul_ps(acc[c], inverse), c == chunks - 1 ? last : 0xffff);         \
            }                                                                                                    \
        return failed ? -1 : 0;                                                                                  \
    }

DECODE_ATTENTION(lg_attention_f32, float, load_f32, store_f32)
DECODE_ATTENTION(lg_attention_bf16, uint16_t, load_bf16, store_bf16)

/* RMSNorm of `rows` rows of `dim`, as transformers computes it: in float32, h = x / sqrt(mean(x²) + eps); then
 * float32 models multiply by w; bfloat16 ones round h to bfloat16 first and multiply by w (Llama, a bfloat16
 * product), or multiply by (offset + w) in float32 and round once (Gemma's 1 + w).
 * Why: torch spends four ops and ~20-40 us per norm on a 576-wide row; a decoding step has two per layer. */
static inline float sum_of_squares(__m512 (*load)(const void *, int64_t, __mmask16), const void *x, int64_t dim) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < dim; i += 16) {
        __m512 value = load(x, i, dim - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (dim - i)) - 1));
        acc = _mm512_fmadd_ps(value, value, acc);
    }
    return _mm512_reduce_add_ps(acc);
}
static __m512 load_f32_at(const void *x, int64_t i, __mmask16 k) { return load_f32((const float *)x + i, k); }
static __m512 load_bf16_at(const void *x, int64_t i, __mmask16 k) { return load_bf16((const uint16_t *)x + i, k); }

void lg_rms_norm_f32(const float *x, const float *w, float *out, int64_t rows, int64_t dim, float eps,
                     float weight_offset) {
    for (int64_t row = 0; row < rows; row++, x += dim, out += dim) {
        __m512 inverse = _mm512_set1_ps(1.0f / sqrtf(sum_of_squares(load_f32_at, x, dim) / (float)dim + eps));
        for (int64_t i = 0; i < dim; i += 16) {
            __mmask16 k = dim - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (dim - i)) - 1);
            __m512 weight = _mm512_add_ps(load_f32(w + i, k), _mm512_set1_ps(weight_offset));
            store_f32(out + i, _mm512_mul_ps(_mm512_mul_ps(load_f32(x + i, k), inverse), weight), k);
        }
    }
}

void lg_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows, int64_t dim, float eps,
                      float weight_offset) {
    float lanes[16];
    for (int64_t row = 0; row < rows; row++, x += dim, out += dim) {
        float inverse = 1.0f / sqrtf(sum_of_squares(load_bf16_at, x, dim) / (float)dim + eps);
        for (int64_t i = 0; i < dim; i += 16) {
            __mmask16 k = dim - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (dim - i)) - 1);
            _mm512_storeu_ps(lanes, _mm512_mul_ps(load_bf16(x + i, k), _mm512_set1_ps(inverse)));
            for (int j = 0; j < 16 && i + j < dim; j++) {
                float weight = bf16_to_float(w[i + j]);
                float value = weight_offset != 0.0f ? lanes[j] * (weight_offset + weight)
                                                    : bf16_to_float(round_to_bf16_scalar(lanes[j])) * weight;
                out[i + j] = round_to_bf16_scalar(value);
            }
        }
    }
}

/* A decoding step's rotary embedding and cache write, from the fused q/k/v projection of one token per batch row
 * (B, (h + 2g) hd): q heads rotate into q_out (B, h, hd), k heads rotate into the cache at `position`, v heads copy
 * there. The rotation is transformers' rotate-half, x cos + roll(x, hd/2) sin with the sign folded into sin (see
 * model.apply_rope), rounded after each product and the sum as torch rounds them in bfloat16 (compiled with
 * -ffp-contract=off, so float32 rounds the same way too). Why: it replaces a dozen small torch ops per layer. */
#define ROPE_WRITE(NAME, T, TO_FLOAT, ROUND, STORE)                                                                   \
    void NAME(const T *qkv, const T *cos, const T *sin, T *q_out, T *cache_k, T *cache_v, int64_t B, int64_t h, \
              int64_t g, int64_t hd, int64_t cache_batch_stride, int64_t cache_head_stride, int64_t position,    \
              int rotate) {                                                                                      \
        int64_t half = hd / 2;                                                                                   \
        for (int64_t b = 0; b < B; b++) {                                                                        \
            const T *row = qkv + b * (h + 2 * g) * hd;                                                           \
            for (int64_t head = 0; head < h + g; head++) {                                                       \
                const T *x = row + head * hd;                                                                    \
                T *dst = head < h ? q_out + (b * h + head) * hd                                                  \
                                  : cache_k + b * cache_batch_stride + (head - h) * cache_head_stride + position * hd; \
                for (int64_t i = 0; i < hd; i++) {                                                               \
                    if (!rotate) { dst[i] = x[i]; continue; }                                                    \
                    float straight = ROUND(TO_FLOAT(x[i]) * TO_FLOAT(cos[i]));                                   \
                    float turned = ROUND(TO_FLOAT(x[i < half ? i + half : i - half]) * TO_FLOAT(sin[i]));        \
                    dst[i] = STORE(straight + turned);                                                           \
                }                                                                                                \
            }                                                                                                    \
            for (int64_t j = 0; j < g; j++) {                                                                    \
                const T *v = row + (h + g + j) * hd;                                                             \
                T *dst = cache_v + b * cache_batch_stride + j * cache_head_stride + position * hd;               \
                for (int64_t i = 0; i < hd; i++) dst[i] = v[i];                                                  \
            }                                                                                                    \
        }                                                                                                        \
    }

static inline float identity_f32(float value) { return value; }
static inline float round_through_bf16(float value) { return bf16_to_float(round_to_bf16_scalar(value)); }

ROPE_WRITE(lg_rope_write_f32, float, identity_f32, identity_f32, identity_f32)
ROPE_WRITE(lg_rope_write_bf16, uint16_t, bf16_to_float, round_through_bf16, round_to_bf16_scalar)

/* The gated MLP's act(gate) * up for SiLU, from the fused projection (rows, 2 inner) → (rows, inner):
 * silu(g) = g / (1 + e^-g) in float32, rounded to the dtype, then the product rounded, as torch's two ops do. */
#define SILU_MUL(NAME, T, LOAD, STORE, ROUND)                                                                    \
    void NAME(const T *gate_up, T *out, int64_t rows, int64_t inner) {                                           \
        for (int64_t row = 0; row < rows; row++, gate_up += 2 * inner, out += inner)                             \
            for (int64_t i = 0; i < inner; i += 16) {                                                            \
                __mmask16 k = inner - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (inner - i)) - 1);       \
                __m512 gate = LOAD(gate_up + i, k), up = LOAD(gate_up + inner + i, k);                           \
                __m512 silu = _mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gate)))); \
                STORE(out + i, _mm512_mul_ps(ROUND(silu), up), k);                                               \
            }                                                                                                    \
    }

static inline __m512 keep_f32(__m512 value) { return value; }
static inline __m512 round_bf16_lanes(__m512 value) { /* round each lane to bfloat16 and back, to nearest even */
    __m512i bits = _mm512_castps_si512(value);
    __m512i rounding = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)));
    __m512i rounded = _mm512_and_si512(_mm512_add_epi32(bits, rounding), _mm512_set1_epi32((int)0xffff0000u));
    __mmask16 nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
    return _mm512_mask_mov_ps(_mm512_castsi512_ps(rounded), nan, value);
}

SILU_MUL(lg_silu_mul_f32, float, load_f32, store_f32, keep_f32)
SILU_MUL(lg_silu_mul_bf16, uint16_t, load_bf16, store_bf16, round_bf16_lanes)

/* A whole pre-norm decoder layer (Llama, Mistral, Qwen2, SmolLM: RMSNorm, rotary attention, SiLU-gated MLP) for a
 * one-token step of B rows, composed of the kernels above in exactly the order and roundings of the per-op path
 * (the two give the same bits, tests/test_native.py). Why: on a 135M model, the ~20 calls per layer from Python
 * cost as much as a third of the step; this is one. */
typedef struct {
    const void *input_norm, *qkv, *qkv_bias, *o, *o_bias, *mlp_norm, *gate_up, *gate_up_bias, *down, *down_bias;
    int64_t hidden, heads, kv_heads, head_dim, inner, window; /* window 0: attend to every position */
    float eps, norm_offset, scale, softcap;                   /* softcap 0: none */
} lg_block;

static inline float add_f32(float a, float b) { return a + b; }
static inline uint16_t add_bf16(uint16_t a, uint16_t b) { return round_to_bf16_scalar(bf16_to_float(a) + bf16_to_float(b)); }

#define DECODER_BLOCK(NAME, T, SUFFIX, ADD)                                                                      \
    static void add_bias_##SUFFIX(T *y, const T *bias, int64_t rows, int64_t n) {                                \
        if (bias)                                                                                                \
            for (int64_t r = 0; r < rows; r++)                                                                   \
                for (int64_t i = 0; i < n; i++) y[r * n + i] = ADD(y[r * n + i], bias[i]);                       \
    }                                                                                                            \
    int NAME(const lg_block *b, const T *x, T *out, const T *cos, const T *sin, T *cache_k, T *cache_v,          \
             int64_t cache_batch_stride, int64_t cache_head_stride, int64_t B, int64_t position, int rotate) {   \
        int64_t D = b->hidden, h = b->heads, g = b->kv_heads, hd = b->head_dim, I = b->inner;                    \
        int64_t width = (h + 2 * g) * hd;                                                                        \
        T *scratch = malloc(sizeof(T) * B * (D + width + 2 * h * hd + 3 * I));                                   \
        if (!scratch) return -1;                                                                                 \
        T *normed = scratch, *qkv = normed + B * D, *q = qkv + B * width, *attended = q + B * h * hd;            \
        T *gate_up = attended + B * h * hd, *act = gate_up + 2 * B * I;                                          \
        lg_rms_norm_##SUFFIX(x, b->input_norm, normed, B, D, b->eps, b->norm_offset);                             \
        lg_linear_##SUFFIX(normed, b->qkv, qkv, B, D, width);                                                    \
        add_bias_##SUFFIX(qkv, b->qkv_bias, B, width);                                                           \
        lg_rope_write_##SUFFIX(qkv, cos, sin, q, cache_k, cache_v, B, h, g, hd, cache_batch_stride,              \
                               cache_head_stride, position, rotate);                                             \
        int64_t first = b->window && position + 1 > b->window ? position + 1 - b->window : 0;                    \
        int status = lg_attention_##SUFFIX(q, cache_k + first * hd, cache_v + first * hd, attended, B, h, g,     \
                                           position + 1 - first, hd, h * hd, hd, cache_batch_stride,              \
                                           cache_head_stride, b->scale, b->softcap);                              \
        lg_linear_##SUFFIX(attended, b->o, out, B, h * hd, D);                                                   \
        add_bias_##SUFFIX(out, b->o_bias, B, D);                                                                 \
        for (int64_t i = 0; i < B * D; i++) out[i] = ADD(x[i], out[i]); /* the residual */                       \
        lg_rms_norm_##SUFFIX(out, b->mlp_norm, normed, B, D, b->eps, b->norm_offset);                             \
        lg_linear_##SUFFIX(normed, b->gate_up, gate_up, B, D, 2 * I);                                            \
        add_bias_##SUFFIX(gate_up, b->gate_up_bias, B, 2 * I);                                                   \
        lg_silu_mul_##SUFFIX(gate_up, act, B, I);                                                                \
        lg_linear_##SUFFIX(act, b->down, normed, B, I, D);                                                       \
        add_bias_##SUFFIX(normed, b->down_bias, B, D);                                                           \
        for (int64_t i = 0; i < B * D; i++) out[i] = ADD(out[i], normed[i]);                                     \
        free(scratch);                                                                                           \
        return status;                                                                                           \
    }

DECODER_BLOCK(lg_decoder_block_f32, float, f32, add_f32)
#ifdef __AVX512BF16__
DECODER_BLOCK(lg_decoder_block_bf16, uint16_t, bf16, add_bf16)
#endif
