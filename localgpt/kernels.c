/* Decoding kernels for localgpt, x86-64 with AVX-512 or AVX2+FMA, and ARM with NEON: the work of one decoding step of a few rows (one
 * token, or one per beam) in float32 and bfloat16 — products y (M, N) = x (M, K) · w (N, K)ᵀ, the one-token
 * attention step with its rotary embedding and cache write, RMSNorm, the SiLU-gated MLP's product, and a whole
 * Llama-family layer made of them (docs/architecture.md, "Native kernels").
 *
 * Why: decoding one token reads every weight once, so its speed is memory bandwidth over weight bytes, and on a
 * small model the dispatch of ~50 torch ops per layer costs as much again. torch's bfloat16 product of one row
 * reads far below the machine's bandwidth; these loops stream each weight row once, the cores splitting the rows,
 * at the bandwidth the machine gives, in either dtype (figures: docs/benchmarks.md). Built once per machine by
 * localgpt/native.py with the system C compiler (-O3 -march=native -fopenmp -ffp-contract=off); it joins torch's own
 * OpenMP runtime (same libgomp.so.1), so torch.set_num_threads applies and the two never compete for cores.
 *
 * One source for every instruction set: the kernels are written once against the small vector layer below (VL
 * float32 lanes: 16 with AVX-512F/BW/VL, 8 with AVX2+FMA, 4 with NEON), and the compiler's target picks the layer. bfloat16
 * products use AVX512-BF16's vdpbf16ps where the CPU has it; elsewhere bfloat16 is widened to float32 in registers
 * (a bfloat16 is the top half of a float32) and multiplied there, which is exact for the products too.
 *
 * Numerics: float32 products sum each row in a different order than MKL (last-bit differences, as between any two
 * BLAS); bfloat16 multiplies pairs exactly and sums in float32, then rounds to nearest even, like torch's CPU
 * bfloat16 linear. Elementwise steps round where torch's ops round. Any size works: tails are partial loads.
 */
#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
static inline float hsum256(__m256 v) { /* the sum of 8 float32 lanes: vsum's AVX2 layer, and the 256-bit loops */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* ---- The vector layer: VL float32 lanes; `n` arguments are lane counts from 1 to VL (the tail of a row). ---- */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VL 16
typedef __m512 vf;
static inline __mmask16 lanes(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vset(float a) { return _mm512_set1_ps(a); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vf vload_n(const float *p, int64_t n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
static inline void vstore_n(float *p, vf v, int64_t n) { _mm512_mask_storeu_ps(p, lanes(n), v); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vfnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); } /* c - a b */
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vf vround_int(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT); }
static inline int vany_above(vf a, vf t) { return _mm512_cmp_ps_mask(a, t, _CMP_NLE_UQ) != 0; } /* > t, or NaN */
static inline vf vscale2(vf p, vf n) { return _mm512_scalef_ps(p, n); } /* p 2^n */
static inline vf vload_bf16_n(const uint16_t *p, int64_t n) { /* bfloat16 is the top half of a float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes(n), p)), 16));
}
static inline vf vload_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline void vsplit_bf16(__m512i v, vf *even, vf *odd) { /* 2 VL bfloat16: words 0, 2, .. and 1, 3, .. */
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
}
static inline void vload_bf16_pairs(const uint16_t *p, vf *even, vf *odd) { vsplit_bf16(_mm512_loadu_si512(p), even, odd); }
static inline vf vround_bf16(vf value) { /* each lane rounded to bfloat16 and back, to nearest even */
    __m512i bits = _mm512_castps_si512(value);
    __m512i rounding = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)));
    __m512i rounded = _mm512_and_si512(_mm512_add_epi32(bits, rounding), _mm512_set1_epi32((int)0xffff0000u));
    __mmask16 nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
    return _mm512_mask_mov_ps(_mm512_castsi512_ps(rounded), nan, value);
}
#elif defined(__AVX2__) && defined(__FMA__)
#define VL 8
typedef __m256 vf;
static inline __m256i lanes(int64_t n) { /* the first n lanes' sign bits set, for maskload/maskstore */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 8 ? n : 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vset(float a) { return _mm256_set1_ps(a); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vf vload_n(const float *p, int64_t n) { return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes(n)); }
static inline void vstore_n(float *p, vf v, int64_t n) {
    if (n >= 8) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, lanes(n), v);
}
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vfnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline float vsum(vf a) { return hsum256(a); }
static inline vf vround_int(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline int vany_above(vf a, vf t) { return _mm256_movemask_ps(_mm256_cmp_ps(a, t, _CMP_NLE_UQ)) != 0; }
static inline vf vscale2(vf p, vf n) { /* p 2^n for integral n, 2^n built in the exponent bits: below 2^-126 it
                                        * is 0 (scalef gives a denormal), above 2^127 infinity (as scalef) */
    __m256i exponent = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    exponent = _mm256_min_epi32(_mm256_max_epi32(exponent, _mm256_setzero_si256()), _mm256_set1_epi32(255));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(exponent, 23)));
}
static inline vf vload_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline void vsplit_bf16(__m256i v, vf *even, vf *odd) { /* 2 VL bfloat16: words 0, 2, .. and 1, 3, .. */
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}
static inline void vload_bf16_pairs(const uint16_t *p, vf *even, vf *odd) {
    vsplit_bf16(_mm256_loadu_si256((const __m256i *)p), even, odd);
}
static inline vf vload_bf16_n(const uint16_t *p, int64_t n) { /* no 16-bit masked load in AVX2: through a copy */
    if (n >= 8) return vload_bf16(p);
    uint16_t copy[8] = {0};
    for (int64_t i = 0; i < n && i < 8; i++) copy[i] = p[i];
    return vload_bf16(copy);
}
static inline vf vround_bf16(vf value) {
    __m256i bits = _mm256_castps_si256(value);
    __m256i rounding = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1)));
    __m256i rounded = _mm256_and_si256(_mm256_add_epi32(bits, rounding), _mm256_set1_epi32((int)0xffff0000u));
    return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), value, _mm256_cmp_ps(value, value, _CMP_UNORD_Q));
}
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define VL 4
typedef float32x4_t vf;
static inline vf vzero(void) { return vdupq_n_f32(0.0f); }
static inline vf vset(float a) { return vdupq_n_f32(a); }
static inline vf vload(const float *p) { return vld1q_f32(p); }
static inline vf vload_n(const float *p, int64_t n) { /* no masked loads in NEON: tails through a copy */
    if (n >= 4) return vld1q_f32(p);
    float copy[4] = {0};
    for (int64_t i = 0; i < n; i++) copy[i] = p[i];
    return vld1q_f32(copy);
}
static inline void vstore_n(float *p, vf v, int64_t n) {
    if (n >= 4) {
        vst1q_f32(p, v);
        return;
    }
    float copy[4];
    vst1q_f32(copy, v);
    for (int64_t i = 0; i < n; i++) p[i] = copy[i];
}
static inline vf vfma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
static inline vf vfnma(vf a, vf b, vf c) { return vfmsq_f32(c, a, b); }
static inline vf vadd(vf a, vf b) { return vaddq_f32(a, b); }
static inline vf vsub(vf a, vf b) { return vsubq_f32(a, b); }
static inline vf vmul(vf a, vf b) { return vmulq_f32(a, b); }
static inline vf vdiv(vf a, vf b) { return vdivq_f32(a, b); }
static inline vf vmax(vf a, vf b) { return vmaxq_f32(a, b); } /* a NaN stays a NaN, as the x86 operand order keeps */
static inline vf vmin(vf a, vf b) { return vminq_f32(a, b); }
static inline float vsum(vf a) { return vaddvq_f32(a); }
static inline vf vround_int(vf a) { return vrndnq_f32(a); }
static inline int vany_above(vf a, vf t) { return vminvq_u32(vcleq_f32(a, t)) == 0; } /* a lane not <= t */
static inline vf vscale2(vf p, vf n) { /* as the AVX2 layer: 2^n in the exponent bits, 0 below 2^-126, inf above */
    int32x4_t exponent = vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127));
    exponent = vminq_s32(vmaxq_s32(exponent, vdupq_n_s32(0)), vdupq_n_s32(255));
    return vmulq_f32(p, vreinterpretq_f32_s32(vshlq_n_s32(exponent, 23)));
}
static inline vf vload_bf16(const uint16_t *p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
static inline void vsplit_bf16(uint32x4_t v, vf *even, vf *odd) { /* 2 VL bfloat16: words 0, 2, .. and 1, 3, .. */
    *even = vreinterpretq_f32_u32(vshlq_n_u32(v, 16));
    *odd = vreinterpretq_f32_u32(vandq_u32(v, vdupq_n_u32(0xffff0000u)));
}
static inline void vload_bf16_pairs(const uint16_t *p, vf *even, vf *odd) {
    vsplit_bf16(vreinterpretq_u32_u16(vld1q_u16(p)), even, odd);
}
static inline vf vload_bf16_n(const uint16_t *p, int64_t n) {
    if (n >= 4) return vload_bf16(p);
    uint16_t copy[4] = {0};
    for (int64_t i = 0; i < n; i++) copy[i] = p[i];
    return vload_bf16(copy);
}
static inline vf vround_bf16(vf value) {
    uint32x4_t bits = vreinterpretq_u32_f32(value);
    uint32x4_t rounding = vaddq_u32(vdupq_n_u32(0x7fff), vandq_u32(vshrq_n_u32(bits, 16), vdupq_n_u32(1)));
    uint32x4_t rounded = vandq_u32(vaddq_u32(bits, rounding), vdupq_n_u32(0xffff0000u));
    return vbslq_f32(vceqq_f32(value, value), vreinterpretq_f32_u32(rounded), value); /* NaN lanes kept */
}
#else
#error "localgpt's kernels need AVX-512 (F, BW, VL), AVX2 with FMA, or ARM NEON"
#endif

const char *lg_isa(void) { return VL == 16 ? "avx512" : VL == 8 ? "avx2" : "neon"; }

#define MAX_ROWS 4 /* rows of x per pass over the weights: 4 x 2 accumulators stay in registers */

/* With 3-4 rows of x the loop computes long enough per byte that the hardware prefetchers fall behind: asking for
 * the weight lines 16 KB ahead into L2 makes 4-row products faster (float32; 8-bit and 4-bit too, where each line
 * holds 64 or 128 weights: a 4-row 8-bit head 3.4 → 1.6 ms on one Zen 5 core, as the loads and the arithmetic
 * overlap instead of taking turns). For 1-2 rows it costs bandwidth, so they do not (docs/benchmarks.md). */
#define PREFETCH_BYTES 16384
static inline void prefetch_ahead(const void *at, int lines) {
    for (int line = 0; line < lines; line++) __builtin_prefetch((const char *)at + PREFETCH_BYTES + 64 * line, 0, 2);
}

/* Paired loops load each vector of x once for two weight rows; gcc folds such a load back into every product that
 * reads it unless an (empty) asm claims to change the register. */
#if VL == 16
#define KEEP_IN_REGISTERS(a, b) __asm__("" : "+v"(a), "+v"(b))
#else
#define KEEP_IN_REGISTERS(a, b) ((void)(a), (void)(b)) /* not paired: 16 registers are too few for two rows */
#endif

/* One weight row n against MB rows of x, two accumulators per x row to hide the FMA latency. LOAD_TWO reads 2 VL
 * elements of the dtype as two float32 vectors, in an order w and x share; LOAD_N reads up to VL of them. */
static inline void vload_two(const float *p, vf *first, vf *second) { *first = vload(p), *second = vload(p + VL); }
#define VEC_ROW(MB, T, LOAD_TWO, LOAD_N, STORE_ONE)                                                              \
    {                                                                                                            \
        vf acc[MB][2];                                                                                           \
        for (int m = 0; m < MB; m++) acc[m][0] = acc[m][1] = vzero();                                            \
        const T *wr = w + n * K;                                                                                 \
        int64_t i = 0;                                                                                           \
        for (; i + 2 * VL <= K; i += 2 * VL) {                                                                   \
            if (MB >= 3) prefetch_ahead(wr + i, 2 * VL * (int)sizeof(T) / 64);                                   \
            vf w0, w1;                                                                                           \
            LOAD_TWO(wr + i, &w0, &w1);                                                                          \
            for (int m = 0; m < MB; m++) {                                                                       \
                vf x0, x1;                                                                                       \
                LOAD_TWO(xr + m * K + i, &x0, &x1);                                                              \
                acc[m][0] = vfma(x0, w0, acc[m][0]);                                                             \
                acc[m][1] = vfma(x1, w1, acc[m][1]);                                                             \
            }                                                                                                    \
        }                                                                                                        \
        for (; i < K; i += VL) {                                                                                 \
            vf w0 = LOAD_N(wr + i, K - i);                                                                       \
            for (int m = 0; m < MB; m++) acc[m][0] = vfma(LOAD_N(xr + m * K + i, K - i), w0, acc[m][0]);         \
        }                                                                                                        \
        for (int m = 0; m < MB; m++) yr[m * N + n] = STORE_ONE(vsum(vadd(acc[m][0], acc[m][1])));               \
    }

/* Every product's loop: both threads stream their own half of the weight rows, MAX_ROWS rows of x at a time, with a
 * constant row count per switch case so the accumulators become registers. ROW(MB) computes yr[m * N + n] for the
 * MB rows of x at xr (K apart); x is XT, y is YT. */
#define FOR_ROW_BLOCKS(XT, X, YT, Y, ROW)                                                                        \
    _Pragma("omp parallel") {                                                                                    \
        int t = omp_get_thread_num(), threads = omp_get_num_threads();                                          \
        int64_t n0 = N * t / threads, n1 = N * (t + 1) / threads;                                               \
        for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {                                                          \
            const XT *xr = (X) + m0 * K; /* this pass's rows of x and y */                                       \
            YT *yr = (Y) + m0 * N;                                                                               \
            for (int64_t n = n0; n < n1; n++) switch (M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS) {                   \
                case 1: ROW(1) break;                                                                            \
                case 2: ROW(2) break;                                                                            \
                case 3: ROW(3) break;                                                                            \
                default: ROW(4) break;                                                                           \
                }                                                                                                \
        }                                                                                                        \
    }

/* FOR_ROW_BLOCKS for loops that also have a PAIR(MB): with 2-4 rows of x, two weight rows at a time (the odd one
 * last with ROW(MB)). One row of x keeps ROW: paired, a one-row 8-bit head streaming from memory took 2.3x as long.
 * Not one macro with FOR_ROW_BLOCKS (pairing off by a flag): that made the one-row 8-bit float32 step 25% slower. */
#define FOR_ROW_PAIRS(XT, X, YT, Y, ROW, PAIR)                                                                   \
    _Pragma("omp parallel") {                                                                                    \
        int t = omp_get_thread_num(), threads = omp_get_num_threads();                                          \
        int64_t n0 = N * t / threads, n1 = N * (t + 1) / threads;                                               \
        for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {                                                          \
            const XT *xr = (X) + m0 * K;                                                                         \
            YT *yr = (Y) + m0 * N;                                                                               \
            int64_t rows = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS, n = n0;                                        \
            for (; rows > 1 && n + 1 < n1; n += 2) switch (rows) {                                               \
                case 2: PAIR(2) break;                                                                           \
                case 3: PAIR(3) break;                                                                           \
                default: PAIR(4) break;                                                                          \
                }                                                                                                \
            for (; n < n1; n++) switch (rows) {                                                                  \
                case 1: ROW(1) break;                                                                            \
                case 2: ROW(2) break;                                                                            \
                case 3: ROW(3) break;                                                                            \
                default: ROW(4) break;                                                                           \
                }                                                                                                \
        }                                                                                                        \
    }

/* The product entry point for one dtype. */
#define LINEAR(NAME, T, ROW)                                                                                     \
    void NAME(const T *x, const T *w, T *y, int64_t M, int64_t K, int64_t N) { FOR_ROW_BLOCKS(T, x, T, y, ROW) }

static inline float keep_float(float value) { return value; }
#define F32_ROW(MB) VEC_ROW(MB, float, vload_two, vload_n, keep_float)
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

/* 1 where bfloat16 products go through AVX512-BF16's vdpbf16ps; 0 where they widen to float32 in registers. */
int lg_has_bf16_dot(void) {
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
            yr[m * N + n] = round_to_bf16_scalar(_mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])));         \
    }
