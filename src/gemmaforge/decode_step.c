/* Every layer of one decode step in C: the uncompiled fast path of a GGUF-native model on CPU.
 *
 * The same math as generation/fast.py's decode_step, in the same order (docs/quantization.md,
 * "The native decode step"), for M rows of one new token each:
 *
 *     x = attn_norm(h);  q, k, v = x @ Wqkv^T;  q, k = qk_norm(q, k) (Gemma 3);  rope(q, k)
 *     write k, v into the cache slot of each row (global column or ring slot, from the cache)
 *     y = softmax(softcap(q . K^T * scale) + mask) V      over the attended slots, per head (GQA)
 *     h = h + post_attn_norm(y @ Wo^T)
 *     h = h + post_mlp_norm(down(gelu_tanh(x @ Wgate^T) * (x @ Wup^T)))   with x = pre_mlp_norm(h)
 *
 * Why: eager torch pays a dispatch per op (~60 per layer, ~10 ms of a 27 ms token on 2 threads),
 * and a compiled step costs ~45 s of tracing per process before its first token. Here a step is one
 * call from Python; the projections are block_gemv.c's kernel, and the rest is a few thousand flops
 * per row. Everything is float32, as the eager step for these models; sums run in another order, so
 * results equal the eager step's to float32 rounding (tests/test_decode_step.py). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h" /* dot, axpy: the row-wise sums in vectors (scalar ones wait on each add) */

/* block_gemv.c, linked into the same library */
int gf_block_gemv(const float *x, int64_t M, int64_t K, const int8_t *codes, const void *scale,
                  const void *offset, int64_t N, int64_t gs, int half, float *y, int threads);

typedef struct { /* one gguf_quant.BlockQuantLinear: y = x @ w^T, w [n, k] */
    const int8_t *codes;
    const void *scale, *offset; /* [n, k / gs]; offset NULL for the symmetric types */
    int64_t n, k, gs;
    int64_t half; /* scale and offset are float16 (else float32) */
} gf_weight;

typedef struct {
    gf_weight qkv[3]; /* [q; k; v] fused into qkv[0] (n_qkv = 1), or three */
    int32_t n_qkv;
    gf_weight gate_up[2]; /* [gate; up] fused (n_gate_up = 1), or two */
    int32_t n_gate_up;
    gf_weight o, down;
    const float *attn_norm, *post_attn_norm, *pre_mlp_norm, *post_mlp_norm; /* RMSNorm weights w: x * (1 + w) */
    const float *q_norm, *k_norm;                                        /* NULL without QK-norm */
    float *k_cache, *v_cache; /* [rows, kv_heads, slots, head_dim] of this layer */
    int64_t slots;
    int32_t local; /* a sliding-window layer: ring slots, ring positions, local rope */
} gf_layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, window;
    float eps, attn_scale, softcap; /* softcap 0: none (Gemma 3) */
    const float *final_norm;        /* the final RMSNorm's weight, applied to the output */
    const float *inv_freq_local, *inv_freq_global; /* [head_dim / 2]: the rope frequencies (rope.py) */
} gf_dims;

typedef struct { /* this step's rows: everything the cache says about them */
    int64_t M;
    const int64_t *rows;                        /* [M]: the cache row of each row of h (idle pool rows
                                                   are left out: they would cost as much as live ones) */
    const int64_t *positions;                   /* [M] */
    const int64_t *global_cols, *ring_cols;     /* [M]: where each row's new key goes */
    const int64_t *global_pos, *ring_pos;       /* [rows, stride]: the position held by each slot */
    int64_t global_stride, ring_stride, kv_len, ring_len; /* slots attended: [0, kv_len) / [0, ring_len) */
} gf_rows;

/* RMSNorm in float32: x * rsqrt(mean(x^2) + eps) * (1 + w) (model.RMSNorm). */
static void rms_norm(const float *x, const float *w, float *out, int64_t n, float eps) {
    float r = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = (x[i] * r) * (1.0f + w[i]);
}

/* rope.py's rope_cos_sin for one position: angle pos * inv_freq[j] in float32, its cos and sin
 * duplicated over both halves, [D] each. */
