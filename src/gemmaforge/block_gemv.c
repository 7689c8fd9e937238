/* y = x @ w^T for a block-quantized weight, w[n, k] = scale[n, k / gs] * codes[n, k] (+ offset[n, k / gs]).
 *
 * The decode-time matmul of gguf_quant.BlockQuantLinear (docs/quantization.md, "Matmul"): x has a few
 * rows (one per decoding sequence), the weight is read once per call and never written out as floats.
 * Per group of gs weights (16 or 32) and row of x:
 *
 *     y += scale[g] * sum_j codes[j] * x[j]      then once per row:  y += sum_g offset[g] * sum_j x[j]
 *
 * which is the float32 product with the dequantized weight, summed in another order (the only
 * difference from F.linear over gguf_quant.dequantize_codes; tests/test_gguf_native.py bounds it).
 * Activations stay float32: weight-only, unlike llama.cpp, which rounds x to 8 bits.
 *
 * Portable C with GCC/clang vector extensions, built on the user's machine with -march=native
 * (cpu_kernel.py), so the 16-lane vectors become one AVX-512 or two AVX2 registers. OpenMP: the
 * process's own libgomp (torch's), so its threads are shared with torch's, not added to them. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define MAX_TILE 4 /* rows of x per pass over a weight row: each code is converted once per tile */
/* Bytes of codes ahead to prefetch: the hardware prefetcher alone left the 2-thread GEMV at half the
 * memory bandwidth an sgemv reaches (Q8_0 head: 13.7 ms -> 8.7 ms; 1-8 KB ahead measured, 4 KB kept). */
#define PREFETCH 4096

/* LANES int8 codes -> LANES float32. Intrinsics where the CPU has them: GCC 12 compiles the generic
 * __builtin_convertvector form into per-byte scalar sign extensions (measured 4x slower). */
static inline vf load_codes(const int8_t *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    vf out;
    for (int i = 0; i < LANES; i++) out[i] = (float)p[i];
    return out;
#endif
}

/* One group of gs codes times the matching gs values of x. */
static inline __attribute__((always_inline)) vf group_dot(const int8_t *c, const float *x, const int gs) {
    vf part = load_codes(c) * load_floats(x);
#pragma GCC unroll 4
    for (int j = LANES; j < gs; j += LANES) part = madd(load_codes(c + j), load_floats(x + j), part);
    return part;
}

static inline __attribute__((always_inline)) float offsets(const float *o, const float *xsum, int64_t G) {
    float r = 0;
    for (int64_t g = 0; g < G; g++) r += o[g] * xsum[g];
    return r;
}

/* One weight row against one row of x: two accumulators, so that consecutive groups' fused
 * multiply-adds do not wait on each other. */
static inline __attribute__((always_inline)) void row_1(
    const float *x, int64_t K, const int8_t *c, const float *s, const float *o, const float *xsum,
    int64_t G, const int gs, float *y, int64_t N) {
    (void)K, (void)N;
    vf a0 = {0}, a1 = {0};
    int64_t g = 0;
    for (; g + 1 < G; g += 2) {
        __builtin_prefetch(c + g * gs + PREFETCH);
        a0 = madd(splat(s[g]), group_dot(c + g * gs, x + g * gs, gs), a0);
        a1 = madd(splat(s[g + 1]), group_dot(c + (g + 1) * gs, x + (g + 1) * gs, gs), a1);
    }
    if (g < G) a0 = madd(splat(s[g]), group_dot(c + g * gs, x + g * gs, gs), a0);
    float r = hsum(a0 + a1);
    if (o) r += offsets(o, xsum, G);
    y[0] = r;
}

/* One weight row against ``tile`` consecutive rows of x, each code converted once for all of them.
 * ``tile`` and ``gs`` are constants at each call site (always_inline): the loops unroll and the
 * accumulators stay in registers. */