#else
/* Without a bfloat16 dot product: 2 VL bfloat16 values of w and of x are one load each, split into their even and
 * odd elements as float32 by a shift and a mask (a bfloat16 is a float32's upper half), so w's even values meet x's
 * even ones with no reorder: two integer operations per 2 VL values where widening VL at a time took four, two of
 * them byte shuffles (the ports a Zen 3's multiply-adds share). */
#define BF16_ROW(MB) VEC_ROW(MB, uint16_t, vload_bf16_pairs, vload_bf16_n, round_to_bf16_scalar)
#endif
LINEAR(lg_linear_bf16, uint16_t, BF16_ROW)

/* Attention of one new token per batch row: out (B, h, hd) = softmax(q kᵀ · scale, optionally soft-capped) v over
 * S cached positions, grouped-query (query head j reads kv head j / (h / g)). Keys and values are rows of hd
 * elements (the cache layout), given by batch and head strides; q by batch and head strides too, so views of the
 * fused projection need no copy.
 *
 * Why: torch's scaled_dot_product_attention costs ~40-100 us per layer for a single query here (setup, not
 * arithmetic): over a third of a 135M model's decoding step outside the products. Sums run in float32 for both
 * dtypes and the result is normalised at the end, as in its flash kernel.
 */
/* VL values stored as bfloat16, bit for bit round_to_bf16_scalar's (nearest even; a NaN stays a NaN, made quiet). */
#if VL == 16
static inline void vstore_bf16(uint16_t *p, vf value) {
    __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(vround_bf16(value)), 16);
    bits = _mm512_mask_or_epi32(bits, _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q), bits, _mm512_set1_epi32(0x40));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(bits));
}
#elif VL == 8
static inline void vstore_bf16(uint16_t *p, vf value) {
    __m256i bits = _mm256_srli_epi32(_mm256_castps_si256(vround_bf16(value)), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(value, value, _CMP_UNORD_Q));
    bits = _mm256_or_si256(bits, _mm256_and_si256(nan, _mm256_set1_epi32(0x40)));
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
}
#else
static inline void vstore_bf16(uint16_t *p, vf value) {
    uint32x4_t bits = vshrq_n_u32(vreinterpretq_u32_f32(vround_bf16(value)), 16);
    bits = vorrq_u32(bits, vandq_u32(vmvnq_u32(vceqq_f32(value, value)), vdupq_n_u32(0x40)));
    vst1_u16(p, vmovn_u32(bits));
}
#endif
static inline vf load_f32(const float *p, int64_t n) { return vload_n(p, n); }
static inline vf load_bf16(const uint16_t *p, int64_t n) { return vload_bf16_n(p, n); }
static inline void store_f32(float *p, vf value, int64_t n) { vstore_n(p, value, n); }
static inline void store_bf16(uint16_t *p, vf value, int64_t n) {
    if (n >= VL) {
        vstore_bf16(p, value);
        return;
    }
    float values[VL];
    vstore_n(values, value, VL);
    for (int64_t i = 0; i < n && i < VL; i++) p[i] = round_to_bf16_scalar(values[i]);
}
/* e^x for VL floats, Cephes' expf polynomial after an x = n ln2 + r reduction (within ~2 ulp of expf); 2^n is
 * applied last and x below -88 goes to 0 (or a denormal), which is what softmax weights need. */
static inline vf vexp(vf x) {
    x = vmin(vset(89.0f), vmax(vset(-88.0f), x)); /* this operand order keeps a NaN a NaN; e^89 is infinity */
    vf n = vround_int(vmul(x, vset(1.44269504088896341f)));
    vf r = vfnma(n, vset(0.693359375f), x);
    r = vfnma(n, vset(-2.12194440e-4f), r);
    vf p = vset(1.9875691500E-4f);
    p = vfma(p, r, vset(1.3981999507E-3f));
    p = vfma(p, r, vset(8.3334519073E-3f));
    p = vfma(p, r, vset(4.1665795894E-2f));
    p = vfma(p, r, vset(1.6666665459E-1f));
    p = vfma(p, r, vset(5.0000001201E-1f));
    p = vfma(p, vmul(r, r), vadd(r, vset(1.0f)));
    return vscale2(p, n);
}

/* The sums of 16 vectors' lanes as one vector (lane t: the sum of dots[t]), each added in vsum's order (AVX-512:
 * lanes i and i + 8, then i and i + 4, i and i + 2, i and i + 1), so every sum has vsum's bits: 45 operations and a
 * permute for 16 sums, where 16 vsums take ~130. Elsewhere: vsum one by one. */
#if VL == 16
static inline vf vsum16(const vf dots[16]) {
    vf halves[8], quarters[4], pairs[2];
    for (int i = 0; i < 8; i++) /* [a.q0 + a.q2, a.q1 + a.q3, b.q0 + b.q2, b.q1 + b.q3] (q: 128-bit quarters) */
        halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(dots[2 * i], dots[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(dots[2 * i], dots[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 4; i++) /* quarter r: source 4 i + r's lanes i + (i + 4), for i < 4 */
        quarters[i] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; i++) /* within each quarter: lanes 0 + 2, 1 + 3 of two sources */
        pairs[i] = _mm512_add_ps(_mm512_shuffle_ps(quarters[2 * i], quarters[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(quarters[2 * i], quarters[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    vf sums = _mm512_add_ps(_mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(3, 1, 3, 1)));
    /* lane 4 r + j holds the sum of source 4 j + r */
    return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), sums);
}
#else
static inline vf vsum16(const vf dots[16]) { /* not called: its loop runs where VL is 16 */
    (void)dots;
    return vzero();
}
#endif

#define MAX_HEAD_DIM 512
#define MAX_HEAD_CHUNKS (MAX_HEAD_DIM / VL)

/* Rows at their own positions (a batch of independent sequences): row b reads counts[b] slots from firsts[b]
 * (NAME##_rows); with firsts and counts NULL every row reads S slots from 0.
 * The positions are cut into spans of ATTENTION_SPAN, and the units of work run in the order (row, key/value head,
 * span, query head of its group): the query heads that share a key/value head read a span one after another,
 * while it is still in L2, instead of each streaming the whole cache from memory (3x the bytes for SmolLM2's 9
 * query heads over 3). Each unit leaves its span's max score, sum of weights and weighted values; a last pass
 * merges the spans (as flash-decoding does). A row of one span gets the same bits as without spans. */
#define ATTENTION_SPAN 256
/* One unit: n positions of one query head, CH vectors of head_dim (WIDTH: the lanes of vector c); leaves the
 * span's max score, sum of weights and weighted values in result. */
#define ATTEND_SPAN(T, LOAD, CH, WIDTH)                                                                          \
    {                                                                                                            \
        vf query[MAX_HEAD_CHUNKS], acc[MAX_HEAD_CHUNKS];                                                         \
        for (int64_t c = 0; c < (CH); c++) {                                                                     \
            query[c] = LOAD(qh + c * VL, WIDTH);                                                                 \
            acc[c] = vzero();                                                                                    \
        }                                                                                                        \
        float top = -INFINITY;                                                                                   \
        int64_t s = 0;                                                                                           \
        /* bfloat16 caches: 16 positions' sums at once (vsum16: the same bits as one at a time), the keys and     \
         * values prefetched (4-row steps 0.91 -> 0.74 ms; with float32 caches both measured 5-10% slower) */     \
        if (VL == 16 && (CH) <= 8 && sizeof(T) == 2)                                                             \
            for (; s + 16 <= n; s += 16) {                                                                       \
                vf dots[16];                                                                                     \
                for (int t = 0; t < 16; t++) {                                                                   \
                    for (int64_t line = 0; line < hd * (int64_t)sizeof(T); line += 64) {                         \
                        __builtin_prefetch((const char *)(kh + (s + 32 + t) * hd) + line, 0, 3);                \
                        __builtin_prefetch((const char *)(vh + (s + t) * hd) + line, 0, 3);                     \
                    }                                                                                            \
                    dots[t] = vzero();                                                                           \
                    for (int64_t c = 0; c < (CH); c++)                                                           \
                        dots[t] = vfma(query[c], LOAD(kh + (s + t) * hd + c * VL, WIDTH), dots[t]);              \
                }                                                                                                \
                vstore_n(scores + s, vmul(vsum16(dots), vset(scale)), 16);                                      \
                for (int t = 0; t < 16; t++) {                                                                   \
                    float score = scores[s + t];                                                                 \
                    if (softcap > 0) score = scores[s + t] = tanhf(score / softcap) * softcap;                   \
                    top = score > top ? score : top;                                                             \
                }                                                                                                \
            }                                                                                                    \
        for (; s < n; s++) {                                                                                     \
            vf dot = vzero();                                                                                    \
            for (int64_t c = 0; c < (CH); c++) dot = vfma(query[c], LOAD(kh + s * hd + c * VL, WIDTH), dot);    \
            float score = vsum(dot) * scale;                                                                     \
            if (softcap > 0) score = tanhf(score / softcap) * softcap;                                            \
            scores[s] = score;                                                                                   \
            top = score > top ? score : top;                                                                     \
        }                                                                                                        \
        vf totals = vzero();                                                                                     \
        for (int64_t s = 0; s < n; s += VL) {                                                                    \
            vf weights = vexp(vsub(vload_n(scores + s, n - s), vset(top)));                                      \
            vstore_n(scores + s, weights, n - s);                                                                \
            totals = vadd(totals, vload_n(scores + s, n - s)); /* the stored lanes only */                       \
        }                                                                                                        \
        for (int64_t s = 0; s < n; s++) {                                                                        \
            vf w = vset(scores[s]);                                                                              \
            for (int64_t c = 0; c < (CH); c++) acc[c] = vfma(w, LOAD(vh + s * hd + c * VL, WIDTH), acc[c]);     \
        }                                                                                                        \
        result[0] = top, result[1] = vsum(totals);                                                               \
        for (int64_t c = 0; c < (CH); c++) vstore_n(result + 2 + c * VL, acc[c], WIDTH);                         \
    }
#define DECODE_ATTENTION(NAME, T, LOAD, STORE)                                                                   \
    static int NAME##_impl(const T *q, const T *k, const T *v, T *out, int64_t B, int64_t h, int64_t g,         \
                           int64_t S, const int64_t *firsts, const int64_t *counts, int64_t hd,                 \
                           int64_t q_batch_stride, int64_t q_head_stride, int64_t kv_batch_stride,              \
                           int64_t kv_head_stride, float scale, float softcap) {                                \
        int64_t chunks = (hd + VL - 1) / VL, group = h / g, most = S;                                            \
        for (int64_t b = 0; counts && b < B; b++) {                                                              \
            if (counts[b] < 1) return -1;                                                                        \
            most = counts[b] > most ? counts[b] : most;                                                          \
        }                                                                                                        \
        if (chunks > MAX_HEAD_CHUNKS || most < 1) return -1;                                                     \
        int64_t spans = (most + ATTENTION_SPAN - 1) / ATTENTION_SPAN, units = B * h * spans, stride = hd + 2;    \
        float *partial = malloc(units * stride * sizeof(float)); /* per unit: max, total, hd weighted values */  \
        if (!partial) return -1;                                                                                 \
        _Pragma("omp parallel for schedule(static) if (B * h * most * hd >= 65536)")                            \
        for (int64_t unit = 0; unit < units; unit++) {                                                           \
            int64_t rest = unit / group, span = rest % spans, kv_head = rest / spans % g, b = rest / spans / g;  \
            int64_t head = kv_head * group + unit % group;                                                       \
            int64_t S = counts ? counts[b] : most, first = firsts ? firsts[b] : 0;                               \
            int64_t s0 = span * ATTENTION_SPAN, n = S - s0 < ATTENTION_SPAN ? S - s0 : ATTENTION_SPAN;           \
            float *result = partial + ((b * h + head) * spans + span) * stride;                                  \
            if (n <= 0) { /* this row holds fewer positions than the longest */                                  \
                result[0] = -INFINITY, result[1] = 0;                                                            \
                continue;                                                                                        \
            }                                                                                                    \
            const T *qh = q + b * q_batch_stride + head * q_head_stride;                                         \
            const T *kh = k + b * kv_batch_stride + kv_head * kv_head_stride + (first + s0) * hd;                \
            const T *vh = v + b * kv_batch_stride + kv_head * kv_head_stride + (first + s0) * hd;                \
            float scores[ATTENTION_SPAN];                                                                        \
            /* head_dim in whole vectors of 4, 8 or 16 (64 and 128 on every ISA): the chunk loops unroll and the   \
             * query and accumulators stay in registers (with a run-time count they lived on the stack). */       \
            int whole = hd % VL == 0;                                                                            \
            if (whole && chunks == 4) ATTEND_SPAN(T, LOAD, 4, VL)                                                \
            else if (whole && chunks == 8) ATTEND_SPAN(T, LOAD, 8, VL)                                           \
            else if (whole && chunks == 16) ATTEND_SPAN(T, LOAD, 16, VL)                                         \
            else ATTEND_SPAN(T, LOAD, chunks, hd - c * VL)                                                       \
        }                                                                                                        \
        for (int64_t bh = 0; bh < B * h; bh++) { /* merge the spans: each rescaled to the row's max */           \
            const float *first_span = partial + bh * spans * stride;                                             \
            float top = -INFINITY, total = 0;                                                                    \
            for (int64_t span = 0; span < spans; span++)                                                         \
                top = first_span[span * stride] > top ? first_span[span * stride] : top;                         \
            vf acc[MAX_HEAD_CHUNKS];                                                                             \
            for (int64_t c = 0; c < chunks; c++) acc[c] = vzero();                                               \
            for (int64_t span = 0; span < spans; span++) {                                                       \
                const float *result = first_span + span * stride;                                                \
                if (result[1] == 0) continue; /* an empty span */                                                \
                float factor = result[0] == top ? 1.0f : expf(result[0] - top);                                  \
                total += factor * result[1];                                                                     \
                for (int64_t c = 0; c < chunks; c++)                                                             \
                    acc[c] = vfma(vset(factor), vload_n(result + 2 + c * VL, hd - c * VL), acc[c]);              \
            }                                                                                                    \
            vf inverse = vset(1.0f / total);                                                                     \
            T *oh = out + bh * hd;                                                                               \
            for (int64_t c = 0; c < chunks; c++) STORE(oh + c * VL, vmul(acc[c], inverse), hd - c * VL);         \
        }                                                                                                        \
        free(partial);                                                                                           \
        return 0;                                                                                                \
    }                                                                                                            \
    int NAME(const T *q, const T *k, const T *v, T *out, int64_t B, int64_t h, int64_t g, int64_t S, int64_t hd, \
             int64_t q_batch_stride, int64_t q_head_stride, int64_t kv_batch_stride, int64_t kv_head_stride,     \
             float scale, float softcap) {                                                                       \
        return NAME##_impl(q, k, v, out, B, h, g, S, NULL, NULL, hd, q_batch_stride, q_head_stride,              \
                           kv_batch_stride, kv_head_stride, scale, softcap);                                     \
    }                                                                                                            \
    int NAME##_rows(const T *q, const T *k, const T *v, T *out, int64_t B, int64_t h, int64_t g,                 \
                    const int64_t *firsts, const int64_t *counts, int64_t hd, int64_t q_batch_stride,            \
                    int64_t q_head_stride, int64_t kv_batch_stride, int64_t kv_head_stride, float scale,         \
                    float softcap) {                                                                             \
        return NAME##_impl(q, k, v, out, B, h, g, 0, firsts, counts, hd, q_batch_stride, q_head_stride,          \
                           kv_batch_stride, kv_head_stride, scale, softcap);                                     \
    }