static void rope_table(int64_t pos, const float *inv_freq, int64_t d, float *cos, float *sin) {
    for (int64_t j = 0; j < d / 2; j++) {
        float a = (float)(pos < 0 ? 0 : pos) * inv_freq[j];
        cos[j] = cos[j + d / 2] = cosf(a);
        sin[j] = sin[j + d / 2] = sinf(a);
    }
}

/* "rotate_half" rope (rope.py): pairs (j, j + D/2), cos/sin already duplicated over both halves. */
static void rope(float *x, const float *cos, const float *sin, int64_t d) {
    int64_t half = d / 2;
    for (int64_t j = 0; j < half; j++) {
        float a = x[j], b = x[j + half];
        x[j] = a * cos[j] - b * sin[j];
        x[j + half] = b * cos[j + half] + a * sin[j + half];
    }
}

/* out = gelu(gate) * up, torch's gelu(approximate="tanh"): 0.5 x (1 + tanh(u)), u = beta (x + kappa x^3),
 * computed as x / (1 + e^(-2u)), the same function (0.5 (1 + tanh u) is the logistic of 2u), in
 * vectors: one vexp and one division per element instead of a libm tanhf (~32 us per 2048-wide row
 * scalar, 0.6 ms of a token). Exported for tests/test_decode_step.py, which compares it with torch. */
void gf_gelu_mul(const float *gate, const float *up, float *out, int64_t n) {
    const float beta = 0.7978845608028654f, kappa = 0.044715f; /* sqrt(2 / pi) */
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        vf x = load_floats(gate + i);
        vf u = splat(beta) * madd(splat(kappa) * x, x * x, x);
        vf g = x / (splat(1.0f) + vexp(splat(-2.0f) * u)) * load_floats(up + i);
        memcpy(out + i, &g, sizeof g);
    }
    for (; i < n; i++) {
        float x = gate[i];
        out[i] = x / (1.0f + expf(-2.0f * beta * (x + kappa * x * x * x))) * up[i];
    }
}

static int gemv(const float *x, int64_t M, const gf_weight *w, float *y, int threads) {
    return gf_block_gemv(x, M, w->k, w->codes, w->scale, w->offset, w->n, w->gs, (int)w->half, y, threads);
}

/* y [M, sum of n] = x @ [w0; w1; ...]^T as one matrix: fused weights are one call, separate ones
 * are written side by side into a scratch row each and copied together. */
static int project(const float *x, int64_t M, const gf_weight *w, int32_t nw, float *y, float *scratch,
                   int threads) {
    if (nw == 1) return gemv(x, M, w, y, threads);
    int64_t total = 0, col = 0;
    for (int32_t i = 0; i < nw; i++) total += w[i].n;
    for (int32_t i = 0; i < nw; i++) {
        if (gemv(x, M, &w[i], scratch, threads)) return -1;
        for (int64_t m = 0; m < M; m++) memcpy(y + m * total + col, scratch + m * w[i].n, sizeof(float) * w[i].n);
        col += w[i].n;
    }
    return 0;
}

/* The g query heads q [g, D] that share one KV head, over that head's cached slots [s0, s1) of one
 * row (fast.py's _attend): scores over the visible slots (attention.visible: a slot holds a
 * position >= 0, not after the query, and inside the window on local layers), soft-capped before
 * masking; then the softmax's parts for this range of slots: mx[h], sum[h] = sum of e^(z - mx[h])
 * and out[h] = the e^(z - mx[h])-weighted sum of values, which merge_parts combines over ranges.
 * Each key and value row is read once for all g heads, and the ranges split one row's cache
 * between threads (decoding reads the whole cache per token from memory, as the weights: one
 * range per thread halves what each reads). scores [g, n] is indexed by absolute slot; head h's
 * mx, sum and out [D] are ``hs`` parts apart. */