static inline __attribute__((always_inline)) void row_tile(
    const float *x, int64_t K, const int8_t *c, const float *s, const float *o, const float *xsum,
    int64_t G, const int gs, const int tile, float *y, int64_t N) {
    if (tile == 1) {
        row_1(x, K, c, s, o, xsum, G, gs, y, N);
        return;
    }
    vf acc[MAX_TILE] = {0};
    for (int64_t g = 0; g < G; g++) {
        const int8_t *cg = c + g * gs;
        const float *xg = x + g * gs;
        __builtin_prefetch(cg + PREFETCH);
        vf part[MAX_TILE];
#pragma GCC unroll 4
        for (int i = 0; i < tile; i++) part[i] = (vf){0};
#pragma GCC unroll 4
        for (int j = 0; j < gs; j += LANES) {
            vf w = load_codes(cg + j);
#pragma GCC unroll 4
            for (int i = 0; i < tile; i++) part[i] = madd(w, load_floats(xg + i * K + j), part[i]);
        }
#pragma GCC unroll 4
        for (int i = 0; i < tile; i++) acc[i] = madd(splat(s[g]), part[i], acc[i]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < tile; i++) {
        float r = hsum(acc[i]);
        if (o) r += offsets(o, xsum + i * G, G);
        y[i * N] = r;
    }
}

#define TILES(gs)                                                                                   \
    switch (M - m >= MAX_TILE ? MAX_TILE : M - m) {                                                 \
    case 4: row_tile(xm, K, c, s, o, xs, G, gs, 4, ym, N); m += 4; break;                          \
    case 3: row_tile(xm, K, c, s, o, xs, G, gs, 3, ym, N); m += 3; break;                          \
    case 2: row_tile(xm, K, c, s, o, xs, G, gs, 2, ym, N); m += 2; break;                          \
    default: row_tile(xm, K, c, s, o, xs, G, gs, 1, ym, N); m += 1; break;                         \
    }

/* amx_gemm.c, linked into the same library: the same product on AMX tiles, where the CPU has them */
extern int gf_amx_enabled;
int gf_amx_takes(int64_t N, int64_t K, int64_t gs);
int gf_amx_gemm(const float *x, int64_t M, int64_t K, const int8_t *codes, const float *scale,
                const float *offset, int64_t N, int64_t gs, float *y, int threads);
#define AMX_MIN_ROWS 6

/* Row n's block scales (or offsets) as float32: ``p`` itself, or its float16 ones converted into ``buf``. */
static inline const float *row_scales(const void *p, int64_t n, int64_t G, int half, float *buf) {
    if (!half) return (const float *)p + n * G;
    halves_to_floats((const uint16_t *)p + n * G, buf, G);
    return buf;
}

/* x [M, K], codes [N, K], scale/offset [N, K/gs] (offset may be NULL), y [M, N]; K % gs == 0,
 * gs a multiple of 16. Scale and offset are float16 if ``half`` (the legacy types: gguf_quant.unpack),
 * else float32; the AMX kernel reads float32 only. Returns 0, or -1 if the offset sums could not be
 * allocated. */
int gf_block_gemv(const float *x, int64_t M, int64_t K, const int8_t *codes, const void *scale,
                  const void *offset, int64_t N, int64_t gs, int half, float *y, int threads) {
    if (!half && gf_amx_enabled && M >= AMX_MIN_ROWS && gf_amx_takes(N, K, gs))
        return gf_amx_gemm(x, M, K, codes, scale, offset, N, gs, y, threads);
    int64_t G = K / gs;
    float *xsum = NULL;
    if (offset) {
        xsum = malloc(sizeof(float) * (size_t)(M * G));
        if (!xsum) return -1;
        for (int64_t i = 0; i < M * G; i++) {
            float t = 0;
            for (int64_t j = 0; j < gs; j++) t += x[i * gs + j];
            xsum[i] = t;
        }
    }
#pragma omp parallel num_threads(threads)
    {
        float buf[half ? 2 * G : 1]; /* one row's scales and offsets as float32 (2 * 2304 for 27B's widest) */
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const int8_t *c = codes + n * K;
            const float *s = row_scales(scale, n, G, half, buf);
            const float *o = offset ? row_scales(offset, n, G, half, buf + G) : NULL;
            for (int64_t m = 0; m < M;) {
                const float *xm = x + m * K, *xs = xsum ? xsum + m * G : NULL;
                float *ym = y + m * N + n;
                if (gs == 32) {
                    TILES(32)
                } else {
                    TILES(16)
                }
            }
        }
    }
    free(xsum);
    return 0;
}

/* codes [rows, K] -> out [rows, K] float32: code * scale, then + offset, the file's own values
 * (gguf_quant.dequantize_codes, bit for bit). The prefill path's dequantization into a buffer, one
 * pass instead of three torch ops. The product is stored before the offset is added, in a second
 * loop, so that no compiler fuses the two roundings into one fused multiply-add (which would give
 * other values); tests/test_gguf_native.py compares the bits. Returns 0. */
int gf_dequantize(const int8_t *codes, const void *scale, const void *offset, int64_t rows, int64_t K,
                  int64_t gs, int half, float *out, int threads) {
    int64_t G = K / gs;
#pragma omp parallel num_threads(threads)
    {
        float buf[half ? 2 * G : 1];
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const int8_t *c = codes + r * K;
            const float *s = row_scales(scale, r, G, half, buf);
            float *o = out + r * K;
            for (int64_t g = 0; g < G; g++) {
                vf sg = splat(s[g]);
                for (int64_t j = g * gs; j < (g + 1) * gs; j += LANES) {
                    vf w = load_codes(c + j) * sg;
                    memcpy(o + j, &w, sizeof w);
                }
            }
            if (offset) {
                const float *b = row_scales(offset, r, G, half, buf + G);
                for (int64_t g = 0; g < G; g++) {
                    vf bg = splat(b[g]);
                    for (int64_t j = g * gs; j < (g + 1) * gs; j += LANES) {
                        vf w = load_floats(o + j) + bg;
                        memcpy(o + j, &w, sizeof w);
                    }
                }
            }
        }
    }
    return 0;
}
