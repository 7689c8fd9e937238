/* The float32 vectors block_gemv.c and decode_step.c compute with: GCC/clang vector extensions,
 * one register wide, with intrinsics where the generic form compiles badly. Built with -march=native
 * (cpu_kernel.py), so the same source is AVX-512, AVX2 or plain C on the machine that runs it. */
#ifndef GF_SIMD_H
#define GF_SIMD_H
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* One register of float32: 16 lanes with AVX-512, else 8 (GCC spills 64-byte vectors to the stack
 * when it has to split them into AVX2 halves: measured 2.5x slower). */
#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef float vh __attribute__((vector_size(32)));   /* 8 float32 */
typedef float vq __attribute__((vector_size(16)));   /* 4 float32 */

static inline vf load_floats(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v); /* an unaligned vector load */
    return v;
}

/* a * b + c in one fused multiply-add. Spelled out: -std=c11 turns off GCC's contraction of
 * a * b + c, and the separate multiplies and adds made the GEMV compute-bound (the embedded model's
 * weights, AMD EPYC, 2 threads, 4 rows: head 15.6 -> 13.2 ms, gate/up 0.260 -> 0.204 ms;
 * bench/kernel_ab.py, docs/quantization.md "Fused multiply-adds"). Fused, each product is added
 * without a rounding of its own: still float32's product up to summation order. */
static inline vf madd(vf a, vf b, vf c) {
#if defined(__AVX512F__)
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
    return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

/* v in every lane (not 0 + v, which turns -0.0 into +0.0 and so the sign of a zero weight; and not
 * a loop over the lanes, which GCC 12 compiles into 16 stores to the stack) */
static inline vf splat(float v) {
#if defined(__AVX512F__)
    return (vf)_mm512_set1_ps(v);
#elif defined(__AVX2__)
    return (vf)_mm256_set1_ps(v);
#else
    vf r;
    for (int i = 0; i < LANES; i++) r[i] = v;
    return r;
#endif
}

/* Sum of the lanes, by halves (not LANES - 1 dependent adds). Takes the vector by value and never
 * its address, so that accumulators stay in registers (a spilled one cost 2x: store-to-load latency). */
static inline float hsum(vf v) {
#if LANES == 16
    vh h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    vh h = v;
#endif
    vq q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* sum_i a[i] * b[i] over n floats: two vector accumulators, then the lanes (float32, in another
 * order than a left-to-right sum). */
static inline float dot(const float *a, const float *b, int64_t n) {
    vf s0 = {0}, s1 = {0};
    int64_t i = 0;
    for (; i + 2 * LANES <= n; i += 2 * LANES) {
        s0 = madd(load_floats(a + i), load_floats(b + i), s0);
        s1 = madd(load_floats(a + i + LANES), load_floats(b + i + LANES), s1);
    }
    for (; i + LANES <= n; i += LANES) s0 = madd(load_floats(a + i), load_floats(b + i), s0);
    float r = hsum(s0 + s1);
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

/* y[i] += p * x[i] over n floats */
static inline void axpy(float p, const float *x, float *y, int64_t n) {
    vf pv = splat(p);
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        vf v = madd(pv, load_floats(x + i), load_floats(y + i));
        memcpy(y + i, &v, sizeof v);
    }
    for (; i < n; i++) y[i] += p * x[i];
}

/* Lane-wise max and min (vector conditionals are C++-only in GCC) */
static inline vf vmax(vf a, vf b) {
#if defined(__AVX512F__)
    return (vf)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX2__)
    return (vf)_mm256_max_ps((__m256)a, (__m256)b);
#else
    for (int i = 0; i < LANES; i++) a[i] = a[i] > b[i] ? a[i] : b[i];
    return a;
#endif
}

static inline vf vmin(vf a, vf b) {
#if defined(__AVX512F__)
    return (vf)_mm512_min_ps((__m512)a, (__m512)b);
#elif defined(__AVX2__)
    return (vf)_mm256_min_ps((__m256)a, (__m256)b);
#else
    for (int i = 0; i < LANES; i++) a[i] = a[i] < b[i] ? a[i] : b[i];
    return a;
#endif
}

typedef int32_t vi __attribute__((vector_size(4 * LANES)));

/* An IEEE float16 as float32: exact, as every half is a float (the block scales of the legacy ggml
 * types are float16 in the file and kept so: gguf_quant.unpack). */
static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, bits;
    if (e == 0x1f) {
        bits = sign | 0x7f800000u | (m << 13); /* inf, nan */
    } else if (e) {
        bits = sign | ((e + 112) << 23) | (m << 13);
    } else if (!m) {
        bits = sign;
    } else { /* subnormal m * 2^-24: shift the leading one up to bit 10 */
        e = 113;
        while (!(m & 0x400)) m <<= 1, e--;
        bits = sign | (e << 23) | ((m & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

/* e^x lane-wise, Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, e^r from a degree-7 polynomial,
 * times 2^n built in the exponent bits. Relative error ~1 ulp of float32 (tests/test_decode_step.py
 * checks the GELU built on it against float64, clamped tails included). x is clamped to [-87, 88], so 2^n stays a normal
 * float: e^-inf gives ~1.6e-38, not 0, and callers that need exact zeros mask them. The libm expf
 * per element cost ~15 ns (a 2048-wide GELU per layer: 0.6 ms of a 12 ms token). */
static inline vf vexp(vf x) {
    x = vmin(vmax(x, splat(-87.0f)), splat(88.0f));
    vf n = madd(x, splat(1.44269504088896341f), splat(12582912.0f)) - splat(12582912.0f); /* round(x log2 e) */
    vf r = madd(n, splat(-0.693359375f), x); /* ln 2 in two parts, so n ln 2 is exact enough */
    r = madd(n, splat(2.12194440e-4f), r);
    vf p = splat(1.9875691500e-4f);
    p = madd(p, r, splat(1.3981999507e-3f));
    p = madd(p, r, splat(8.3334519073e-3f));
    p = madd(p, r, splat(4.1665795894e-2f));
    p = madd(p, r, splat(1.6666665459e-1f));
    p = madd(p, r, splat(5.0000001201e-1f));
    p = madd(p, r * r, r + splat(1.0f));
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23; /* 2^n */
    return p * (vf)bits;
}

/* n float16 -> float32, 16 or 8 at a time where the CPU converts vectors (one weight row's block
 * scales: converting each where it is used cost ~3 more instructions per group of 32 weights, which
 * the compute-bound layer GEMVs felt) */
static inline void halves_to_floats(const uint16_t *h, float *out, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + i))));
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    if (i < n) { /* the last 1-15 in one masked step (20 scales a row of 640 weights: 16 + 4) */
        __mmask16 rest = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(out + i, rest, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(rest, h + i)));
        return;
    }
#endif
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < n; i++) out[i] = half_to_float(h[i]);
}
#endif