static void attend_part(const float *q, int64_t g, const float *k, const float *v, const int64_t *slot_pos,
                        int64_t s0, int64_t s1, int64_t n, int64_t qpos, int64_t window, const gf_dims *d,
                        float *scores, float *mx, float *sum, float *out, int64_t hs) {
    const int64_t D = d->head_dim;
    for (int64_t h = 0; h < g; h++) {
        mx[h * hs] = -INFINITY, sum[h * hs] = 0.0f;
        memset(out + h * hs * D, 0, sizeof(float) * (size_t)D);
    }
    int any = 0;
    for (int64_t s = s0; s < s1; s++) {
        int64_t p = slot_pos[s], dist = qpos - p;
        int hidden = p < 0 || dist < 0 || (window > 0 && dist >= window);
        any |= !hidden;
        for (int64_t h = 0; h < g; h++) {
            float z = -INFINITY;
            if (!hidden) {
                z = dot(q + h * D, k + s * D, D) * d->attn_scale;
                if (d->softcap > 0) z = tanhf(z / d->softcap) * d->softcap;
                if (z > mx[h * hs]) mx[h * hs] = z;
            }
            scores[h * n + s] = z;
        }
    }
    if (!any) return; /* nothing visible here: mx -inf, sum 0 (merge_parts gives it no weight) */
    for (int64_t h = 0; h < g; h++) {
        /* the exponentials in vectors (libm's expf per slot: ~0.8 ms a token at a 4096-token
         * context); hidden slots get an exact 0, which the sums below skip */
        float *e = scores + h * n;
        vf vmx = splat(mx[h * hs]), sums = {0};
        int64_t s = s0;
        for (; s + LANES <= s1; s += LANES) {
            vf z = load_floats(e + s);
            vi hide = z == splat(-INFINITY);
            vf w = (vf)((vi)vexp(z - vmx) & ~hide);
            memcpy(e + s, &w, sizeof w);
            sums += w;
        }
        float total = hsum(sums);
        for (; s < s1; s++) {
            e[s] = e[s] == -INFINITY ? 0.0f : expf(e[s] - mx[h * hs]);
            total += e[s];
        }
        sum[h * hs] = total;
    }
    for (int64_t s = s0; s < s1; s++)
        for (int64_t h = 0; h < g; h++)
            if (scores[h * n + s] != 0.0f) axpy(scores[h * n + s], v + s * D, out + h * hs * D, D);
}

/* One head's output from its parts over ``parts`` slot ranges: the softmax-weighted sum of values,
 * each part rescaled from its own maximum to the overall one. Zeros if no slot was visible (a live
 * row always sees its own new key). */
static void merge_parts(const float *mx, const float *sum, const float *out, int64_t parts, int64_t D, float *y) {
    float m = -INFINITY, total = 0.0f;
    for (int64_t c = 0; c < parts; c++) m = mx[c] > m ? mx[c] : m;
    memset(y, 0, sizeof(float) * (size_t)D);
    if (m == -INFINITY) return;
    for (int64_t c = 0; c < parts; c++)
        if (mx[c] != -INFINITY) total += sum[c] * expf(mx[c] - m);
    for (int64_t c = 0; c < parts; c++)
        if (mx[c] != -INFINITY) axpy(expf(mx[c] - m) / total, out + c * D, y, D);
}

/* All layers over h [M, hidden] in place: the embedded, scaled tokens in, the final-normed hidden
 * states out (what the output head reads). Returns 0, or -1 if scratch memory could not be allocated. */