DECODE_ATTENTION(lg_attention_f32, float, load_f32, store_f32)
DECODE_ATTENTION(lg_attention_bf16, uint16_t, load_bf16, store_bf16)

/* RMSNorm of `rows` rows of `dim`, as transformers computes it: in float32, h = x / sqrt(mean(x²) + eps); then
 * float32 models multiply by w; bfloat16 ones round h to bfloat16 first and multiply by w (Llama, a bfloat16
 * product), or multiply by (offset + w) in float32 and round once (Gemma's 1 + w).
 * Why: torch spends four ops and ~20-40 us per norm on a 576-wide row; a decoding step has two per layer. */
#define SUM_OF_SQUARES(NAME, T, LOAD)                                                                            \
    static inline float NAME(const T *x, int64_t dim) {                                                          \
        vf acc = vzero();                                                                                        \
        for (int64_t i = 0; i < dim; i += VL) {                                                                  \
            vf value = LOAD(x + i, dim - i);                                                                     \
            acc = vfma(value, value, acc);                                                                       \
        }                                                                                                        \
        return vsum(acc);                                                                                        \
    }
SUM_OF_SQUARES(sum_of_squares_f32, float, load_f32)
SUM_OF_SQUARES(sum_of_squares_bf16, uint16_t, load_bf16)

void lg_rms_norm_f32(const float *x, const float *w, float *out, int64_t rows, int64_t dim, float eps,
                     float weight_offset) {
    for (int64_t row = 0; row < rows; row++, x += dim, out += dim) {
        vf inverse = vset(1.0f / sqrtf(sum_of_squares_f32(x, dim) / (float)dim + eps));
        for (int64_t i = 0; i < dim; i += VL) {
            vf weight = vadd(load_f32(w + i, dim - i), vset(weight_offset));
            store_f32(out + i, vmul(vmul(load_f32(x + i, dim - i), inverse), weight), dim - i);
        }
    }
}

void lg_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows, int64_t dim, float eps,
                      float weight_offset) {
    for (int64_t row = 0; row < rows; row++, x += dim, out += dim) {
        vf inverse = vset(1.0f / sqrtf(sum_of_squares_bf16(x, dim) / (float)dim + eps));
        for (int64_t i = 0; i < dim; i += VL) {
            vf normed = vmul(load_bf16(x + i, dim - i), inverse), weight = load_bf16(w + i, dim - i);
            /* Gemma's (1 + w) multiplies the float32 value; Llama's w multiplies it rounded to bfloat16 */
            vf value = weight_offset != 0.0f ? vmul(normed, vadd(vset(weight_offset), weight))
                                             : vmul(vround_bf16(normed), weight);
            store_bf16(out + i, value, dim - i);
        }
    }
}

/* A decoding step's rotary embedding and cache write, from the fused q/k/v projection of one token per batch row
 * (B, (h + 2g) hd): q heads rotate into q_out (B, h, hd), k heads rotate into the cache at `position`, v heads copy
 * there. The rotation is transformers' rotate-half, x cos + roll(x, hd/2) sin with the sign folded into sin (see
 * model.apply_rope), rounded after each product and the sum as torch rounds them in bfloat16 (compiled with
 * -ffp-contract=off, so float32 rounds the same way too). Why: it replaces a dozen small torch ops per layer. */
/* NAME##_rows: row b at its own position, writing slot slots[b] with its own tables (cos + b * table_stride). */
/* Heads whose halves are whole vectors (all but odd head sizes) rotate VL values at a time, in the same roundings. */
#define ROPE_WRITE(NAME, T, TO_FLOAT, ROUND, STORE, VLOAD, VROUND, VSTORE)                                         \
    static void NAME##_impl(const T *qkv, const T *tables_cos, const T *tables_sin, int64_t table_stride,         \
                            T *q_out, T *cache_k, T *cache_v, int64_t B, int64_t h, int64_t g, int64_t hd,      \
                            int64_t cache_batch_stride, int64_t cache_head_stride, const int64_t *slots,        \
                            int64_t slot, int rotate) {                                                         \
        int64_t half = hd / 2;                                                                                   \
        for (int64_t b = 0; b < B; b++) {                                                                        \
            const T *row = qkv + b * (h + 2 * g) * hd;                                                           \
            const T *cos = tables_cos + b * table_stride, *sin = tables_sin + b * table_stride;                  \
            int64_t position = slots ? slots[b] : slot;                                                          \
            for (int64_t head = 0; head < h + g; head++) {                                                       \
                const T *x = row + head * hd;                                                                    \
                T *dst = head < h ? q_out + (b * h + head) * hd                                                  \
                                  : cache_k + b * cache_batch_stride + (head - h) * cache_head_stride + position * hd; \
                if (!rotate) {                                                                                   \
                    memcpy(dst, x, sizeof(T) * hd);                                                              \
                    continue;                                                                                    \
                }                                                                                                \
                if (half % VL == 0) {                                                                            \
                    for (int64_t i = 0; i < half; i += VL) {                                                     \
                        vf first = VLOAD(x + i, VL), second = VLOAD(x + half + i, VL);                           \
                        VSTORE(dst + i, vadd(VROUND(vmul(first, VLOAD(cos + i, VL))),                            \
                                             VROUND(vmul(second, VLOAD(sin + i, VL)))), VL);                     \
                        VSTORE(dst + half + i, vadd(VROUND(vmul(second, VLOAD(cos + half + i, VL))),             \
                                                    VROUND(vmul(first, VLOAD(sin + half + i, VL)))), VL);        \
                    }                                                                                            \
                    continue;                                                                                    \
                }                                                                                                \
                for (int64_t i = 0; i < hd; i++) {                                                               \
                    float straight = ROUND(TO_FLOAT(x[i]) * TO_FLOAT(cos[i]));                                   \
                    float turned = ROUND(TO_FLOAT(x[i < half ? i + half : i - half]) * TO_FLOAT(sin[i]));        \
                    dst[i] = STORE(straight + turned);                                                           \
                }                                                                                                \
            }                                                                                                    \
            for (int64_t j = 0; j < g; j++) {                                                                    \
                const T *v = row + (h + g + j) * hd;                                                             \
                T *dst = cache_v + b * cache_batch_stride + j * cache_head_stride + position * hd;               \
                memcpy(dst, v, sizeof(T) * hd);                                                                  \
            }                                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
    void NAME(const T *qkv, const T *cos, const T *sin, T *q_out, T *cache_k, T *cache_v, int64_t B, int64_t h, \
              int64_t g, int64_t hd, int64_t cache_batch_stride, int64_t cache_head_stride, int64_t position,    \
              int rotate) {                                                                                      \
        NAME##_impl(qkv, cos, sin, 0, q_out, cache_k, cache_v, B, h, g, hd, cache_batch_stride,                  \
                    cache_head_stride, NULL, position, rotate);                                                  \
    }                                                                                                            \
    void NAME##_rows(const T *qkv, const T *cos, const T *sin, int64_t table_stride, T *q_out, T *cache_k,        \
                     T *cache_v, int64_t B, int64_t h, int64_t g, int64_t hd, int64_t cache_batch_stride,        \
                     int64_t cache_head_stride, const int64_t *slots, int rotate) {                              \
        NAME##_impl(qkv, cos, sin, table_stride, q_out, cache_k, cache_v, B, h, g, hd, cache_batch_stride,       \
                    cache_head_stride, slots, 0, rotate);                                                        \
    }

static inline float identity_f32(float value) { return value; }
static inline float round_through_bf16(float value) { return bf16_to_float(round_to_bf16_scalar(value)); }
static inline vf keep_f32(vf value) { return value; }

ROPE_WRITE(lg_rope_write_f32, float, identity_f32, identity_f32, identity_f32, load_f32, keep_f32, store_f32)
ROPE_WRITE(lg_rope_write_bf16, uint16_t, bf16_to_float, round_through_bf16, round_to_bf16_scalar, load_bf16,
           vround_bf16, store_bf16)

/* The gated MLP's act(gate) * up for SiLU, from the fused projection (rows, 2 inner) → (rows, inner):
 * silu(g) = g / (1 + e^-g) in float32, rounded to the dtype, then the product rounded, as torch's two ops do. */
#define SILU_MUL(NAME, T, LOAD, STORE, ROUND)                                                                    \
    void NAME(const T *gate_up, T *out, int64_t rows, int64_t inner) {                                           \
        for (int64_t row = 0; row < rows; row++, gate_up += 2 * inner, out += inner)                             \
            for (int64_t i = 0; i < inner; i += VL) {                                                            \
                vf gate = LOAD(gate_up + i, inner - i), up = LOAD(gate_up + inner + i, inner - i);               \
                vf silu = vdiv(gate, vadd(vset(1.0f), vexp(vsub(vzero(), gate))));                               \
                STORE(out + i, vmul(ROUND(silu), up), inner - i);                                                \
            }                                                                                                    \
    }

SILU_MUL(lg_silu_mul_f32, float, load_f32, store_f32, keep_f32)
SILU_MUL(lg_silu_mul_bf16, uint16_t, load_bf16, store_bf16, vround_bf16)

/* Products with bitsandbytes' quantized weights, read as its checkpoints and modules store them:
 * - 8-bit (Int8Params): w int8 (N, K) and one float32 scale per row, SCB: W[n, k] = w[n, k] SCB[n] / 127;
 * - 4-bit (Params4bit): the N K values in order, two per byte (the first in the high nibble), each block of 64
 *   consecutive values scaled by one float32 absmax: W = code[nibble] absmax[block], code being the 16-value nf4 or
 *   fp4 map (double quantization's 8-bit absmax are widened to float32 once, when the model loads).
 * y = x · Wᵀ is bitsandbytes' dequantize-then-matmul in float32 without ever making W: weights widen in registers
 * (the 16-entry code is one register, the lookup a permute) and the scale applies once per row (8-bit) or per
 * block (4-bit). x is float32 or bfloat16 (widened once per call into a float32 copy); y is in x's dtype.
 * Why: on CPU bitsandbytes dequantizes the whole weight inside every product, so its quantized models decode slower
 * than float32; these stream 1 or 1/2 byte per weight where float32 streams 4. */
