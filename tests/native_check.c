/* Checks every kernel of localgpt/kernels.c against plain C references in double precision, for whichever
 * instruction set it is compiled for: the test suite builds it for each x86 build the host can run, and for ARM
 * NEON with the aarch64 cross compiler, run under qemu-user (tests/test_native.py). Shapes have tails (sizes that
 * are not a multiple of any vector width), grouped heads and soft-capping; the whole-layer kernel must give the
 * same bits as the kernels it is made of. Prints one line per failure and a summary; exit 0 when all pass.
 *
 *   cc -O2 -march=native -fopenmp -ffp-contract=off -Ilocalgpt tests/native_check.c -lm -o check && ./check
 */
#include "kernels.c"

#include <stdio.h>
#include <string.h>

static int checks, failures;
static uint64_t state = 88172645463325252ull;

static float uniform(void) { /* xorshift: the same numbers on every machine */
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return (float)((state >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}
static void fill(float *x, int64_t n, float scale) {
    for (int64_t i = 0; i < n; i++) x[i] = uniform() * scale;
}
static void to_bf16(const float *x, uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = round_to_bf16_scalar(x[i]);
}
static void expect(int ok, const char *what, int64_t a, int64_t b, int64_t c, double got, double want) {
    checks++;
    if (!ok) {
        failures++;
        printf("FAIL %s (%lld, %lld, %lld): got %.9g, want %.9g\n", what, (long long)a, (long long)b, (long long)c, got,
               want);
    }
}

static void check_linear(void) {
    const int64_t Ms[] = {1, 2, 3, 4, 5}, Ks[] = {1, 7, 37, 64, 100}, Ns[] = {1, 5, 33};
    for (int a = 0; a < 5; a++)
        for (int b = 0; b < 5; b++)
            for (int c = 0; c < 3; c++) {
                int64_t M = Ms[a], K = Ks[b], N = Ns[c];
                float *x = malloc(4 * M * K), *w = malloc(4 * N * K), *y = malloc(4 * M * N);
                uint16_t *xb = malloc(2 * M * K), *wb = malloc(2 * N * K), *yb = malloc(2 * M * N);
                fill(x, M * K, 1), fill(w, N * K, 1);
                to_bf16(x, xb, M * K), to_bf16(w, wb, N * K);
                lg_linear_f32(x, w, y, M, K, N);
                lg_linear_bf16(xb, wb, yb, M, K, N);
                for (int64_t m = 0; m < M; m++)
                    for (int64_t n = 0; n < N; n++) {
                        double exact = 0, size = 0, exact_bf16 = 0;
                        for (int64_t k = 0; k < K; k++) {
                            exact += (double)x[m * K + k] * w[n * K + k];
                            size += fabs((double)x[m * K + k] * w[n * K + k]);
                            exact_bf16 += (double)bf16_to_float(xb[m * K + k]) * bf16_to_float(wb[n * K + k]);
                        }
                        double got = y[m * N + n], got_bf16 = bf16_to_float(yb[m * N + n]);
                        expect(fabs(got - exact) <= 1e-6 * size + 1e-7, "linear_f32", M, K, N, got, exact);
                        expect(fabs(got_bf16 - exact_bf16) <= 0.0079 * fabs(exact_bf16) + 1e-6 * size, "linear_bf16", M,
                               K, N, got_bf16, exact_bf16);
                    }
                free(x), free(w), free(y), free(xb), free(wb), free(yb);
            }
}

static void check_attention(void) {
    /* 520 and 300 positions cross the kernel's 256-position spans (64: head_dim in whole vectors on every ISA) */
    const int64_t shapes[][5] = {{1, 9, 3, 520, 64}, {4, 4, 2, 7, 24}, {2, 8, 8, 33, 256}, {1, 2, 1, 1, 16},
                                 {3, 6, 2, 300, 80}, {1, 4, 4, 70, 18}};
    for (int shape = 0; shape < 6; shape++)
        for (int capped = 0; capped < 2; capped++) {
            int64_t B = shapes[shape][0], h = shapes[shape][1], g = shapes[shape][2], S = shapes[shape][3];
            int64_t hd = shapes[shape][4];
            float softcap = capped ? 30.0f : 0.0f, scale = 1.0f / sqrtf((float)hd);
            float *q = malloc(4 * B * h * hd), *k = malloc(4 * B * g * S * hd), *v = malloc(4 * B * g * S * hd);
            float *out = malloc(4 * B * h * hd);
            uint16_t *qb = malloc(2 * B * h * hd), *kb = malloc(2 * B * g * S * hd), *vb = malloc(2 * B * g * S * hd);
            uint16_t *outb = malloc(2 * B * h * hd);
            double *weights = malloc(8 * S);
            fill(q, B * h * hd, 2), fill(k, B * g * S * hd, 2), fill(v, B * g * S * hd, 1);
            to_bf16(q, qb, B * h * hd), to_bf16(k, kb, B * g * S * hd), to_bf16(v, vb, B * g * S * hd);
            int status = lg_attention_f32(q, k, v, out, B, h, g, S, hd, h * hd, hd, g * S * hd, S * hd, scale, softcap);
            status |= lg_attention_bf16(qb, kb, vb, outb, B, h, g, S, hd, h * hd, hd, g * S * hd, S * hd, scale, softcap);
            expect(status == 0, "attention status", B, S, hd, status, 0);
            for (int64_t b = 0; b < B; b++)
                for (int64_t head = 0; head < h; head++) {
                    const float *qh = q + (b * h + head) * hd, *kh = k + (b * g + head / (h / g)) * S * hd;
                    const float *vh = v + (b * g + head / (h / g)) * S * hd;
                    double top = -INFINITY, total = 0;
                    for (int64_t s = 0; s < S; s++) {
                        double dot = 0;
                        for (int64_t i = 0; i < hd; i++) dot += (double)qh[i] * kh[s * hd + i];
                        dot *= scale;
                        if (capped) dot = tanh(dot / softcap) * softcap;
                        weights[s] = dot, top = dot > top ? dot : top;
                    }
                    for (int64_t s = 0; s < S; s++) total += weights[s] = exp(weights[s] - top);
                    for (int64_t i = 0; i < hd; i++) {
                        double want = 0;
                        for (int64_t s = 0; s < S; s++) want += weights[s] / total * vh[s * hd + i];
                        double got = out[(b * h + head) * hd + i], got_bf16 = bf16_to_float(outb[(b * h + head) * hd + i]);
                        expect(fabs(got - want) <= 1e-5, "attention_f32", B, S, hd, got, want);
                        expect(fabs(got_bf16 - want) <= 0.05, "attention_bf16", B, S, hd, got_bf16, want);
                    }
                }
            free(q), free(k), free(v), free(out), free(qb), free(kb), free(vb), free(outb), free(weights);
        }
}

static void check_elementwise(void) {
    const int64_t dims[] = {1, 5, 37, 576};
    for (int d = 0; d < 4; d++) {
        int64_t dim = dims[d];
        float *x = malloc(4 * 3 * dim), *w = malloc(4 * dim), *out = malloc(4 * 3 * dim);
        float *gate_up = malloc(4 * 3 * 2 * dim), *act = malloc(4 * 3 * dim);
        fill(x, 3 * dim, 3), fill(w, dim, 1), fill(gate_up, 3 * 2 * dim, 8);
        gate_up[0] = -100.0f, gate_up[dim > 1 ? 1 : 0] = 100.0f; /* e^100 overflows: silu is -0; and silu(100) = 100 */
        for (int offset = 0; offset < 2; offset++) {
            lg_rms_norm_f32(x, w, out, 3, dim, 1e-6f, (float)offset);
            for (int64_t r = 0; r < 3; r++) {
                double squares = 0;
                for (int64_t i = 0; i < dim; i++) squares += (double)x[r * dim + i] * x[r * dim + i];
                double inverse = 1.0 / sqrt(squares / dim + 1e-6);
                for (int64_t i = 0; i < dim; i++) {
                    double want = x[r * dim + i] * inverse * (w[i] + offset);
                    expect(fabs(out[r * dim + i] - want) <= 2e-6 * fabs(want) + 1e-6, "rms_norm_f32", dim, r, offset,
                           out[r * dim + i], want);
                }
            }
        }
        lg_silu_mul_f32(gate_up, act, 3, dim);
        for (int64_t r = 0; r < 3; r++)
            for (int64_t i = 0; i < dim; i++) {
                double gate = gate_up[r * 2 * dim + i], up = gate_up[r * 2 * dim + dim + i];
                double want = gate / (1 + exp(-gate)) * up;
                expect(fabs(act[r * dim + i] - want) <= 1e-6 * fabs(want) + 1e-7, "silu_mul_f32", dim, r, i,
                       act[r * dim + i], want);
            }
        free(x), free(w), free(out), free(gate_up), free(act);
    }
}

/* The whole layer against the kernels it is made of, called one by one here: the same bits. */
static void check_decoder_block(void) {
    int64_t D = 48, h = 4, g = 2, hd = 12, I = 40, B = 3, positions = 9, width = (h + 2 * g) * hd;
    float *weights = malloc(4 * (2 * D + width * D + D * h * hd + 2 * I * D + D * I));
    float *input_norm = weights, *mlp_norm = input_norm + D, *qkv_w = mlp_norm + D, *o_w = qkv_w + width * D;
    float *gate_up_w = o_w + D * h * hd, *down_w = gate_up_w + 2 * I * D;
    fill(weights, 2 * D + width * D + D * h * hd + 2 * I * D + D * I, 0.3f);
    float cos[12], sin[12];
    for (int i = 0; i < hd; i++) cos[i] = cosf(0.1f * i), sin[i] = (i < hd / 2 ? -1 : 1) * sinf(0.1f * i);
    lg_block spec = {input_norm, qkv_w, NULL, o_w, NULL, mlp_norm, gate_up_w, NULL, down_w, NULL, D, h, g, hd, I,
                     1e-6f, 0.0f, 1.0f / sqrtf((float)hd), 0.0f};
    int64_t cache_len = positions + 1, batch_stride = g * cache_len * hd, head_stride = cache_len * hd;
    float *cache[2][2], *x = malloc(4 * B * D), *out = malloc(4 * B * D), *expected = malloc(4 * B * D);
    for (int run = 0; run < 2; run++)
        for (int kv = 0; kv < 2; kv++) {
            cache[run][kv] = malloc(4 * B * batch_stride);
            fill(cache[run][kv], B * batch_stride, 1); /* earlier positions */
        }
    memcpy(cache[1][0], cache[0][0], 4 * B * batch_stride), memcpy(cache[1][1], cache[0][1], 4 * B * batch_stride);
    fill(x, B * D, 1);
    int status = lg_decoder_block_f32(&spec, x, out, cos, sin, cache[0][0], cache[0][1], batch_stride, head_stride, B,
                                      positions, 0, positions + 1, 1);
    float *normed = malloc(4 * B * D), *qkv = malloc(4 * B * width), *q = malloc(4 * B * h * hd);
    float *attended = malloc(4 * B * h * hd), *gate_up = malloc(4 * B * 2 * I), *act = malloc(4 * B * I);
    lg_rms_norm_f32(x, input_norm, normed, B, D, 1e-6f, 0.0f);
    lg_linear_f32(normed, qkv_w, qkv, B, D, width);
    lg_rope_write_f32(qkv, cos, sin, q, cache[1][0], cache[1][1], B, h, g, hd, batch_stride, head_stride, positions, 1);
    status |= lg_attention_f32(q, cache[1][0], cache[1][1], attended, B, h, g, positions + 1, hd, h * hd, hd,
                               batch_stride, head_stride, spec.scale, 0.0f);
    lg_linear_f32(attended, o_w, expected, B, h * hd, D);
    for (int64_t i = 0; i < B * D; i++) expected[i] += x[i];
    lg_rms_norm_f32(expected, mlp_norm, normed, B, D, 1e-6f, 0.0f);
    lg_linear_f32(normed, gate_up_w, gate_up, B, D, 2 * I);
    lg_silu_mul_f32(gate_up, act, B, I);
    lg_linear_f32(act, down_w, normed, B, I, D);
    for (int64_t i = 0; i < B * D; i++) expected[i] += normed[i];
    expect(status == 0, "decoder_block status", B, D, 0, status, 0);
    for (int64_t i = 0; i < B * D; i++) expect(out[i] == expected[i], "decoder_block bits", i, 0, 0, out[i], expected[i]);
    expect(memcmp(cache[0][0], cache[1][0], 4 * B * batch_stride) == 0, "decoder_block keys", 0, 0, 0, 0, 0);
    expect(memcmp(cache[0][1], cache[1][1], 4 * B * batch_stride) == 0, "decoder_block values", 0, 0, 0, 0, 0);
}

/* bitsandbytes' 8-bit and 4-bit weights: products against double-precision sums of the dequantized weight, and
 * the dequantization itself value for value (K 64 and 576 end in a 64-value tail on AVX-512, 128 and 256 are whole
 * groups on every instruction set; 8-bit also takes any K). */
#if defined(__AVX512BF16__) || VL != 16
#define BF16_X_CODE_IN_BF16 1 /* bfloat16 x's 4-bit products look the code up rounded to bfloat16 */
#else
#define BF16_X_CODE_IN_BF16 0
#endif
static void check_quantized(void) {
    const int64_t Ms[] = {1, 2, 3, 4, 5}, Ks[] = {64, 128, 256, 576, 37}, Ns[] = {1, 5, 33};
    float code[16];
    for (int i = 0; i < 16; i++) code[i] = uniform(); /* any 16 values: nf4's and fp4's are two such maps */
    for (int a = 0; a < 5; a++)
        for (int b = 0; b < 5; b++)
            for (int c = 0; c < 3; c++) {
                int64_t M = Ms[a], K = Ks[b], N = Ns[c], four_bit = K % 64 == 0;
                int8_t *w8 = malloc(N * K);
                uint8_t *w4 = malloc(N * K / 2 + 1);
                float *scb = malloc(4 * N), *absmax = malloc(4 * (N * K / 64 + 1)), *x = malloc(4 * M * K);
                float *y8 = malloc(4 * M * N), *y4 = malloc(4 * M * N), *dq8 = malloc(4 * N * K),
                      *dq4 = malloc(4 * N * K);
                uint16_t *xb = malloc(2 * M * K), *yb8 = malloc(2 * M * N), *yb4 = malloc(2 * M * N);
                for (int64_t i = 0; i < N * K; i++) w8[i] = (int8_t)(uniform() * 127);
                for (int64_t i = 0; i < N * K / 2; i++) w4[i] = (uint8_t)((uniform() + 1) * 127.99);
                for (int64_t n = 0; n < N; n++) scb[n] = 0.5f + uniform();
                for (int64_t i = 0; i < N * K / 64; i++) absmax[i] = 0.5f + uniform();
                fill(x, M * K, 1), to_bf16(x, xb, M * K);
                expect(lg_linear_q8_f32(x, w8, scb, NULL, y8, M, K, N) == 0, "linear_q8_f32 status", M, K, N, 0, 0);
                lg_linear_q8_bf16(xb, w8, scb, NULL, yb8, M, K, N);
                lg_dequantize_q8_f32(w8, scb, dq8, N, K);
                if (four_bit) {
                    lg_linear_q4_f32(x, w4, absmax, code, y4, M, K, N);
                    lg_linear_q4_bf16(xb, w4, absmax, code, yb4, M, K, N);
                    lg_dequantize_q4_f32(w4, absmax, code, dq4, N * K);
                }
                for (int64_t i = 0; i < N * K; i++) {
                    float want8 = (float)w8[i] * scb[i / K] * 7.874015718698502e-3f;
                    expect(dq8[i] == want8, "dequantize_q8", N, K, i, dq8[i], want8);
                    if (four_bit) {
                        uint8_t byte = w4[i / 2];
                        float want4 = code[i % 2 ? byte & 15 : byte >> 4] * absmax[i / 64];
                        expect(dq4[i] == want4, "dequantize_q4", N, K, i, dq4[i], want4);
                    }
                }
                for (int64_t m = 0; m < M; m++)
                    for (int64_t n = 0; n < N; n++) {
                        double exact8 = 0, size8 = 0, exact4 = 0, size4 = 0, exact8b = 0, exact4b = 0, coded4b = 0;
                        for (int64_t k = 0; k < K; k++) {
                            double xv = x[m * K + k], xbv = bf16_to_float(xb[m * K + k]);
                            exact8 += xv * dq8[n * K + k], size8 += fabs(xv * dq8[n * K + k]);
                            exact8b += xbv * dq8[n * K + k];
                            if (four_bit) {
                                exact4 += xv * dq4[n * K + k], size4 += fabs(xv * dq4[n * K + k]);
                                exact4b += xbv * dq4[n * K + k];
                                uint8_t byte = w4[(n * K + k) / 2]; /* the weight as bfloat16 x's kernels take it */
                                float value = code[k % 2 ? byte & 15 : byte >> 4];
                                if (BF16_X_CODE_IN_BF16) value = bf16_to_float(round_to_bf16_scalar(value));
                                coded4b += xbv * value * absmax[(n * K + k) / 64];
                            }
                        }
                        expect(fabs(y8[m * N + n] - exact8) <= 1e-6 * size8 + 1e-6, "linear_q8_f32", M, K, N,
                               y8[m * N + n], exact8);
                        double got8b = bf16_to_float(yb8[m * N + n]);
                        expect(fabs(got8b - exact8b) <= 0.0079 * fabs(exact8b) + 1e-6 * size8 + 1e-6,
                               "linear_q8_bf16", M, K, N, got8b, exact8b);
                        if (!four_bit) continue;
                        expect(fabs(y4[m * N + n] - exact4) <= 1e-6 * size4 + 1e-6, "linear_q4_f32", M, K, N,
                               y4[m * N + n], exact4);
                        double got4b = bf16_to_float(yb4[m * N + n]);
                        expect(fabs(got4b - exact4b) <= 0.0079 * fabs(exact4b) + 0.004 * size4 + 1e-6,
                               "linear_q4_bf16", M, K, N, got4b, exact4b);
                        /* and exactly its own weights': float32 sums, one bfloat16 rounding of the result */
                        expect(fabs(got4b - coded4b) <= 0.0040 * fabs(coded4b) + 1e-6 * size4 + 1e-6,
                               "linear_q4_bf16 (its code)", M, K, N, got4b, coded4b);
                    }
                free(w8), free(w4), free(scb), free(absmax), free(x), free(y8), free(y4), free(dq8), free(dq4);
                free(xb), free(yb8), free(yb4);
            }
}

/* 4-bit with int8 activations: x rounded per 64-value block as the kernel defines it (scale max |x| / 127, values
 * to nearest even, code to round(127 code)), then exact integer sums per block in double. Blocks that are all zero,
 * a value at exactly half a step and bfloat16 x are among the cases. */
static void check_quantized_int8_activations(void) {
    const int64_t Ms[] = {1, 3, 4, 6}, Ks[] = {64, 128, 576, 1536}, Ns[] = {1, 7, 33};
    float code[16];
    for (int i = 0; i < 16; i++) code[i] = uniform();
    code[3] = 1.0f, code[7] = 0.0f, code[12] = -1.0f; /* nf4's ends and its zero */
    for (int a = 0; a < 4; a++)
        for (int b = 0; b < 4; b++)
            for (int c = 0; c < 3; c++) {
                int64_t M = Ms[a], K = Ks[b], N = Ns[c];
                uint8_t *w4 = malloc(N * K / 2);
                float *absmax = malloc(4 * (N * K / 64)), *x = malloc(4 * M * K), *y = malloc(4 * M * N);
                uint16_t *xb = malloc(2 * M * K), *yb = malloc(2 * M * N);
                for (int64_t i = 0; i < N * K / 2; i++) w4[i] = (uint8_t)((uniform() + 1) * 127.99);
                for (int64_t i = 0; i < N * K / 64; i++) absmax[i] = 0.5f + uniform();
                fill(x, M * K, 3);
                for (int64_t k = 0; k < 64; k++) x[k] = 0; /* row 0's first block: scale 0 */
                if (K >= 128) x[64] = 1.27f, x[65] = 0.005f; /* 0.005 · 127 / 1.27 = 0.5: rounds to 0 (even) */
                to_bf16(x, xb, M * K);
                expect(lg_linear_q4i8_f32(x, w4, absmax, code, y, M, K, N) == 0, "linear_q4i8 status", M, K, N, 0, 0);
                lg_linear_q4i8_bf16(xb, w4, absmax, code, yb, M, K, N);
                for (int pass = 0; pass < 2; pass++)
                    for (int64_t m = 0; m < M; m++)
                        for (int64_t n = 0; n < N; n++) {
                            double exact = 0, size = 0;
                            for (int64_t block = 0; block < K / 64; block++) {
                                float values[64], largest = 0;
                                for (int i = 0; i < 64; i++) {
                                    int64_t at = m * K + block * 64 + i;
                                    values[i] = pass ? bf16_to_float(xb[at]) : x[at];
                                    largest = fmaxf(largest, fabsf(values[i]));
                                }
                                float inverse = largest > 0 ? 127.0f / largest : 0.0f;
                                int64_t dot = 0;
                                for (int i = 0; i < 64; i++) {
                                    int64_t k = block * 64 + i;
                                    uint8_t byte = w4[(n * K + k) / 2];
                                    long q = lrintf(values[i] * inverse);
                                    long wq = lrintf(code[k % 2 ? byte & 15 : byte >> 4] * 127.0f);
                                    dot += q * wq;
                                }
                                double term = (double)absmax[n * K / 64 + block] * (largest / 127.0f) * dot / 127.0;
                                exact += term, size += fabs(term);
                            }
                            double got = pass ? bf16_to_float(yb[m * N + n]) : y[m * N + n];
                            double slack = pass ? 0.0079 * fabs(exact) : 0;
                            expect(fabs(got - exact) <= slack + 1e-6 * size + 1e-6,
                                   pass ? "linear_q4i8_bf16" : "linear_q4i8_f32", M, K, N, got, exact);
                        }
                free(w4), free(absmax), free(x), free(y), free(xb), free(yb);
            }
}

int main(void) {
    check_linear();
    check_attention();
    check_elementwise();
    check_decoder_block();
    check_quantized();
    check_quantized_int8_activations();
    printf("native_check %s: %d of %d checks passed\n", lg_isa(), checks - failures, checks);
    return failures != 0;
}