int gf_decode_layers(const gf_dims *d, const gf_layer *layers, int64_t L, const gf_rows *r, float *h,
                     int threads) {
    const int64_t M = r->M, H = d->hidden, D = d->head_dim, nq = d->heads * D, nkv = d->kv_heads * D;
    const int64_t F = d->intermediate, nqkv = nq + 2 * nkv, group = d->heads / d->kv_heads;
    const int64_t n_max = r->kv_len > r->ring_len ? r->kv_len : r->ring_len; /* scores per (row, head) */
    int64_t widest = nqkv > 2 * F ? nqkv : 2 * F;
    /* Slot ranges per (row, KV head): enough for every thread to have one, of at least 64 slots. */
    const int64_t pairs = M * d->kv_heads, by_threads = (threads + pairs - 1) / pairs, by_slots = n_max / 64;
    const int64_t parts = by_threads < by_slots ? by_threads : (by_slots > 1 ? by_slots : 1);
    /* x, qkv, y (attention out), t (a projection out), gate|up, act, scratch, scores per (row, head),
     * the rope tables (cos and sin, local and global, [M, D] each), the attention parts (out, max, sum) */
    size_t floats = (size_t)(M * (H + nqkv + nq + H + 2 * F + F + widest) + M * d->heads * n_max + 4 * M * D
                             + M * d->heads * parts * (D + 2));
    float *mem = malloc(sizeof(float) * floats);
    if (!mem) return -1;
    float *x = mem, *qkv = x + M * H, *y = qkv + M * nqkv, *t = y + M * nq, *gu = t + M * H;
    float *act = gu + M * 2 * F, *scratch = act + M * F, *scores = scratch + M * widest;
    float *cos_local = scores + M * d->heads * n_max, *sin_local = cos_local + M * D;
    float *cos_global = sin_local + M * D, *sin_global = cos_global + M * D;
    /* parts of (row, head, range): [M, heads, parts] x D outputs, maxima, sums */
    float *part_out = sin_global + M * D, *part_mx = part_out + M * d->heads * parts * D;
    float *part_sum = part_mx + M * d->heads * parts;
    for (int64_t m = 0; m < M; m++) {
        rope_table(r->positions[m], d->inv_freq_local, D, cos_local + m * D, sin_local + m * D);
        rope_table(r->positions[m], d->inv_freq_global, D, cos_global + m * D, sin_global + m * D);
    }

    int64_t l = 0;
    for (; l < L; l++) {
        const gf_layer *ly = &layers[l];
        const int local = ly->local;
        const float *cosv = local ? cos_local : cos_global, *sinv = local ? sin_local : sin_global;
        const int64_t *cols = local ? r->ring_cols : r->global_cols;
        const int64_t *spos = local ? r->ring_pos : r->global_pos;
        const int64_t stride = local ? r->ring_stride : r->global_stride;
        const int64_t n = local ? r->ring_len : r->kv_len, window = local ? d->window : 0;

        for (int64_t m = 0; m < M; m++) rms_norm(h + m * H, ly->attn_norm, x + m * H, H, d->eps);
        if (project(x, M, ly->qkv, ly->n_qkv, qkv, scratch, threads)) break;
        for (int64_t m = 0; m < M; m++) {
            float *q = qkv + m * nqkv, *k = q + nq, *v = k + nkv;
            for (int64_t hd = 0; hd < d->heads; hd++) {
                if (ly->q_norm) rms_norm(q + hd * D, ly->q_norm, q + hd * D, D, d->eps);
                rope(q + hd * D, cosv + m * D, sinv + m * D, D);
            }
            for (int64_t hd = 0; hd < d->kv_heads; hd++) {
                if (ly->k_norm) rms_norm(k + hd * D, ly->k_norm, k + hd * D, D, d->eps);
                rope(k + hd * D, cosv + m * D, sinv + m * D, D);
                /* the write before the attention: the new token sees itself */
                int64_t at = ((r->rows[m] * d->kv_heads + hd) * ly->slots + cols[m]) * D;
                memcpy(ly->k_cache + at, k + hd * D, sizeof(float) * D);
                memcpy(ly->v_cache + at, v + hd * D, sizeof(float) * D);
            }
        }
        /* work item (row, KV head, slot range): its g heads' parts at [m, kvh * g + j, c] */
        const int64_t per = (n + parts - 1) / parts;
#pragma omp parallel for collapse(3) schedule(static) num_threads(threads)
        for (int64_t m = 0; m < M; m++)
            for (int64_t kvh = 0; kvh < d->kv_heads; kvh++)
                for (int64_t c = 0; c < parts; c++) {
                    int64_t base = (r->rows[m] * d->kv_heads + kvh) * ly->slots * D, s0 = c * per;
                    int64_t s1 = s0 + per < n ? s0 + per : n, first = (m * d->heads + kvh * group) * parts + c;
                    if (s0 > s1) s0 = s1;
                    attend_part(qkv + m * nqkv + kvh * group * D, group, ly->k_cache + base, ly->v_cache + base,
                                spos + r->rows[m] * stride, s0, s1, n, r->positions[m], window, d,
                                scores + (m * d->heads + kvh * group) * n_max, part_mx + first, part_sum + first,
                                part_out + first * D, parts);
                }
        for (int64_t m = 0; m < M; m++)
            for (int64_t hd = 0; hd < d->heads; hd++) {
                int64_t first = (m * d->heads + hd) * parts;
                merge_parts(part_mx + first, part_sum + first, part_out + first * D, parts, D, y + m * nq + hd * D);
            }
        if (gemv(y, M, &ly->o, t, threads)) break;
        for (int64_t m = 0; m < M; m++) {
            rms_norm(t + m * H, ly->post_attn_norm, t + m * H, H, d->eps);
            for (int64_t i = 0; i < H; i++) h[m * H + i] += t[m * H + i];
            rms_norm(h + m * H, ly->pre_mlp_norm, x + m * H, H, d->eps);
        }
        if (project(x, M, ly->gate_up, ly->n_gate_up, gu, scratch, threads)) break;
        for (int64_t m = 0; m < M; m++) gf_gelu_mul(gu + m * 2 * F, gu + m * 2 * F + F, act + m * F, F);
        if (gemv(act, M, &ly->down, t, threads)) break;
        for (int64_t m = 0; m < M; m++) {
            rms_norm(t + m * H, ly->post_mlp_norm, t + m * H, H, d->eps);
            for (int64_t i = 0; i < H; i++) h[m * H + i] += t[m * H + i];
        }
    }
    if (l == L && d->final_norm)
        for (int64_t m = 0; m < M; m++) rms_norm(h + m * H, d->final_norm, h + m * H, H, d->eps);
    free(mem);
    return l == L ? 0 : -1; /* a break above: a kernel's own allocation failed */
}