#if VL == 16
typedef __m512i vi;
typedef __m512 vcode;
static inline vf vload_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vi vload_bytes(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline vi vhigh_nibbles(vi bytes) { return _mm512_srli_epi32(bytes, 4); }
static inline vcode vload_code(const float *code) { return _mm512_loadu_ps(code); }
static inline vf vlookup(vcode code, vi index) { return _mm512_permutexvar_ps(index, code); } /* low 4 bits */
static inline vi vload_words(const uint8_t *p) { return _mm512_loadu_si512(p); }
static inline vf vlookup_at(vcode code, vi words, int shift) { /* the permute reads only the low 4 bits */
    return _mm512_permutexvar_ps(_mm512_srli_epi32(words, shift), code);
}
static inline vf vgroup_scales(const float *absmax, int64_t group) { /* 128 values: lanes 0-7 then 8-15 */
    __m512d low = _mm512_castps_pd(_mm512_set1_ps(absmax[2 * group]));
    return _mm512_castpd_ps(_mm512_insertf64x4(low, _mm256_castps_pd(_mm256_set1_ps(absmax[2 * group + 1])), 1));
}
#elif VL == 8
typedef __m256i vi;
typedef struct { __m256 low, high; } vcode;
static inline vf vload_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vi vload_bytes(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline vi vhigh_nibbles(vi bytes) { return _mm256_srli_epi32(bytes, 4); }
static inline vcode vload_code(const float *code) { return (vcode){_mm256_loadu_ps(code), _mm256_loadu_ps(code + 8)}; }
static inline vf vlookup(vcode code, vi index) { /* two 8-entry permutes (low 3 bits), bit 3 picks between them */
    __m256 low = _mm256_permutevar8x32_ps(code.low, index), high = _mm256_permutevar8x32_ps(code.high, index);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
}
static inline vi vload_words(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vf vlookup_at(vcode code, vi words, int shift) { /* bit shift + 3 into the sign bit for the blend */
    vi index = _mm256_srli_epi32(words, shift);
    __m256 low = _mm256_permutevar8x32_ps(code.low, index), high = _mm256_permutevar8x32_ps(code.high, index);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(words, 28 - shift)));
}
static inline vf vgroup_scales(const float *absmax, int64_t group) { return vset(absmax[group]); } /* 64 values */
#else
typedef uint32x4_t vi;
typedef const float *vcode;
static inline vf vload_i8(const int8_t *p) { /* 4 bytes, not 8: the last row's last load must not read past it */
    int32_t bits;
    __builtin_memcpy(&bits, p, 4);
    int16x8_t wide = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(bits)));
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(wide)));
}
static inline vi vload_bytes(const uint8_t *p) {
    uint32_t bits;
    __builtin_memcpy(&bits, p, 4);
    return vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(bits)))));
}
static inline vi vhigh_nibbles(vi bytes) { return vshrq_n_u32(bytes, 4); }
static inline vcode vload_code(const float *code) { return code; }
static inline vf vlookup(vcode code, vi index) { /* NEON has no float permute: four table reads */
    float lanes[4] = {code[vgetq_lane_u32(index, 0) & 15], code[vgetq_lane_u32(index, 1) & 15],
                      code[vgetq_lane_u32(index, 2) & 15], code[vgetq_lane_u32(index, 3) & 15]};
    return vld1q_f32(lanes);
}
static inline vi vload_words(const uint8_t *p) { return vld1q_u32((const uint32_t *)p); }
static inline vf vlookup_at(vcode code, vi words, int shift) {
    return vlookup(code, vshlq_u32(words, vdupq_n_s32(-shift))); /* a negative left shift is a right shift */
}
static inline vf vgroup_scales(const float *absmax, int64_t group) { return vset(absmax[group / 2]); } /* 32 */
#endif

#define Q4_BLOCK 64                 /* values per absmax: bitsandbytes' 4-bit blocksize */
static const float INT8_SCALE = 7.874015718698502e-3f; /* 1 / 127, the constant bitsandbytes multiplies by */

/* NB weight rows from n of 8-bit values against MB rows of x (float32, K apart): Q8_PAIR, two rows paired by
 * FOR_ROW_PAIRS on AVX-512, each x vector loaded once for both (as Q4_WORDS_ROWS). */
#define Q8_ROWS(NB, MB)                                                                                          \
    {                                                                                                            \
        vf acc[NB][MB][2];                                                                                       \
        float tail[NB][MB];                                                                                      \
        for (int r = 0; r < NB; r++)                                                                             \
            for (int m = 0; m < MB; m++) acc[r][m][0] = acc[r][m][1] = vzero(), tail[r][m] = 0;                  \
        const int8_t *wr = w + n * K; /* row n + r at wr + r K */                                                \
        int64_t i = 0;                                                                                           \
        for (; i + 2 * VL <= K; i += 2 * VL) {                                                                   \
            vf w0[NB], w1[NB];                                                                                   \
            for (int r = 0; r < NB; r++) {                                                                       \
                if (MB >= 3 && i % 64 == 0) prefetch_ahead(wr + r * K + i, 1);                                   \
                w0[r] = vload_i8(wr + r * K + i), w1[r] = vload_i8(wr + r * K + i + VL);                         \
            }                                                                                                    \
            for (int m = 0; m < MB; m++) {                                                                       \
                vf x0 = vload(xr + m * K + i), x1 = vload(xr + m * K + i + VL);                                  \
                if (NB > 1) KEEP_IN_REGISTERS(x0, x1);                                                           \
                for (int r = 0; r < NB; r++) {                                                                   \
                    acc[r][m][0] = vfma(x0, w0[r], acc[r][m][0]);                                                \
                    acc[r][m][1] = vfma(x1, w1[r], acc[r][m][1]);                                                \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        for (; i < K; i++)                                                                                       \
            for (int r = 0; r < NB; r++)                                                                         \
                for (int m = 0; m < MB; m++) tail[r][m] += xr[m * K + i] * (float)wr[r * K + i];                 \
        for (int r = 0; r < NB; r++) {                                                                           \
            float row_scale = scale[n + r] * INT8_SCALE;                                                         \
            for (int m = 0; m < MB; m++)                                                                         \
                yr[m * N + n + r] = (vsum(vadd(acc[r][m][0], acc[r][m][1])) + tail[r][m]) * row_scale;           \
        }                                                                                                        \
    }
#define Q8_PAIR(MB) Q8_ROWS(2, MB)
/* One weight row: Q8_ROWS(1, MB)'s arithmetic as it was written before the pairs. Built from Q8_ROWS, a one-row
 * SmolLM2 8-bit float32 step measured 5.0 -> 6.8 ms on a Zen 4, reproducibly: gcc's code for it is worse. */
#define Q8_ROW(MB)                                                                                               \
    {                                                                                                            \
        vf acc[MB][2];                                                                                           \
        float tail[MB];                                                                                          \
        for (int m = 0; m < MB; m++) acc[m][0] = acc[m][1] = vzero(), tail[m] = 0;                               \
        const int8_t *wr = w + n * K;                                                                            \
        int64_t i = 0;                                                                                           \
        for (; i + 2 * VL <= K; i += 2 * VL) {                                                                   \
            if (MB >= 3 && i % 64 == 0) prefetch_ahead(wr + i, 1);                                               \
            vf w0 = vload_i8(wr + i), w1 = vload_i8(wr + i + VL);                                                \
            for (int m = 0; m < MB; m++) {                                                                       \
                acc[m][0] = vfma(vload(xr + m * K + i), w0, acc[m][0]);                                          \
                acc[m][1] = vfma(vload(xr + m * K + i + VL), w1, acc[m][1]);                                     \
            }                                                                                                    \
        }                                                                                                        \
        for (; i < K; i++)                                                                                       \
            for (int m = 0; m < MB; m++) tail[m] += xr[m * K + i] * (float)wr[i];                                \
        float row_scale = scale[n] * INT8_SCALE;                                                                 \
        for (int m = 0; m < MB; m++) yr[m * N + n] = (vsum(vadd(acc[m][0], acc[m][1])) + tail[m]) * row_scale;  \
    }

#if VL == 16
/* One weight row n of 4-bit values against MB rows of x. The row is read in groups of 8 VL values, VL 32-bit
 * words of 8 nibbles each: the nibble at bit 4 s of every word is one vector of weights, so a group costs one load
 * and 8 lookups (shifts, no byte shuffles). Word j holds values 8 j .. 8 j + 7 of its group, the first of each byte
 * in the high nibble, so nibble s is value 8 j + (s ^ 1): x's copy is reordered to match (q4_position).
 * A row whose length is not whole groups (576 = 4.5 x 128) ends with its last 64-value blocks read VL bytes
 * at a time, the high nibbles (VL even values) then the low ones (VL odd values). */
#define Q4_GROUP (8 * VL)
#define Q4_ROW(MB)                                                                                               \
    {                                                                                                            \
        vf acc[MB];                                                                                              \
        for (int m = 0; m < MB; m++) acc[m] = vzero();                                                           \
        const uint8_t *wr = w + n * (K / 2);                                                                     \
        const float *row_absmax = scale + n * (K / Q4_BLOCK);                                                    \
        int64_t groups = K / Q4_GROUP;                                                                           \
        for (int64_t group = 0; group < groups; group++) {                                                       \
            if (MB >= 3) prefetch_ahead(wr + group * (Q4_GROUP / 2), Q4_GROUP / 2 / 64);                         \
            vi words = vload_words(wr + group * (Q4_GROUP / 2));                                                 \
            vf sum[MB][2];                                                                                       \
            for (int m = 0; m < MB; m++) sum[m][0] = sum[m][1] = vzero();                                        \
            const float *xp = xr + group * Q4_GROUP;                                                             \
            for (int s = 0; s < 8; s += 2) {                                                                     \
                vf w0 = vlookup_at(code, words, 4 * s), w1 = vlookup_at(code, words, 4 * s + 4);                 \
                for (int m = 0; m < MB; m++) {                                                                   \
                    sum[m][0] = vfma(vload(xp + m * K + s * VL), w0, sum[m][0]);                                 \
                    sum[m][1] = vfma(vload(xp + m * K + (s + 1) * VL), w1, sum[m][1]);                           \
                }                                                                                                \
            }                                                                                                    \
            vf scales = vgroup_scales(row_absmax, group);                                                        \
            for (int m = 0; m < MB; m++) acc[m] = vfma(vadd(sum[m][0], sum[m][1]), scales, acc[m]);              \
        }                                                                                                        \
        for (int64_t block = groups * Q4_GROUP / Q4_BLOCK; block < K / Q4_BLOCK; block++) {                      \
            vf high[MB], low[MB];                                                                                \
            for (int m = 0; m < MB; m++) high[m] = low[m] = vzero();                                             \
            for (int64_t j = 0; j < Q4_BLOCK; j += 2 * VL) {                                                     \
                vi bytes = vload_bytes(wr + (block * Q4_BLOCK + j) / 2);                                         \
                vf even = vlookup(code, vhigh_nibbles(bytes)), odd = vlookup(code, bytes);                       \
                const float *xp = xr + block * Q4_BLOCK + j;                                                     \
                for (int m = 0; m < MB; m++) {                                                                   \
                    high[m] = vfma(vload(xp + m * K), even, high[m]);                                            \
                    low[m] = vfma(vload(xp + m * K + VL), odd, low[m]);                                          \
                }                                                                                                \
            }                                                                                                    \
            vf block_scale = vset(row_absmax[block]);                                                            \
            for (int m = 0; m < MB; m++) acc[m] = vfma(vadd(high[m], low[m]), block_scale, acc[m]);              \
        }                                                                                                        \
        for (int m = 0; m < MB; m++) yr[m * N + n] = vsum(acc[m]);                                               \
    }

#define Q4_CODE(values) vcode code = vload_code(values); (void)code;
#define Q4_PERIOD Q4_GROUP
static int64_t q4_position(int64_t k, int64_t K) { /* where x's value k goes in the copy Q4_ROW reads */
    if (k < K / Q4_GROUP * Q4_GROUP) { /* a whole group: value 8 j + (s ^ 1) → s VL + j */
        int64_t group = k / Q4_GROUP * Q4_GROUP, offset = k % Q4_GROUP;
        return group + (offset % 8 ^ 1) * VL + offset / 8;
    } /* the last blocks: per 2 VL values, the even ones then the odd ones */
    int64_t group = k / (2 * VL) * (2 * VL), offset = k % (2 * VL);
    return group + (offset % 2) * VL + offset / 2;
}
#else
/* AVX2 and NEON have no 16-entry float permute (AVX2's is two 8-entry ones and a blend: five instructions per 8
 * weights; NEON's lookup was four scalar reads). Their 16-entry byte shuffle (vpshufb per 128-bit lane, tbl) is one
 * instruction, so the code is looked up as its four byte planes: four shuffles give byte j of code[nibble] for
 * 4 VL nibbles, and two rounds of byte then 16-bit interleaves (unpack, zip) rebuild the 4 VL float32 values, bit
 * for bit. A 64-value block (32 bytes) is Q4_CHUNKS loads of 4 VL bytes; each gives its high nibbles (the even values)
 * then its low ones (the odd values), 4 vectors each. Within a 16-byte lane, vector r holds bytes 4 r .. 4 r + 3,
 * so x's copy is reordered to match (q4_position). */
#if VL == 8
typedef __m256i vbytes;
typedef struct { __m256i plane[4]; } vplanes;
static inline vbytes vload_chunk(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vbytes vhigh_nibble_bytes(vbytes b) { return _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(15)); }
static inline vbytes vlow_nibble_bytes(vbytes b) { return _mm256_and_si256(b, _mm256_set1_epi8(15)); }
static inline vbytes vbroadcast_table(const uint8_t *table) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)table));
}
static inline void vlookup_planes(const vplanes *code, vbytes index, vf out[4]) {
    vbytes b0 = _mm256_shuffle_epi8(code->plane[0], index), b1 = _mm256_shuffle_epi8(code->plane[1], index);
    vbytes b2 = _mm256_shuffle_epi8(code->plane[2], index), b3 = _mm256_shuffle_epi8(code->plane[3], index);
    vbytes low01 = _mm256_unpacklo_epi8(b0, b1), high01 = _mm256_unpackhi_epi8(b0, b1);
    vbytes low23 = _mm256_unpacklo_epi8(b2, b3), high23 = _mm256_unpackhi_epi8(b2, b3);
    out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(low01, low23));
    out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(low01, low23));
    out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(high01, high23));
    out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(high01, high23));
}
static inline void vlookup_bf16_planes(const vplanes *code, vbytes index, vf out[4]) {
    vbytes low = _mm256_shuffle_epi8(code->plane[2], index), high = _mm256_shuffle_epi8(code->plane[3], index);
    vsplit_bf16(_mm256_unpacklo_epi8(low, high), &out[0], &out[1]);
    vsplit_bf16(_mm256_unpackhi_epi8(low, high), &out[2], &out[3]);
}
#else
typedef uint8x16_t vbytes;
typedef struct { uint8x16_t plane[4]; } vplanes;
static inline vbytes vload_chunk(const uint8_t *p) { return vld1q_u8(p); }
static inline vbytes vhigh_nibble_bytes(vbytes b) { return vshrq_n_u8(b, 4); }
static inline vbytes vlow_nibble_bytes(vbytes b) { return vandq_u8(b, vdupq_n_u8(15)); }
static inline vbytes vbroadcast_table(const uint8_t *table) { return vld1q_u8(table); }
static inline void vlookup_planes(const vplanes *code, vbytes index, vf out[4]) {
    uint8x16_t b0 = vqtbl1q_u8(code->plane[0], index), b1 = vqtbl1q_u8(code->plane[1], index);
    uint8x16_t b2 = vqtbl1q_u8(code->plane[2], index), b3 = vqtbl1q_u8(code->plane[3], index);
    uint16x8_t low01 = vreinterpretq_u16_u8(vzip1q_u8(b0, b1)), high01 = vreinterpretq_u16_u8(vzip2q_u8(b0, b1));
    uint16x8_t low23 = vreinterpretq_u16_u8(vzip1q_u8(b2, b3)), high23 = vreinterpretq_u16_u8(vzip2q_u8(b2, b3));
    out[0] = vreinterpretq_f32_u16(vzip1q_u16(low01, low23));
    out[1] = vreinterpretq_f32_u16(vzip2q_u16(low01, low23));
    out[2] = vreinterpretq_f32_u16(vzip1q_u16(high01, high23));
    out[3] = vreinterpretq_f32_u16(vzip2q_u16(high01, high23));
}
static inline void vlookup_bf16_planes(const vplanes *code, vbytes index, vf out[4]) {
    uint8x16_t low = vqtbl1q_u8(code->plane[2], index), high = vqtbl1q_u8(code->plane[3], index);
    vsplit_bf16(vreinterpretq_u32_u8(vzip1q_u8(low, high)), &out[0], &out[1]);
    vsplit_bf16(vreinterpretq_u32_u8(vzip2q_u8(low, high)), &out[2], &out[3]);
}
#endif
/* The code's four byte planes: plane j holds byte j (little-endian) of each value's float32 bits. bf16: of the
 * value rounded to bfloat16, whose bits are planes 2 and 3 (planes 0 and 1 are zero). */
