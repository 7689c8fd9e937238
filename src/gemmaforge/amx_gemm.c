/* y = x @ w^T for a block-quantized weight on Intel AMX tiles, exact in float32.
 *
 * The same product as block_gemv.c (docs/quantization.md, "Matmul"), with the per-group dot products
 * done by AMX's bf16 tile multiply (TDPBF16PS) instead of AVX-512 float32 multiply-adds:
 *
 *     y[m, n] = sum_g scale[n, g] * (sum_{k in g} codes[n, k] * x[m, k])  +  sum_g offset[n, g] * xsum[m, g]
 *
 * Why it stays exact although the tiles multiply bf16 (8-bit significands):
 *   - every code is a small integer (|code| <= 128), so its bf16 is exact;
 *   - x is split into three bf16 parts, x = hi + mid + lo, exactly (3 x 8 bits = float32's 24);
 *   - a product of two bf16 has at most 16 significant bits, so it is exact in float32, and the tile
 *     adds the products in float32. So each group's dot product is the float32 one, summed in another
 *     order (three times as many terms), and then scaled like block_gemv.c does.
 * What differs from float32: the order of the sums, and AMX's flush of denormals (|x| < 1.2e-38) to zero.
 * tests/test_amx.py compares both kernels against a float64 reference.
 *
 * One AMX tile multiply covers 16 weight rows x 16 columns of x x one group of 32 (or 16) codes, and
 * the float32 result is scaled and summed in AVX-512 registers. On 2 Sapphire Rapids cores, 128 rows
 * run 1.4-2.2x faster than the dequantize-then-sgemm path, 8-16 rows 1.2-3.4x faster than the AVX-512
 * kernel (docs/quantization.md, "On AMX tiles, still exact").
 *
 * Built only where the compiler targets AMX (-march=native on a CPU with amx_tile and amx_bf16);
 * elsewhere gf_amx_init returns -1 and block_gemv.c's kernel is the only one. Linux hands out AMX
 * state only after the process asks for it (arch_prctl ARCH_REQ_XCOMP_PERM), which gf_amx_init does. */
#define _GNU_SOURCE /* syscall() under -std=c11 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define GF_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

int gf_amx_enabled = 0; /* read by gf_block_gemv (block_gemv.c) to pick this kernel */

/* enable != 0: ask Linux for the AMX state and turn the kernel on. Returns 1 (on), 0 (off, as asked)
 * or -1 (no AMX here: not compiled for it, or refused by the kernel). */
int gf_amx_init(int enable) {
#ifdef GF_AMX
    if (!enable) {
        gf_amx_enabled = 0;
        return 0;
    }
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */)) return -1;
    gf_amx_enabled = 1;
    return 1;
#else
    (void)enable;
    return -1;
#endif
}

/* Whether the kernel takes an [N, K] weight in groups of gs, for any number of rows of x: the one
 * copy of this rule (gf_block_gemv asks it per call, gguf_quant.BlockQuantLinear once per weight). */
int gf_amx_takes(int64_t N, int64_t K, int64_t gs) {
    return N % 16 == 0 && K % 32 == 0 && (gs == 16 || gs == 32);
}

#ifdef GF_AMX
typedef struct __attribute__((packed)) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Tile registers (literals: the intrinsics paste them into register names). The x side is in AMX's
 * "VNNI" layout, [K/2][16 columns][2] bf16 for each tile of x, so that group g's tile starts at
 * element g * gs * 16 with a row stride of 64 bytes. Its 16 columns are either 16 rows of x, one
 * part each in its own array ("wide", many rows), or up to 5 rows of x with their three parts side by
 * side, column 5 p + j for part p of row j ("stacked", a few rows: one tile multiply instead of three). */
#define T_ACC 0 /* 16 weight rows x 16 float32 columns */
#define T_W 1   /* 16 weight rows x gs bf16 codes */
#define T_X0 2  /* gs/2 pairs x 16 columns x 2 */
#define T_X1 3
#define T_X2 4
#define T_ACC1 5 /* the second stacked tile's result */
#define STACK 5   /* rows of x in a stacked tile: 3 parts x 5 = 15 of its 16 columns */