static inline int first_equal(vf v, float b) { /* the first lane of v equal to b, or LANES */
#if defined(__AVX512F__)
    unsigned m = _mm512_cmp_ps_mask((__m512)v, _mm512_set1_ps(b), _CMP_EQ_OQ);
#elif defined(__AVX2__)
    unsigned m = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps((__m256)v, _mm256_set1_ps(b), _CMP_EQ_OQ));
#else
    unsigned m = 0;
    for (int l = 0; l < LANES; l++) m |= (unsigned)(v[l] == b) << l;
#endif
    return m ? __builtin_ctz(m) : LANES;
}

/* out[r] = the index of the first largest value of row r of x [R, V], as torch.argmax (a NaN counts
 * as the largest: the first NaN's index). The greedy token after the head: torch's argmax over a
 * 262k vocabulary is a scalar loop (~0.22 ms a row on 2 Zen 4 cores, ~2% of a token); this is a
 * vector max, then the first index equal to it. */
void gf_argmax(const float *x, int64_t R, int64_t V, int64_t *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (R > 1)
    for (int64_t r = 0; r < R; r++) {
        const float *row = x + r * V;
        vf mx = splat(-INFINITY);
        vi nan = {0};
        int64_t i = 0;
        for (; i + LANES <= V; i += LANES) {
            vf v = load_floats(row + i);
            nan |= v != v;
            mx = vmax(mx, v);
        }
        float best = -INFINITY;
        for (int l = 0; l < LANES; l++) best = mx[l] > best ? mx[l] : best;
        int any_nan = 0;
        for (int l = 0; l < LANES; l++) any_nan |= nan[l];
        for (; i < V; i++) {
            any_nan |= row[i] != row[i];
            best = row[i] > best ? row[i] : best;
        }
        int64_t j = 0;
        if (!any_nan) /* where the maximum first is: whole vectors, then the lane */
            for (; j + LANES <= V; j += LANES)
                if (first_equal(load_floats(row + j), best) < LANES) break;
        for (; j < V; j++)
            if (any_nan ? row[j] != row[j] : row[j] == best) break;
        out[r] = j < V ? j : 0;
    }
}