static inline vplanes vload_planes(const float *code_values, int bf16) {
    uint8_t tables[4][16];
    for (int c = 0; c < 16; c++) {
        uint32_t bits;
        __builtin_memcpy(&bits, code_values + c, 4);
        if (bf16) bits = (uint32_t)round_to_bf16_scalar(code_values[c]) << 16;
        for (int j = 0; j < 4; j++) tables[j][c] = (uint8_t)(bits >> (8 * j));
    }
    vplanes planes;
    for (int j = 0; j < 4; j++) planes.plane[j] = vbroadcast_table(tables[j]);
    return planes;
}
#define Q4_CHUNK (4 * VL)            /* bytes per load; also the nibbles per shuffle */
#define Q4_CHUNKS (Q4_BLOCK / 2 / Q4_CHUNK)
#define Q4_PLANES_ROW(MB, LOOKUP)                                                                                \
    {                                                                                                            \
        vf acc[MB];                                                                                              \
        for (int m = 0; m < MB; m++) acc[m] = vzero();                                                           \
        const uint8_t *wr = w + n * (K / 2);                                                                     \
        const float *row_absmax = scale + n * (K / Q4_BLOCK);                                                    \
        for (int64_t block = 0; block < K / Q4_BLOCK; block++) {                                                 \
            vf sum[MB][2];                                                                                       \
            for (int m = 0; m < MB; m++) sum[m][0] = sum[m][1] = vzero();                                        \
            if (MB >= 3 && block % 2 == 0) prefetch_ahead(wr + block * (Q4_BLOCK / 2), 1);                       \
            const float *xp = xr + block * Q4_BLOCK;                                                             \
            for (int chunk = 0; chunk < Q4_CHUNKS; chunk++) {                                                    \
                vbytes bytes = vload_chunk(wr + block * (Q4_BLOCK / 2) + chunk * Q4_CHUNK);                      \
                for (int half = 0; half < 2; half++) {                                                           \
                    vf weights[4];                                                                               \
                    LOOKUP(&planes, half ? vlow_nibble_bytes(bytes) : vhigh_nibble_bytes(bytes), weights);         \
                    const float *xv = xp + (chunk * 2 + half) * Q4_CHUNK;                                        \
                    for (int r = 0; r < 4; r++)                                                                  \
                        for (int m = 0; m < MB; m++)                                                             \
                            sum[m][r & 1] = vfma(vload(xv + m * K + r * VL), weights[r], sum[m][r & 1]);         \
                }                                                                                                \
            }                                                                                                    \
            vf block_scale = vset(row_absmax[block]);                                                            \
            for (int m = 0; m < MB; m++) acc[m] = vfma(vadd(sum[m][0], sum[m][1]), block_scale, acc[m]);         \
        }                                                                                                        \
        for (int m = 0; m < MB; m++) yr[m * N + n] = vsum(acc[m]);                                               \
    }

#define Q4_ROW(MB) Q4_PLANES_ROW(MB, vlookup_planes)
#define Q4_BF16_ROW(MB) Q4_PLANES_ROW(MB, vlookup_bf16_planes)

#define Q4_CODE(values) vplanes planes = vload_planes(values, 0); (void)planes;
#define Q4_PERIOD Q4_BLOCK
/* Where x's value k goes in the copy a row reads. Within a 16-byte lane, vector r holds for the float32 code's
 * lookup bytes 4 r .. 4 r + 3, for the bfloat16 code's the even (shifted) or odd (masked) words of the unpacklo or
 * unpackhi half (r = half 2 + parity). */
static int64_t q4_place(int64_t k, int bf16_code) {
    int64_t block = k / Q4_BLOCK * Q4_BLOCK, byte = k % Q4_BLOCK / 2, chunk = byte / Q4_CHUNK;
    int64_t in_chunk = byte % Q4_CHUNK, lane = in_chunk / 16, in_lane = in_chunk % 16;
    int64_t r = bf16_code ? in_lane / 8 * 2 + in_lane % 2 : in_lane / 4;
    int64_t at = bf16_code ? in_lane % 8 / 2 : in_lane % 4;
    return block + ((chunk * 2 + k % 2) * 4 + r) * VL + lane * 4 + at;
}
static int64_t q4_position(int64_t k, int64_t K) { /* Q4_ROW's */
    (void)K;
    return q4_place(k, 0);
}
#define Q4_BF16_CODE(values) vplanes planes = vload_planes(values, 1); (void)planes;
static int64_t q4_bf16_position(int64_t k, int64_t K) { /* Q4_BF16_ROW's */
    (void)K;
    return q4_place(k, 1);
}
#endif

/* x (M, K) in float32 for the quantized rows: a copy where x is bfloat16 or the 4-bit order needs one. Every 4-bit
 * order repeats per Q4_PERIOD values (AVX-512's only over whole groups: its tail is placed value by value), so the
 * copy reads the places from one table of Q4_PERIOD instead of computing each: this copy runs on one thread. */
typedef int64_t (*x_position)(int64_t k, int64_t K);
static float *widened_rows(const void *x, int bf16, x_position position, int64_t M, int64_t K) {
    if (!bf16 && !position) return (float *)x;
    float *out = malloc(sizeof(float) * M * K);
    if (!out) return NULL;
    int64_t place[Q4_PERIOD], periodic = K / Q4_PERIOD * Q4_PERIOD;
    for (int64_t j = 0; j < Q4_PERIOD; j++) place[j] = position ? position(j, K) : j;
    for (int64_t m = 0; m < M; m++) {
        const float *xf = (const float *)x + m * K;
        const uint16_t *xb = (const uint16_t *)x + m * K;
        float *row = out + m * K;
        for (int64_t base = 0; base < periodic; base += Q4_PERIOD)
            for (int64_t j = 0; j < Q4_PERIOD; j++)
                row[base + place[j]] = bf16 ? bf16_to_float(xb[base + j]) : xf[base + j];
        for (int64_t k = periodic; k < K; k++)
            row[position ? position(k, K) : k] = bf16 ? bf16_to_float(xb[k]) : xf[k];
    }
    return out;
}

/* Rows of products into float32 y (M, N); 4-bit needs K a multiple of 64 (native.py checks). */
#define QUANTIZED_LINEAR(NAME, WT, LOOP, POSITION, LOAD_CODE)                                                    \
    static int NAME(const void *x, int bf16, const WT *w, const float *scale, const float *code_values,         \
                    float *y, int64_t M, int64_t K, int64_t N) {                                                 \
        const float *xs = widened_rows(x, bf16, POSITION, M, K);                                                 \
        if (!xs) return -1;                                                                                      \
        LOAD_CODE(code_values ? code_values : (const float[16]){0}) /* 8-bit: unused */                         \
        LOOP(float, xs, float, y)                                                                                \
        if ((const void *)xs != x) free((void *)xs);                                                             \
        return 0;                                                                                                \
    }
/* LOOP(XT, X, YT, Y): the row loop each product runs (FOR_ROW_PAIRS where it has a PAIR) */
#if VL == 16
#define Q8_LOOP(XT, X, YT, Y) FOR_ROW_PAIRS(XT, X, YT, Y, Q8_ROW, Q8_PAIR)
#else
#define Q8_LOOP(XT, X, YT, Y) FOR_ROW_BLOCKS(XT, X, YT, Y, Q8_ROW)
#endif
#define Q4_LOOP(XT, X, YT, Y) FOR_ROW_BLOCKS(XT, X, YT, Y, Q4_ROW)
#define Q4_BF16_LOOP(XT, X, YT, Y) FOR_ROW_BLOCKS(XT, X, YT, Y, Q4_BF16_ROW)
QUANTIZED_LINEAR(linear_q8, int8_t, Q8_LOOP, NULL, Q4_CODE)
QUANTIZED_LINEAR(linear_q4, uint8_t, Q4_LOOP, q4_position, Q4_CODE)
#if VL != 16
/* 4-bit with bfloat16 x on AVX2 and NEON: the code rounded to bfloat16 (as the AVX512-BF16 path below rounds it)
 * is two byte planes, so 4 VL weights cost two shuffles, two byte interleaves and a shift or a mask each to widen
 * (the bfloat16 bits are a float32's upper half), against the float32 code's four shuffles and eight interleaves.
 * Products are exact in float32: a bfloat16 weight times a bfloat16 x. */
QUANTIZED_LINEAR(linear_q4_bf16_code, uint8_t, Q4_BF16_LOOP, q4_bf16_position, Q4_BF16_CODE)
#endif

#ifdef __AVX512BF16__
/* 4-bit with bfloat16 x where the CPU has AVX512-BF16: the code as 16 bfloat16 values (rounded to nearest even, as
 * bitsandbytes' own bfloat16 dequantization rounds a weight), looked up 32 at a time by vpermw and multiplied in
 * pairs by vdpbf16ps: half the lookups and products of the float32 path. 128 values are 32 16-bit words of 4 nibbles
 * each; the nibble at bit 4 s of word i is value 4 i + (s ^ 1), and x's bfloat16 copy is reordered to match. A row
 * that is not whole groups of 128 ends with one of 64 (16 words, in 256-bit registers). Products are exact in
 * float32 and summed there; the absmax scale applies per 64 values, in float32. */
#define Q4_WORDS_GROUP 128
/* The copy interleaves the rows of each pass (MAX_ROWS rows, FOR_ROW_BLOCKS'): group by group, the pass's rows'
 * 128 values one after another, so every load of x in a group is one pointer plus a constant (with a pointer per
 * row, gcc ran out of registers and spilled in the 4-row loop). */
static uint16_t *bf16_rows_for_q4(const uint16_t *x, int64_t M, int64_t K) {
    uint16_t *out = aligned_alloc(64, (sizeof(uint16_t) * M * K + 63) / 64 * 64); /* x's loads: whole lines */
    if (!out) return NULL;
    int64_t groups = K / Q4_WORDS_GROUP, whole = groups * Q4_WORDS_GROUP;
    int64_t place[Q4_WORDS_GROUP], tail_place[Q4_BLOCK]; /* the order repeats per group (the tail: 16 words) */
    for (int64_t j = 0; j < Q4_WORDS_GROUP; j++) place[j] = (j % 4 ^ 1) * 32 + j / 4;
    for (int64_t j = 0; j < Q4_BLOCK; j++) tail_place[j] = (j % 4 ^ 1) * 16 + j / 4;
    for (int64_t m = 0; m < M; m++) {
        int64_t m0 = m / MAX_ROWS * MAX_ROWS, rows = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS, r = m - m0;
        const uint16_t *row = x + m * K;
        uint16_t *pass = out + m0 * K;
        for (int64_t group = 0; group < groups; group++)
            for (int64_t j = 0; j < Q4_WORDS_GROUP; j++)
                pass[(group * rows + r) * Q4_WORDS_GROUP + place[j]] = row[group * Q4_WORDS_GROUP + j];
        for (int64_t j = 0; j < K - whole; j++) pass[whole * rows + r * Q4_BLOCK + tail_place[j]] = row[whole + j];
    }
    return out;
}