static void configure(int gs) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    c.rows[T_ACC] = c.rows[T_ACC1] = 16, c.colsb[T_ACC] = c.colsb[T_ACC1] = 64;
    c.rows[T_W] = 16, c.colsb[T_W] = 2 * gs;
    for (int t = T_X0; t <= T_X2; t++) c.rows[t] = gs / 2, c.colsb[t] = 64;
    _tile_loadconfig(&c);
}

static inline __m512 bf16_to_f32(__m256bh h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
}

/* Row ``m`` of x [M, K] -> its three bf16 parts, part p into the dwords (bf16 pairs) at[p] + 16 i for
 * pair i, and its group sums into xsum[16 g] (NULL: none wanted). */
static void split_row(const float *x, int64_t m, int64_t K, int64_t gs, int32_t *const at[3], float *xsum) {
    const __m256i stride = _mm256_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112); /* one dword per pair row */
    for (int64_t k = 0; k < K; k += 16) {
        __m512 v = _mm512_loadu_ps(x + m * K + k);
        __m256bh hi = _mm512_cvtneps_pbh(v);
        __m512 rest = _mm512_sub_ps(v, bf16_to_f32(hi)); /* exact: v and hi agree in their top bits */
        __m256bh mid = _mm512_cvtneps_pbh(rest);
        __m256bh lo = _mm512_cvtneps_pbh(_mm512_sub_ps(rest, bf16_to_f32(mid)));
        _mm256_i32scatter_epi32(at[0] + k * 8, stride, (__m256i)hi, 4);
        _mm256_i32scatter_epi32(at[1] + k * 8, stride, (__m256i)mid, 4);
        _mm256_i32scatter_epi32(at[2] + k * 8, stride, (__m256i)lo, 4);
        if (xsum) xsum[16 * (k / gs)] += _mm512_reduce_add_ps(v);
    }
}

/* Codes rows [n0, n0 + 16) of [N, K] -> bf16 [16, K] (exact: small integers). The codes stream
 * from memory: prefetched 2 KB ahead, as the hardware prefetcher alone left one core at ~8 GB/s
 * (1-8 KB measured, output head at 4 rows: 61 -> 37 ns a block of 512 codes). */
static void codes_to_bf16(const int8_t *codes, int64_t n0, int64_t K, uint16_t *out) {
    for (int64_t r = 0; r < 16; r++) {
        const int8_t *c = codes + (n0 + r) * K;
        for (int64_t k = 0; k < K; k += 64) __builtin_prefetch(c + 2048 + k);
        for (int64_t k = 0; k < K; k += 32) {
            __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + k))));
            __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + k + 16))));
            _mm512_storeu_si512(out + r * K + k, (__m512i)_mm512_cvtne2ps_pbh(b, a));
        }
    }
}

/* The next 16 weight rows' codes (16 K contiguous bytes) are fetched while this tile multiplies,
 * 16 gs bytes per group: else the codes stream from memory only while they are converted, and
 * the memory waits during the tile work (output head, 4 rows, 2 threads: 13.7 -> 11.3 ms). */
static inline void prefetch_share(const int8_t *next, int64_t g, int64_t gs) {
    for (int64_t b = 0; b < 16 * gs; b += 64) __builtin_prefetch(next + 16 * gs * g + b);
}

/* acc[r] += scale[r, g] * tile[r] (+ offset[r, g] * xs), for the 16 weight rows r of one result tile. */
static inline __attribute__((always_inline)) void scale_add(__m512 *acc, const float *tile, const float *s,
                                                            const float *o, __m512 xs, int64_t G) {
    for (int r = 0; r < 16; r++) {
        __m512 a = _mm512_fmadd_ps(_mm512_set1_ps(s[r * G]), _mm512_load_ps(tile + 16 * r), acc[r]);
        acc[r] = o ? _mm512_fmadd_ps(_mm512_set1_ps(o[r * G]), xs, a) : a;
    }
}