/* NB weight rows from n (1, or 2 where the loop pairs them: FOR_ROW_PAIRS) against MB rows of x. Paired, each x
 * vector is loaded once for both rows: with 4 rows of x the loads of x weighed more than the products (a 4-row
 * 3072 x 576 product took 64 us on a Zen 4, 38 with those loads left out; paired, 79 -> 67 us and a 4-row SmolLM2
 * step 10-17% faster). The arithmetic per row is the same either way. */
#define Q4_WORDS_ROWS(NB, MB)                                                                                    \
    {                                                                                                            \
        __m512 acc[NB][MB];                                                                                      \
        float tail[NB][MB];                                                                                      \
        for (int r = 0; r < NB; r++)                                                                             \
            for (int m = 0; m < MB; m++) acc[r][m] = _mm512_setzero_ps(), tail[r][m] = 0;                        \
        const uint8_t *wr = w + n * (K / 2); /* row n + r at wr + r K / 2 */                                     \
        const float *row_absmax = scale + n * (K / Q4_BLOCK);                                                    \
        int64_t groups = K / Q4_WORDS_GROUP;                                                                     \
        for (int64_t group = 0; group < groups; group++) {                                                       \
            __m512i words[NB];                                                                                   \
            for (int r = 0; r < NB; r++) {                                                                       \
                if (MB >= 3) prefetch_ahead(wr + r * (K / 2) + group * (Q4_WORDS_GROUP / 2), 1);                 \
                words[r] = _mm512_loadu_si512(wr + r * (K / 2) + group * (Q4_WORDS_GROUP / 2));                  \
            }                                                                                                    \
            __m512 sum[NB][MB][2];                                                                               \
            for (int r = 0; r < NB; r++)                                                                         \
                for (int m = 0; m < MB; m++) sum[r][m][0] = sum[r][m][1] = _mm512_setzero_ps();                  \
            const uint16_t *xp = xr + group * MB * Q4_WORDS_GROUP;                                               \
            for (int s = 0; s < 4; s++) {                                                                        \
                __m512bh weights[NB];                                                                            \
                for (int r = 0; r < NB; r++)                                                                     \
                    weights[r] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words[r], 4 * s), code32); \
                for (int m = 0; m < MB; m++) {                                                                   \
                    __m512i xv = _mm512_loadu_si512(xp + m * Q4_WORDS_GROUP + s * 32);                           \
                    if (NB > 1) __asm__("" : "+v"(xv));                                                          \
                    for (int r = 0; r < NB; r++)                                                                 \
                        sum[r][m][s & 1] = _mm512_dpbf16_ps(sum[r][m][s & 1], weights[r], (__m512bh)xv);         \
                }                                                                                                \
            }                                                                                                    \
            for (int r = 0; r < NB; r++) {                                                                       \
                __m512 scales = vgroup_scales(row_absmax + r * (K / Q4_BLOCK), group);                           \
                for (int m = 0; m < MB; m++)                                                                     \
                    acc[r][m] = _mm512_fmadd_ps(_mm512_add_ps(sum[r][m][0], sum[r][m][1]), scales, acc[r][m]);   \
            }                                                                                                    \
        }                                                                                                        \
        if (K % Q4_WORDS_GROUP) { /* the last 64 values: one absmax */                                           \
            __m256i words[NB];                                                                                   \
            for (int r = 0; r < NB; r++)                                                                         \
                words[r] = _mm256_loadu_si256((const __m256i *)(wr + r * (K / 2) + groups * (Q4_WORDS_GROUP / 2))); \
            __m256 sum[NB][MB];                                                                                  \
            for (int r = 0; r < NB; r++)                                                                         \
                for (int m = 0; m < MB; m++) sum[r][m] = _mm256_setzero_ps();                                    \
            const uint16_t *xp = xr + groups * MB * Q4_WORDS_GROUP;                                              \
            for (int s = 0; s < 4; s++) {                                                                        \
                __m256bh weights[NB];                                                                            \
                for (int r = 0; r < NB; r++)                                                                     \
                    weights[r] = (__m256bh)_mm256_permutexvar_epi16(_mm256_srli_epi16(words[r], 4 * s), code16); \
                for (int m = 0; m < MB; m++) {                                                                   \
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(xp + m * Q4_BLOCK + s * 16));              \
                    if (NB > 1) __asm__("" : "+v"(xv));                                                          \
                    for (int r = 0; r < NB; r++) sum[r][m] = _mm256_dpbf16_ps(sum[r][m], weights[r], (__m256bh)xv); \
                }                                                                                                \
            }                                                                                                    \
            for (int r = 0; r < NB; r++)                                                                         \
                for (int m = 0; m < MB; m++)                                                                     \
                    tail[r][m] = hsum256(sum[r][m]) * row_absmax[r * (K / Q4_BLOCK) + K / Q4_BLOCK - 1];         \
        }                                                                                                        \
        for (int r = 0; r < NB; r++)                                                                             \
            for (int m = 0; m < MB; m++) yr[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]) + tail[r][m];       \
    }
#define Q4_WORDS_ROW(MB) Q4_WORDS_ROWS(1, MB)
#define Q4_WORDS_PAIR(MB) Q4_WORDS_ROWS(2, MB)

static int linear_q4_words(const void *x, int bf16, const uint8_t *w, const float *scale, const float *code_values,
                           float *y, int64_t M, int64_t K, int64_t N) {
    (void)bf16;
    uint16_t *xs = bf16_rows_for_q4(x, M, K);
    if (!xs) return -1;
    uint16_t table[32];
    for (int i = 0; i < 32; i++) table[i] = round_to_bf16_scalar(code_values[i & 15]); /* vpermw reads 5 bits */
    __m512i code32 = _mm512_loadu_si512(table);
    __m256i code16 = _mm256_loadu_si256((const __m256i *)table);
    FOR_ROW_PAIRS(uint16_t, xs, float, y, Q4_WORDS_ROW, Q4_WORDS_PAIR)
    free(xs);
    return 0;
}
#define LINEAR_Q4_FOR_BF16 linear_q4_words

/* 8-bit with bfloat16 x where the CPU has AVX512-BF16: 32 int8 weights widen to float32 and narrow to bfloat16
 * (exactly: integers up to 256 are bfloat16 values) in three conversions, and vdpbf16ps multiplies them with x as
 * stored, two products per lane: with 4 rows of x (beams) this does half the float32 path's multiply-adds, which
 * bound it, and x needs no float32 copy. Products are exact in float32 and summed there; SCB / 127 applies per row. */
static inline __m512bh q8_bf16_weights(const int8_t *p, __mmask32 k) {
    __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8((__mmask16)k, p)));
    __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8((__mmask16)(k >> 16), p + 16)));
    return _mm512_cvtne2ps_pbh(high, low);
}
/* NB weight rows from n (1, or 2 paired by FOR_ROW_PAIRS: each x vector loaded once for both, as Q4_WORDS_ROWS). */
#define Q8_WORDS_ROWS(NB, MB)                                                                                    \
    {                                                                                                            \
        __m512 acc[NB][MB][2];                                                                                   \
        for (int r = 0; r < NB; r++)                                                                             \
            for (int m = 0; m < MB; m++) acc[r][m][0] = acc[r][m][1] = _mm512_setzero_ps();                      \
        const int8_t *wr = w + n * K; /* row n + r at wr + r K */                                                \
        int64_t i = 0;                                                                                           \
        for (; i + 64 <= K; i += 64) {                                                                           \
            __m512bh w0[NB], w1[NB];                                                                             \
            for (int r = 0; r < NB; r++) {                                                                       \
                if (MB >= 3) prefetch_ahead(wr + r * K + i, 1);                                                  \
                w0[r] = q8_bf16_weights(wr + r * K + i, 0xffffffffu);                                            \
                w1[r] = q8_bf16_weights(wr + r * K + i + 32, 0xffffffffu);                                       \
            }                                                                                                    \
            for (int m = 0; m < MB; m++) {                                                                       \
                __m512i x0 = _mm512_loadu_si512(xr + m * K + i), x1 = _mm512_loadu_si512(xr + m * K + i + 32);   \
                if (NB > 1) __asm__("" : "+v"(x0), "+v"(x1));                                                    \
                for (int r = 0; r < NB; r++) {                                                                   \
                    acc[r][m][0] = _mm512_dpbf16_ps(acc[r][m][0], w0[r], (__m512bh)x0);                          \
                    acc[r][m][1] = _mm512_dpbf16_ps(acc[r][m][1], w1[r], (__m512bh)x1);                          \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        for (; i < K; i += 32) {                                                                                 \
            __mmask32 k = K - i >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (K - i)) - 1);               \
            for (int r = 0; r < NB; r++) {                                                                       \
                __m512bh w0 = q8_bf16_weights(wr + r * K + i, k);                                                \
                for (int m = 0; m < MB; m++)                                                                     \
                    acc[r][m][0] = _mm512_dpbf16_ps(acc[r][m][0], w0,                                            \
                                                    (__m512bh)_mm512_maskz_loadu_epi16(k, xr + m * K + i));      \
            }                                                                                                    \
        }                                                                                                        \
        for (int r = 0; r < NB; r++) {                                                                           \
            float row_scale = scale[n + r] * INT8_SCALE;                                                         \
            for (int m = 0; m < MB; m++)                                                                         \
                yr[m * N + n + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][m][0], acc[r][m][1])) * row_scale; \
        }                                                                                                        \
    }
#define Q8_WORDS_ROW(MB) Q8_WORDS_ROWS(1, MB)
#define Q8_WORDS_PAIR(MB) Q8_WORDS_ROWS(2, MB)
static int linear_q8_words(const void *x, int bf16, const int8_t *w, const float *scale, const float *code_values,
                           float *y, int64_t M, int64_t K, int64_t N) {
    (void)bf16, (void)code_values;
    const uint16_t *xs = x;
    FOR_ROW_PAIRS(uint16_t, xs, float, y, Q8_WORDS_ROW, Q8_WORDS_PAIR)
    return 0;
}
#define LINEAR_Q8_FOR_BF16 linear_q8_words
#elif VL != 16
#define LINEAR_Q4_FOR_BF16 linear_q4_bf16_code
#else
#define LINEAR_Q4_FOR_BF16 linear_q4
#endif
#ifndef LINEAR_Q8_FOR_BF16
#define LINEAR_Q8_FOR_BF16 linear_q8
#endif

/* float32 values rounded to bfloat16, VL at a time (round_to_bf16_scalar's bits), on both threads where there are
 * enough of them to pay for waking the second. Why: value by value, rounding a 4-row head's 196,608 outputs took
 * longer than a 4-row layer's products. */
static void round_to_bf16(const float *in, uint16_t *out, int64_t count) {
    _Pragma("omp parallel for schedule(static) if (count >= 65536)")
    for (int64_t i = 0; i < count; i += VL) store_bf16(out + i, load_f32(in + i, count - i), count - i);
}

/* The entry points, by the dtype of x and y: float32 y is written in place, bfloat16 y through a float32 copy. */
#define QUANTIZED_ENTRY(NAME, IMPL, WT, T, BF16)                                                                 \
    int NAME(const T *x, const WT *w, const float *scale, const float *code, T *y, int64_t M, int64_t K,        \
             int64_t N) {                                                                                        \
        float *out = BF16 ? malloc(sizeof(float) * M * N) : (float *)y;                                          \
        if (!out) return -1;                                                                                     \
        int status = IMPL(x, BF16, w, scale, code, out, M, K, N);                                                \
        if (BF16) {                                                                                              \
            round_to_bf16(out, (uint16_t *)y, M * N);                                                            \
            free(out);                                                                                           \
        }                                                                                                        \
        return status;                                                                                           \
    }
QUANTIZED_ENTRY(lg_linear_q8_f32, linear_q8, int8_t, float, 0)
QUANTIZED_ENTRY(lg_linear_q8_bf16, LINEAR_Q8_FOR_BF16, int8_t, uint16_t, 1)
QUANTIZED_ENTRY(lg_linear_q4_f32, linear_q4, uint8_t, float, 0)
QUANTIZED_ENTRY(lg_linear_q4_bf16, LINEAR_Q4_FOR_BF16, uint8_t, uint16_t, 1)

/* 4-bit products with int8 activations, the opt-in that trades bitsandbytes' numerics for llama.cpp's (load option
 * int8_activations, CLI --int8-activations). Each row of x is rounded to int8 per block of 64 values, the 64 values
 * one absmax of the weight covers (x ≈ scale q, scale = max |x| / 127, q rounded to nearest even), and the 16-value
 * code to round(127 code): one block's product is then an exact integer dot product, scaled by absmax · scale / 127.
 * Why: with float activations every weight is a float looked up from the code, and on AVX2 those lookups (two
 * permutes and a blend per 8 weights) bound the product below the memory's speed; a byte shuffle looks up 32 int8
 * weights at once, and integer multiply-adds (VNNI's vpdpbusd, AVX2's vpmaddubsw, NEON's sdot or smull) take 32
 * or 16 pairs per instruction. It is what llama.cpp's Q4_0 does (Q8_0 activations per 32); the cost in perplexity
 * is measured in docs/quantization.md. x's copy holds each block's 32 even values (the high nibbles) then its 32
 * odd ones, so that a byte's two nibbles meet their values without a shuffle. */
#define Q4I8_HALF (Q4_BLOCK / 2)
#if defined(__x86_64__)
/* One block a step in 256 bits, |w| times x with w's sign (vpmaddubsw multiplies an unsigned byte by a signed
 * one): every x86 build has it, and AVX-512 builds use it without VNNI and for a row's last single block. A
 * 512-bit form of this loop (masked sign flips) measured slower than the two 256-bit halves on a Xeon; with VNNI
 * the wide form below avoids the sign flips altogether. */
typedef __m256 q4_sums;
static inline q4_sums q4_zero(void) { return _mm256_setzero_ps(); }
static inline q4_sums q4_fma(q4_sums a, float b, q4_sums c) {
#ifdef __FMA__
    return _mm256_fmadd_ps(a, _mm256_set1_ps(b), c);
#else /* the AVX-512 build without -mfma: AVX512VL's masked form */
    return _mm256_mask_fmadd_ps(a, 0xff, _mm256_set1_ps(b), c);
#endif
}
static inline float q4_total(q4_sums a, q4_sums b) { return hsum256(_mm256_add_ps(a, b)); }
typedef struct { __m256i even, odd; } q4_block; /* the weights of one block as int8: even values, odd values */
static inline __m256i q4_table(const int8_t *code) { return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)code)); }
static inline q4_block q4_decode(__m256i table, const uint8_t *bytes) {
    __m256i packed = _mm256_loadu_si256((const __m256i *)bytes), low4 = _mm256_set1_epi8(15);
    return (q4_block){_mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4)),
                      _mm256_shuffle_epi8(table, _mm256_and_si256(packed, low4))};
}
static inline __m256i dot_i8(__m256i sums, __m256i w, __m256i x) { /* + 4-pair sums of w x, as |w| (x sign w) */
    __m256i magnitude = _mm256_abs_epi8(w), signed_x = _mm256_sign_epi8(x, w);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(sums, magnitude, signed_x);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(sums, magnitude, signed_x);
#else /* pairs of |w| x ≤ 2 · 127 · 127 fit vpmaddubsw's 16 bits */
    return _mm256_add_epi32(sums, _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed_x), _mm256_set1_epi16(1)));
#endif
}
static inline q4_sums q4_dot(q4_block w, const int8_t *x) { /* lanes summing to Σ w x over the block, exactly */
    __m256i sums = dot_i8(_mm256_setzero_si256(), w.even, _mm256_loadu_si256((const __m256i *)x));
    return _mm256_cvtepi32_ps(dot_i8(sums, w.odd, _mm256_loadu_si256((const __m256i *)(x + Q4I8_HALF))));
}
#else /* NEON: the 16-byte table lookup is vqtbl1q */
typedef float32x4_t q4_sums;
static inline q4_sums q4_zero(void) { return vdupq_n_f32(0.0f); }
static inline q4_sums q4_fma(q4_sums a, float b, q4_sums c) { return vfmaq_n_f32(c, a, b); }
static inline float q4_total(q4_sums a, q4_sums b) { return vaddvq_f32(vaddq_f32(a, b)); }
typedef struct { int8x16_t even[2], odd[2]; } q4_block;
static inline int8x16_t q4_table(const int8_t *code) { return vld1q_s8(code); }
static inline q4_block q4_decode(int8x16_t table, const uint8_t *bytes) {
    q4_block w;
    for (int half = 0; half < 2; half++) {
        uint8x16_t packed = vld1q_u8(bytes + 16 * half);
        w.even[half] = vqtbl1q_s8(table, vshrq_n_u8(packed, 4));
        w.odd[half] = vqtbl1q_s8(table, vandq_u8(packed, vdupq_n_u8(15)));
    }
    return w;
}
static inline int32x4_t dot_i8(int32x4_t sums, int8x16_t w, int8x16_t x) {
#ifdef __ARM_FEATURE_DOTPROD
    return vdotq_s32(sums, w, x);
#else /* products of int8 fit 16 bits; pairs are added into the 32-bit sums */
    sums = vpadalq_s16(sums, vmull_s8(vget_low_s8(w), vget_low_s8(x)));
    return vpadalq_s16(sums, vmull_high_s8(w, x));
#endif
}
static inline q4_sums q4_dot(q4_block w, const int8_t *x) {
    int32x4_t sums = vdupq_n_s32(0);
    for (int half = 0; half < 2; half++) {
        sums = dot_i8(sums, w.even[half], vld1q_s8(x + 16 * half));
        sums = dot_i8(sums, w.odd[half], vld1q_s8(x + Q4I8_HALF + 16 * half));
    }
    return vcvtq_f32_s32(sums);
}
#endif

#if VL == 16 && defined(__AVX512VNNI__)
/* With AVX512-VNNI, 128 values (two blocks) a step in 512 bits, which pays where several rows share the weights
 * (beams): the code is biased to w + 128, an unsigned byte, so vpdpbusd multiplies it by x directly (no sign
 * flips), and each accumulator starts at -128 Σ x of its lane (q4i8_bias, once per call), which leaves exactly Σ w x.
 * x's copy holds, per 128 values, the two blocks' even values, then their odd ones; a last single block of 64 is
 * laid out and computed as above. */
#define Q4I8_WIDE 1
typedef struct { __m512i even, odd; } q4_wide; /* w + 128 for two blocks: their even values, their odd values */
static inline q4_wide q4_wide_decode(__m512i biased_table, const uint8_t *bytes) {
    __m512i packed = _mm512_loadu_si512(bytes), low4 = _mm512_set1_epi8(15);
    return (q4_wide){_mm512_shuffle_epi8(biased_table, _mm512_and_si512(_mm512_srli_epi16(packed, 4), low4)),
                     _mm512_shuffle_epi8(biased_table, _mm512_and_si512(packed, low4))};
}
/* Per row and group of 128: the lanes' -128 Σ x (bias) and the two blocks' scales, 8 lanes each (scales). */
static void q4i8_bias(const int8_t *xq, const float *xs, int64_t M, int64_t K, int32_t *bias, float *scales) {
    int64_t groups = K / 128;
    for (int64_t m = 0; m < M; m++)
        for (int64_t group = 0; group < groups; group++) {
            const int8_t *xp = xq + m * K + group * 128;
            __m512i offset = _mm512_set1_epi8((char)128), sums = _mm512_setzero_si512();
            sums = _mm512_dpbusd_epi32(sums, offset, _mm512_loadu_si512(xp));
            sums = _mm512_dpbusd_epi32(sums, offset, _mm512_loadu_si512(xp + 64));
            int64_t at = m * groups + group;
            _mm512_storeu_si512(bias + 16 * at, _mm512_sub_epi32(_mm512_setzero_si512(), sums));
            for (int lane = 0; lane < 16; lane++) scales[16 * at + lane] = xs[m * (K / Q4_BLOCK) + 2 * group + lane / 8];
        }
}
#define Q4I8_WIDE_ROW(MB)                                                                                        \
    {                                                                                                            \
        __m512 acc[MB];                                                                                          \
        float tail[MB];                                                                                          \
        for (int m = 0; m < MB; m++) acc[m] = _mm512_setzero_ps(), tail[m] = 0;                                  \
        const uint8_t *wr = w + n * (K / 2);                                                                     \
        const float *row_absmax = scale + n * (K / Q4_BLOCK);                                                    \
        int64_t groups = K / 128;                                                                                \
        for (int64_t group = 0; group < groups; group++) {                                                       \
            if (MB >= 3) prefetch_ahead(wr + group * 64, 1);                                                     \
            q4_wide weights = q4_wide_decode(biased_table, wr + group * 64);                                     \
            __m512 absmax = vgroup_scales(row_absmax, group);                                                    \
            for (int m = 0; m < MB; m++) {                                                                       \
                const int8_t *xp = xr + m * K + group * 128;                                                     \
                int64_t at = (m0 + m) * groups + group;                                                          \
                __m512i sums = _mm512_dpbusd_epi32(_mm512_loadu_si512(bias + 16 * at), weights.even,             \
                                                   _mm512_loadu_si512(xp));                                      \
                sums = _mm512_dpbusd_epi32(sums, weights.odd, _mm512_loadu_si512(xp + 64));                      \
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums),                                               \
                                         _mm512_mul_ps(absmax, _mm512_loadu_ps(scales + 16 * at)), acc[m]);      \
            }                                                                                                    \
        }                                                                                                        \
        if (K % 128) { /* the last block of 64 */                                                                \
            int64_t block = K / Q4_BLOCK - 1;                                                                    \
            q4_block weights = q4_decode(table, wr + block * Q4I8_HALF);                                         \
            for (int m = 0; m < MB; m++)                                                                         \
                tail[m] = q4_total(q4_dot(weights, xr + m * K + block * Q4_BLOCK), q4_zero()) *                  \
                          (row_absmax[block] * xs[(m0 + m) * (K / Q4_BLOCK) + block]);                           \
        }                                                                                                        \
        for (int m = 0; m < MB; m++) yr[m * N + n] = (_mm512_reduce_add_ps(acc[m]) + tail[m]) * INT8_SCALE;      \
    }
#else
#define Q4I8_WIDE 0
#endif

/* Where value k of a row goes in x's int8 copy: per block its even values then its odd ones, or with Q4I8_WIDE,
 * per group of 128 both blocks' even values then both blocks' odd ones. */
static inline int64_t q4i8_position(int64_t K, int64_t k) {
    int64_t i = k % Q4_BLOCK;
    if (Q4I8_WIDE && k < K / 128 * 128)
        return k / 128 * 128 + i % 2 * Q4_BLOCK + k % 128 / Q4_BLOCK * Q4I8_HALF + i / 2;
    return k - i + i % 2 * Q4I8_HALF + i / 2;
}

/* One weight row n against MB rows of x's int8 copy (xq, K apart, with one scale per block in xs). */
#define Q4I8_ROW(MB)                                                                                             \
    {                                                                                                            \
        q4_sums acc[MB][2];                                                                                      \
        for (int m = 0; m < MB; m++) acc[m][0] = acc[m][1] = q4_zero();                                          \
        const uint8_t *wr = w + n * (K / 2);                                                                     \
        const float *row_absmax = scale + n * (K / Q4_BLOCK);                                                    \
        for (int64_t block = 0; block < K / Q4_BLOCK; block++) {                                                 \
            if (MB >= 3 && block % 2 == 0) prefetch_ahead(wr + block * Q4I8_HALF, 1);                            \
            q4_block weights = q4_decode(table, wr + block * Q4I8_HALF);                                         \
            for (int m = 0; m < MB; m++) {                                                                       \
                float block_scale = row_absmax[block] * xs[(m0 + m) * (K / Q4_BLOCK) + block];                   \
                acc[m][block & 1] = q4_fma(q4_dot(weights, xr + m * K + block * Q4_BLOCK), block_scale,         \
                                           acc[m][block & 1]);                                                   \
            }                                                                                                    \
        }                                                                                                        \
        for (int m = 0; m < MB; m++) yr[m * N + n] = q4_total(acc[m][0], acc[m][1]) * INT8_SCALE;               \
    }

/* x (M, K) as int8 per 64-value block, placed as q4i8_position says, and the blocks' scales. */
static void int8_blocks(const void *x, int bf16, int64_t M, int64_t K, int8_t *xq, float *xs) {
    for (int64_t row_block = 0; row_block < M * (K / Q4_BLOCK); row_block++) {
        float values[Q4_BLOCK], lanes_largest[VL], largest = 0;
        vf top = vzero();
        for (int i = 0; i < Q4_BLOCK; i += VL) {
            int64_t at = row_block * Q4_BLOCK + i;
            vf value = bf16 ? vload_bf16((const uint16_t *)x + at) : vload((const float *)x + at);
            top = vmax(top, vmax(value, vsub(vzero(), value)));
            vstore_n(values + i, value, VL);
        }
        vstore_n(lanes_largest, top, VL);
        for (int i = 0; i < VL; i++) largest = lanes_largest[i] > largest ? lanes_largest[i] : largest;
        vf inverse = vset(largest > 0 ? 127.0f / largest : 0.0f), low = vset(-127.0f), high = vset(127.0f);
        xs[row_block] = largest / 127.0f;
        for (int i = 0; i < Q4_BLOCK; i += VL) /* to nearest even, as torch.round */
            vstore_n(values + i, vmin(vmax(vround_int(vmul(vload(values + i), inverse)), low), high), VL);
        int64_t row = row_block / (K / Q4_BLOCK), first = row_block % (K / Q4_BLOCK) * Q4_BLOCK;
        for (int i = 0; i < Q4_BLOCK; i++) xq[row * K + q4i8_position(K, first + i)] = (int8_t)values[i];
    }
}

static int linear_q4i8(const void *x, int bf16, const uint8_t *w, const float *scale, const float *code_values,
                       float *y, int64_t M, int64_t K, int64_t N) {
    int8_t *xq = malloc(M * K), code[16];
    float *xs = malloc(sizeof(float) * (M * (K / Q4_BLOCK) + 1));
    if (!xq || !xs) return free(xq), free(xs), -1;
    int8_blocks(x, bf16, M, K, xq, xs);
    for (int i = 0; i < 16; i++) { /* round(127 code), code values being within [-1, 1] */
        float rounded = nearbyintf(code_values[i] * 127.0f);
        code[i] = (int8_t)(rounded > 127 ? 127 : rounded < -127 ? -127 : rounded);
    }
    __typeof__(q4_table(code)) table = q4_table(code);
#if Q4I8_WIDE
    if (K >= 128) {
        int64_t groups = M * (K / 128);
        int32_t *bias = malloc(sizeof(int32_t) * 16 * groups);
        float *scales = malloc(sizeof(float) * 16 * groups);
        uint8_t biased[16];
        for (int i = 0; i < 16; i++) biased[i] = (uint8_t)(code[i] + 128);
        __m512i biased_table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)biased));
        if (bias && scales) {
            q4i8_bias(xq, xs, M, K, bias, scales);
            FOR_ROW_BLOCKS(int8_t, xq, float, y, Q4I8_WIDE_ROW)
        }
        int failed = !bias || !scales;
        free(bias), free(scales), free(xq), free(xs);
        return failed ? -1 : 0;
    }
#endif
    FOR_ROW_BLOCKS(int8_t, xq, float, y, Q4I8_ROW)
    free(xq), free(xs);
    return 0;
}
QUANTIZED_ENTRY(lg_linear_q4i8_f32, linear_q4i8, uint8_t, float, 0)
QUANTIZED_ENTRY(lg_linear_q4i8_bf16, linear_q4i8, uint8_t, uint16_t, 1)

/* The whole weight (N, K) in float32 or bfloat16 for products of many rows (a prompt), computed exactly as
 * bitsandbytes' int8_vectorwise_dequant and dequantize_4bit compute it (one rounding of the float32 value). 4-bit
 * looks its values up VL at a time, as the products do (2.6x faster than one at a time), and interleaves each byte's
 * two values back into order. */