/* Wide: weight rows [n0, n0 + 16) against the 16 x rows of tile mt; acc[r] lane j = y[16 mt + j, n0 + r]. */
static void wide_block(const uint16_t *w, const uint16_t *const parts[3], const float *scale, const float *offset,
                       const float *xsum, int64_t n0, int64_t mt, int64_t K, int64_t gs, const int8_t *next,
                       __m512 *acc) {
    int64_t G = K / gs;
    float tile[256] __attribute__((aligned(64)));
    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
    const uint16_t *xh = parts[0] + mt * 16 * K, *xm = parts[1] + mt * 16 * K, *xl = parts[2] + mt * 16 * K;
    const float *s = scale + n0 * G, *o = offset ? offset + n0 * G : NULL;
    for (int64_t g = 0; g < G; g++) {
        if (next) prefetch_share(next, g, gs);
        _tile_zero(T_ACC);
        _tile_loadd(T_W, w + g * gs, 2 * K);
        _tile_loadd(T_X0, xh + g * gs * 16, 64);
        _tile_loadd(T_X1, xm + g * gs * 16, 64);
        _tile_loadd(T_X2, xl + g * gs * 16, 64);
        _tile_dpbf16ps(T_ACC, T_W, T_X0);
        _tile_dpbf16ps(T_ACC, T_W, T_X1);
        _tile_dpbf16ps(T_ACC, T_W, T_X2);
        _tile_stored(T_ACC, tile, 64);
        scale_add(acc, tile, s + g, o ? o + g : NULL, o ? _mm512_loadu_ps(xsum + (mt * G + g) * 16) : acc[0], G);
    }
}

/* Stacked: weight rows [n0, n0 + 16) against ``nx`` (1 or 2, a constant at each call) stacked tiles;
 * acc[16 t + r] lane 5 p + j = part p's share of y[5 t + j, n0 + r]. (Two groups in flight on two
 * sets of tile registers measured no faster: the codes' conversion is the bottleneck here.) */
static inline __attribute__((always_inline)) void stacked_block(
    const uint16_t *w, const uint16_t *xs, const float *scale, const float *offset, const float *xsum,
    int64_t n0, int64_t K, int64_t gs, const int nx, const int8_t *next, __m512 *acc) {
    int64_t G = K / gs;
    float tile[2][256] __attribute__((aligned(64)));
    for (int r = 0; r < 16 * nx; r++) acc[r] = _mm512_setzero_ps();
    const float *s = scale + n0 * G, *o = offset ? offset + n0 * G : NULL;
    for (int64_t g = 0; g < G; g++) {
        if (next) prefetch_share(next, g, gs);
        _tile_loadd(T_W, w + g * gs, 2 * K);
        _tile_zero(T_ACC);
        _tile_loadd(T_X0, xs + g * gs * 16, 64);
        _tile_dpbf16ps(T_ACC, T_W, T_X0);
        if (nx == 2) {
            _tile_zero(T_ACC1);
            _tile_loadd(T_X1, xs + 16 * K + g * gs * 16, 64);
            _tile_dpbf16ps(T_ACC1, T_W, T_X1);
        }
        _tile_stored(T_ACC, tile[0], 64);
        if (nx == 2) _tile_stored(T_ACC1, tile[1], 64);
        for (int t = 0; t < nx; t++)
            scale_add(acc + 16 * t, tile[t], s + g, o ? o + g : NULL,
                      o ? _mm512_loadu_ps(xsum + (t * G + g) * 16) : acc[0], G);
    }
}

/* x [M, K], codes [N, K], scale/offset [N, K/gs] (offset may be NULL), y [M, N], for a weight
 * gf_amx_takes (gf_block_gemv checks). Returns 0, or -1 if out of memory. */
int gf_amx_gemm(const float *x, int64_t M, int64_t K, const int8_t *codes, const float *scale,
                const float *offset, int64_t N, int64_t gs, float *y, int threads) {
    int64_t G = K / gs;
    int stacked = M <= 2 * STACK;
    int64_t tiles = stacked ? (M + STACK - 1) / STACK : (M + 15) / 16; /* tiles of x */
    size_t tile_len = (size_t)(16 * K);                                  /* bf16 in one tile of x */
    size_t len = (stacked ? 1 : 3) * (size_t)tiles * tile_len;
    uint16_t *xv = aligned_alloc(64, (len * sizeof(uint16_t) + 63) / 64 * 64);
    float *xsum = offset ? calloc((size_t)(tiles * G * 16), sizeof(float)) : NULL;
    if (!xv || (offset && !xsum)) {
        free(xv), free(xsum);
        return -1;
    }
    const uint16_t *parts[3] = {xv, xv + len / 3, xv + 2 * (len / 3)};
    /* zero the columns no row fills: a stacked buffer's spare ones, a wide one's last partial tile */
    if (stacked) memset(xv, 0, len * sizeof(uint16_t));
    else if (M % 16)
        for (int p = 0; p < 3; p++) memset((uint16_t *)parts[p] + (tiles - 1) * tile_len, 0, tile_len * sizeof(uint16_t));
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t m = 0; m < M; m++) {
        int64_t t = stacked ? m / STACK : m / 16, col = stacked ? m % STACK : m % 16;
        int32_t *at[3];
        for (int p = 0; p < 3; p++)
            at[p] = stacked ? (int32_t *)xv + t * 8 * K + STACK * p + col
                            : (int32_t *)parts[p] + t * 8 * K + col;
        split_row(x, m, K, gs, at, xsum ? xsum + t * G * 16 + col : NULL);
    }
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        uint16_t *w = aligned_alloc(64, (size_t)(16 * K) * sizeof(uint16_t));
        __m512 acc[32];
        float out[512] __attribute__((aligned(64)));
        if (!w) failed = 1;
        else configure((int)gs);
#pragma omp for schedule(static)
        for (int64_t nt = 0; nt < N / 16; nt++) {
            if (!w) continue;
            int64_t n0 = nt * 16;
            const int8_t *next = n0 + 16 < N ? codes + (n0 + 16) * K : NULL;
            codes_to_bf16(codes, n0, K, w);
            if (stacked) {
                if (tiles == 2) stacked_block(w, xv, scale, offset, xsum, n0, K, gs, 2, next, acc);
                else stacked_block(w, xv, scale, offset, xsum, n0, K, gs, 1, next, acc);
                for (int i = 0; i < 16 * tiles; i++) _mm512_store_ps(out + 16 * i, acc[i]);
                for (int64_t m = 0; m < M; m++) {
                    const float *a = out + (m / STACK) * 256;
                    int64_t j = m % STACK;
                    for (int r = 0; r < 16; r++)
                        y[m * N + n0 + r] = (a[16 * r + j] + a[16 * r + STACK + j]) + a[16 * r + 2 * STACK + j];
                }
                continue;
            }
            for (int64_t mt = 0; mt < tiles; mt++) {
                wide_block(w, parts, scale, offset, xsum, n0, mt, K, gs, mt == 0 ? next : NULL, acc);
                for (int i = 0; i < 16; i++) _mm512_store_ps(out + 16 * i, acc[i]);
                int64_t rows = M - mt * 16 < 16 ? M - mt * 16 : 16;
                for (int64_t j = 0; j < rows; j++)
                    for (int r = 0; r < 16; r++) y[(mt * 16 + j) * N + n0 + r] = out[16 * r + j];
            }
        }
        if (w) _tile_release();
        free(w);
    }
    free(xv), free(xsum);
    return failed ? -1 : 0;
}
#else
int gf_amx_gemm(const float *x, int64_t M, int64_t K, const int8_t *codes, const float *scale,
                const float *offset, int64_t N, int64_t gs, float *y, int threads) {
    (void)x, (void)M, (void)K, (void)codes, (void)scale, (void)offset, (void)N, (void)gs, (void)y, (void)threads;
    return -1;
}
#endif