#if VL == 16
static inline void vinterleave(vf even, vf odd, vf *first, vf *second) {
    *first = _mm512_permutex2var_ps(even, _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0), odd);
    *second = _mm512_permutex2var_ps(even, _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8),
                                     odd);
}
#elif VL == 8
static inline void vinterleave(vf even, vf odd, vf *first, vf *second) {
    __m256 low = _mm256_unpacklo_ps(even, odd), high = _mm256_unpackhi_ps(even, odd); /* per 128-bit lane */
    *first = _mm256_permute2f128_ps(low, high, 0x20), *second = _mm256_permute2f128_ps(low, high, 0x31);
}
#else
static inline void vinterleave(vf even, vf odd, vf *first, vf *second) {
    *first = vzip1q_f32(even, odd), *second = vzip2q_f32(even, odd);
}
#endif
static inline void vstore_f32(float *p, vf value) { vstore_n(p, value, VL); }

#define DEQUANTIZE(SUFFIX, T, STORE_ONE, STORE)                                                                  \
    void lg_dequantize_q8_##SUFFIX(const int8_t *w, const float *scb, T *out, int64_t N, int64_t K) {           \
        _Pragma("omp parallel for") for (int64_t n = 0; n < N; n++) for (int64_t k = 0; k < K; k++)              \
            out[n * K + k] = STORE_ONE((float)w[n * K + k] * scb[n] * INT8_SCALE);                               \
    }                                                                                                            \
    void lg_dequantize_q4_##SUFFIX(const uint8_t *w, const float *absmax, const float *code_values, T *out,     \
                                   int64_t count) { /* count: whole 64-value blocks */                           \
        vcode code = vload_code(code_values);                                                                    \
        _Pragma("omp parallel for") for (int64_t block = 0; block < count / Q4_BLOCK; block++) {                 \
            vf block_scale = vset(absmax[block]);                                                                \
            for (int64_t j = block * Q4_BLOCK; j < (block + 1) * Q4_BLOCK; j += 2 * VL) {                        \
                vi bytes = vload_bytes(w + j / 2);                                                               \
                vf first, second;                                                                                \
                vinterleave(vmul(vlookup(code, vhigh_nibbles(bytes)), block_scale),                             \
                            vmul(vlookup(code, bytes), block_scale), &first, &second);                          \
                STORE(out + j, first), STORE(out + j + VL, second);                                              \
            }                                                                                                    \
        }                                                                                                        \
    }
DEQUANTIZE(f32, float, keep_float, vstore_f32)
DEQUANTIZE(bf16, uint16_t, round_to_bf16_scalar, vstore_bf16)

/* A whole pre-norm decoder layer (Llama, Mistral, Qwen2, SmolLM: RMSNorm, rotary attention, SiLU-gated MLP) for a
 * one-token step of B rows, composed of the kernels above in exactly the order and roundings of the per-op path
 * (the two give the same bits, tests/test_native.py). Why: on a 135M model, the ~20 calls per layer from Python
 * cost as much as a third of the step; this is one. */
enum { QKV, O, GATE_UP, DOWN, PROJECTIONS };
typedef struct {
    const void *input_norm, *qkv, *qkv_bias, *o, *o_bias, *mlp_norm, *gate_up, *gate_up_bias, *down, *down_bias;
    int64_t hidden, heads, kv_heads, head_dim, inner;
    float eps, norm_offset, scale, softcap; /* softcap 0: none */
    /* per projection (QKV, O, GATE_UP, DOWN): 0 a weight in the layer's dtype, or 8 / 4 a bitsandbytes 8-bit or
     * 4-bit one with its scales (SCB or absmax) and, for 4-bit, its 16-value code */
    int64_t bits[PROJECTIONS];
    const float *scales[PROJECTIONS], *codes[PROJECTIONS];
    int64_t int8_activations; /* 1: the 4-bit projections take x rounded to int8 (linear_q4i8) */
} lg_block;

/* out = a + b, rounded to the dtype once as torch's add rounds it, VL at a time (out may be a or b). */
#define ADD_VALUES(NAME, T, LOAD, STORE)                                                                         \
    static void NAME(const T *a, const T *b, T *out, int64_t count) {                                            \
        for (int64_t i = 0; i < count; i += VL) STORE(out + i, vadd(LOAD(a + i, count - i), LOAD(b + i, count - i)), count - i); \
    }
ADD_VALUES(add_f32, float, load_f32, store_f32)
ADD_VALUES(add_bf16, uint16_t, load_bf16, store_bf16)

#define DECODER_BLOCK(NAME, T, SUFFIX, ADD)                                                                      \
    static int project_##SUFFIX(const lg_block *b, int which, const void *w, const T *x, T *y, int64_t M,       \
                                int64_t K, int64_t N) {                                                          \
        if (b->bits[which] == 8) return lg_linear_q8_##SUFFIX(x, w, b->scales[which], NULL, y, M, K, N);         \
        if (b->bits[which] == 4 && b->int8_activations)                                                          \
            return lg_linear_q4i8_##SUFFIX(x, w, b->scales[which], b->codes[which], y, M, K, N);                 \
        if (b->bits[which] == 4) return lg_linear_q4_##SUFFIX(x, w, b->scales[which], b->codes[which], y, M, K, N); \
        lg_linear_##SUFFIX(x, w, y, M, K, N);                                                                    \
        return 0;                                                                                                \
    }                                                                                                            \
    static void add_bias_##SUFFIX(T *y, const T *bias, int64_t rows, int64_t n) {                                \
        if (bias)                                                                                                \
            for (int64_t r = 0; r < rows; r++)                                                                   \
                ADD(y + r * n, bias, y + r * n, n);                                                              \
    }                                                                                                            \
    /* The new position's keys and values go to cache slot `slot`; attention reads `count` slots from `first` (the \
     * layer cache decides them: a window, or a ring's slots). */                                               \
    static int NAME##_impl(const lg_block *b, const T *x, T *out, const T *cos, const T *sin,                   \
                           int64_t table_stride, T *cache_k, T *cache_v, int64_t cache_batch_stride,            \
                           int64_t cache_head_stride, int64_t B, int64_t slot, int64_t first, int64_t count,    \
                           const int64_t *slots, const int64_t *firsts, const int64_t *counts, int rotate) {    \
        int64_t D = b->hidden, h = b->heads, g = b->kv_heads, hd = b->head_dim, I = b->inner;                    \
        int64_t width = (h + 2 * g) * hd;                                                                        \
        T *scratch = malloc(sizeof(T) * B * (D + width + 2 * h * hd + 3 * I));                                   \
        if (!scratch) return -1;                                                                                 \
        T *normed = scratch, *qkv = normed + B * D, *q = qkv + B * width, *attended = q + B * h * hd;            \
        T *gate_up = attended + B * h * hd, *act = gate_up + 2 * B * I;                                          \
        lg_rms_norm_##SUFFIX(x, b->input_norm, normed, B, D, b->eps, b->norm_offset);                             \
        int failed = project_##SUFFIX(b, QKV, b->qkv, normed, qkv, B, D, width);                                     \
        add_bias_##SUFFIX(qkv, b->qkv_bias, B, width);                                                           \
        lg_rope_write_##SUFFIX##_impl(qkv, cos, sin, table_stride, q, cache_k, cache_v, B, h, g, hd,             \
                                      cache_batch_stride, cache_head_stride, slots, slot, rotate);               \
        int status = lg_attention_##SUFFIX##_impl(q, cache_k + first * hd, cache_v + first * hd, attended, B, h, \
                                                  g, count, firsts, counts, hd, h * hd, hd, cache_batch_stride,  \
                                                  cache_head_stride, b->scale, b->softcap);                       \
        failed |= project_##SUFFIX(b, O, b->o, attended, out, B, h * hd, D);                                         \
        add_bias_##SUFFIX(out, b->o_bias, B, D);                                                                 \
        ADD(x, out, out, B * D); /* the residual */                                                              \
        lg_rms_norm_##SUFFIX(out, b->mlp_norm, normed, B, D, b->eps, b->norm_offset);                             \
        failed |= project_##SUFFIX(b, GATE_UP, b->gate_up, normed, gate_up, B, D, 2 * I);                            \
        add_bias_##SUFFIX(gate_up, b->gate_up_bias, B, 2 * I);                                                   \
        lg_silu_mul_##SUFFIX(gate_up, act, B, I);                                                                \
        failed |= project_##SUFFIX(b, DOWN, b->down, act, normed, B, I, D);                                          \
        add_bias_##SUFFIX(normed, b->down_bias, B, D);                                                           \
        ADD(out, normed, out, B * D);                                                                            \
        free(scratch);                                                                                           \
        return status | failed;                                                                                  \
    }                                                                                                            \
    int NAME(const lg_block *b, const T *x, T *out, const T *cos, const T *sin, T *cache_k, T *cache_v,          \
             int64_t cache_batch_stride, int64_t cache_head_stride, int64_t B, int64_t slot, int64_t first,      \
             int64_t count, int rotate) {                                                                        \
        return NAME##_impl(b, x, out, cos, sin, 0, cache_k, cache_v, cache_batch_stride, cache_head_stride, B,   \
                           slot, first, count, NULL, NULL, NULL, rotate);                                        \
    }                                                                                                            \
    /* Rows at their own positions: row b writes slots[b], reads counts[b] slots from firsts[b], and rotates   \
     * with its own tables (cos + b * table_stride). */                                                         \
    int NAME##_rows(const lg_block *b, const T *x, T *out, const T *cos, const T *sin, int64_t table_stride,     \
                    T *cache_k, T *cache_v, int64_t cache_batch_stride, int64_t cache_head_stride, int64_t B,    \
                    const int64_t *slots, const int64_t *firsts, const int64_t *counts, int rotate) {            \
        return NAME##_impl(b, x, out, cos, sin, table_stride, cache_k, cache_v, cache_batch_stride,              \
                           cache_head_stride, B, 0, 0, 0, slots, firsts, counts, rotate);                         \
    }

DECODER_BLOCK(lg_decoder_block_f32, float, f32, add_f32)
DECODER_BLOCK(lg_decoder_block_bf16, uint16_t, bf16, add_bf16)

/* Beam search's cache reorder, every layer's keys and values in one call: in buffer j (B, heads[j], slots,
 * row_bytes[j] per slot; batch and head strides in bytes), rows moved[i] become copies of rows sources[i] over slots
 * [firsts[j], stops[j]). Each buffer's sources are read into scratch first, so rows that swap places are safe.
 * Why: 60 advanced-index copies of a few KB each took 1.3-1.7 ms of a 4-beam SmolLM2 step (~20 us apiece). */
int lg_copy_rows(int64_t buffers, char *const *bases, const int64_t *batch_strides, const int64_t *head_strides,
                 const int64_t *heads, const int64_t *row_bytes, const int64_t *firsts, const int64_t *stops,
                 const int64_t *moved, const int64_t *sources, int64_t count) {
    int failed = 0;
    _Pragma("omp parallel for schedule(static) reduction(|:failed)")
    for (int64_t j = 0; j < buffers; j++) {
        int64_t span = (stops[j] - firsts[j]) * row_bytes[j];
        if (span <= 0) continue;
        char *scratch = malloc(span * heads[j] * count);
        if (!scratch) {
            failed = 1;
            continue;
        }
        char *first = bases[j] + firsts[j] * row_bytes[j];
        for (int64_t i = 0; i < count; i++)
            for (int64_t h = 0; h < heads[j]; h++)
                memcpy(scratch + (i * heads[j] + h) * span, first + sources[i] * batch_strides[j] + h * head_strides[j], span);
        for (int64_t i = 0; i < count; i++)
            for (int64_t h = 0; h < heads[j]; h++)
                memcpy(first + moved[i] * batch_strides[j] + h * head_strides[j], scratch + (i * heads[j] + h) * span, span);
        free(scratch);
    }
    return failed ? -1 : 0;
}

/* Beam search's candidates: the `keep` best of scores (rows, cols) taken as one flat array, best first, with their
 * flat indices, as torch.topk of the flattened scores gives them. In one pass: VL scores at a time are compared with
 * the worst of the best keep + 1 so far, and only a vector holding a better one (or a NaN) is looked at value by
 * value. Returns 1 where torch.topk must decide instead: a NaN (it ranks NaN first) or a tie among the best keep + 1
 * (its order between equal values is its own). Why: per-row torch.topk and their merge took ~0.23 ms of each 4-beam
 * SmolLM2 step (49,152 tokens a row); this takes a few hundredths. */
#define MAX_CANDIDATES 64
int lg_top_candidates(const float *scores, int64_t rows, int64_t cols, int64_t keep, float *values,
                      int64_t *indices) {
    int64_t count = rows * cols, best = keep + 1;
    if (best > MAX_CANDIDATES || best > count) return 1;
    float top[MAX_CANDIDATES];
    int64_t at[MAX_CANDIDATES], held = 0;
    int64_t i = 0;
    for (; i < count; i++) {
        float value = scores[i];
        if (value != value) return 1;
        if (held == best && !(value > top[best - 1])) {
            if (i % VL == 0) break; /* full, and the rest goes vector by vector */
            continue;
        }
        int64_t j = held < best ? held++ : best - 1;
        for (; j > 0 && top[j - 1] < value; j--) top[j] = top[j - 1], at[j] = at[j - 1];
        top[j] = value, at[j] = i;
    }
    for (; i < count; i += VL) {
        int64_t n = count - i < VL ? count - i : VL;
        if (n == VL && !vany_above(vload(scores + i), vset(top[best - 1]))) continue;
        for (int64_t lane = 0; lane < n; lane++) {
            float value = scores[i + lane];
            if (value != value) return 1;
            if (!(value > top[best - 1])) continue;
            int64_t j = best - 1;
            for (; j > 0 && top[j - 1] < value; j--) top[j] = top[j - 1], at[j] = at[j - 1];
            top[j] = value, at[j] = i + lane;
        }
    }
    for (int64_t j = 0; j + 1 < best; j++)
        if (!(top[j] > top[j + 1])) return 1;
    for (int64_t j = 0; j < keep; j++) values[j] = top[j], indices[j] = at[j];
    return 0;
}
