/* santacli's native CPU decode step: one token per row through the whole GPTBigCode stack.
 *
 * Why it exists: a decode step is memory-bound (every weight is read once per token), and in
 * PyTorch it is also ~25 operator dispatches per layer plus Python between them; that overhead,
 * and PyTorch's slow bf16 and int8 matrix-vector products on CPUs without 16-bit matrix units,
 * kept santa far from the memory-bandwidth ceiling. Here a step is one call: per layer,
 * LayerNorm -> c_attn -> K/V written into the cache -> attention -> c_proj -> residual ->
 * LayerNorm -> c_fc + activation -> c_proj -> residual, then ln_f and the vocabulary projection.
 *
 * Weights are read in place from the tensors PyTorch owns (fp32, bf16, fp16, or int8 with one
 * fp32 scale per output row); activations and accumulation are fp32. The KV cache is PyTorch's
 * (n_layer, batch, kv_heads, max_len, head_dim) buffer in fp32, bf16 or fp16.
 *
 * Compiled at first use on the machine that runs it (santacli/native.py), with -march=native:
 * the #if blocks below pick AVX-512, AVX2+FMA or plain C. Threads come from OpenMP, which
 * resolves to the libgomp PyTorch has already loaded, so both share one thread pool.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { T_F32 = 0, T_BF16 = 1, T_F16 = 2, T_I8 = 3 };
enum { A_GELU_TANH = 0, A_GELU_FAST = 1, A_GELU_ERF = 2, A_RELU = 3, A_SILU = 4, A_TANH = 5, A_NONE = 6 };

typedef struct {
    const void *weight;   /* (rows, cols) row-major, of type wtype */
    const float *scale;   /* int8 only: one scale per row; else NULL */
    const int32_t *wsum;  /* int8 only: sum of each row's int8 weights; else NULL */
    const float *bias;    /* fp32 (rows) or NULL */
    int64_t rows, cols;
    int32_t wtype, pad_;
} Linear;

typedef struct {
    const float *ln_1_w, *ln_1_b, *ln_2_w, *ln_2_b;
    Linear c_attn, attn_proj, c_fc, mlp_proj;
} Layer;

typedef struct {
    int64_t n_embd, n_head, kv_heads, head_dim, inner, n_layer, vocab;
    int64_t cache_batch, cache_len;  /* the KV buffer's batch and max_len */
    int32_t multi_query, activation, cache_type, wte_type, wpe_type, pad_;
    float eps, attn_scale;
    const void *wte, *wpe;           /* (vocab, n_embd) of wte_type, (n_positions, n_embd) of wpe_type */
    const float *wte_scale;          /* int8 wte (the tied int8 lm_head's rows): per-row scales */
    const float *ln_f_w, *ln_f_b;
    void *k_cache, *v_cache;
    const Layer *layers;
    Linear lm_head;
} Model;

/* ---------------------------------------------------------------------------------------- */
/* Loading 16/8/1 values of any storage type as fp32 lanes.                                   */

static inline float bf16_to_f32(uint16_t h) { union { uint32_t u; float f; } v = { (uint32_t)h << 16 }; return v.f; }
static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = { f };
    uint32_t rounding = 0x7FFF + ((v.u >> 16) & 1);  /* round to nearest even, as torch does */
    return (uint16_t)((v.u + rounding) >> 16);
}
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1F, man = h & 0x3FF, u;
    if (exp == 0) {
        if (man == 0) { u = sign; }
        else { /* subnormal */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            u = sign | (exp << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) { u = sign | 0x7F800000 | (man << 13); }
    else { u = sign | ((exp + 127 - 15) << 23) | (man << 13); }
    union { uint32_t u; float f; } v = { u };
    return v.f;
}
static inline uint16_t f32_to_f16(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    union { float f; uint32_t u; } v = { f };
    uint32_t sign = (v.u >> 16) & 0x8000; int32_t exp = (int32_t)((v.u >> 23) & 0xFF) - 127 + 15;
    uint32_t man = v.u & 0x7FFFFF;
    if (exp >= 31) return (uint16_t)(sign | 0x7C00);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000; uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = sign | ((uint32_t)exp << 10) | (man >> 13), rem = man & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++;
    return (uint16_t)half;
#endif
}

static inline float load1(const void *p, int32_t type, int64_t i) {
    switch (type) {
    case T_F32: return ((const float *)p)[i];
    case T_BF16: return bf16_to_f32(((const uint16_t *)p)[i]);
    case T_F16: return f16_to_f32(((const uint16_t *)p)[i]);
    default: return (float)((const int8_t *)p)[i];
    }
}

static inline void store1(void *p, int32_t type, int64_t i, float x) {
    switch (type) {
    case T_F32: ((float *)p)[i] = x; break;
    case T_BF16: ((uint16_t *)p)[i] = f32_to_bf16(x); break;
    default: ((uint16_t *)p)[i] = f32_to_f16(x); break;
    }
}

static inline size_t type_size(int32_t type) { return type == T_F32 ? 4 : type == T_I8 ? 1 : 2; }

/* The int8 and bf16 kernels stream blocks of 4 adjacent rows; while one block is read, fetch
 * the next (block_bytes further) at the same pace. Measured +25% read bandwidth for int8 rows
 * (8 KB blocks at K = 2048) and +10% for bf16 (16 KB), whose short rows give the hardware
 * prefetcher little to go on; fp32's 32 KB blocks were slower with it. */
static inline void prefetch_next_block(const void *block, int64_t block_bytes, int64_t done_bytes, int64_t bytes) {
#if defined(__AVX2__) || defined(__AVX512F__)
    const char *p = (const char *)block + block_bytes + done_bytes;
    for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
#else
    (void)block; (void)block_bytes; (void)done_bytes; (void)bytes;
#endif
}

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vf vset(float x) { return _mm512_set1_ps(x); }
static inline void vstore(float *p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vload(const void *p, int32_t type, int64_t i) {
    switch (type) {
    case T_F32: return _mm512_loadu_ps((const float *)p + i);
    case T_BF16: return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16));
    case T_F16: return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
    default: return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)p + i))));
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vf;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vf vset(float x) { return _mm256_set1_ps(x); }
static inline void vstore(float *p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf vload(const void *p, int32_t type, int64_t i) {
    switch (type) {
    case T_F32: return _mm256_loadu_ps((const float *)p + i);
    case T_BF16: return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
#if defined(__F16C__)
    case T_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
#endif
    case T_I8: return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)p + i))));
    default: {
        float tmp[8];
        for (int j = 0; j < 8; j++) tmp[j] = load1(p, type, i + j);
        return _mm256_loadu_ps(tmp);
    }
    }
}
#else
#define VW 1
typedef float vf;
static inline vf vzero(void) { return 0.0f; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline float vsum(vf a) { return a; }
static inline vf vset(float x) { return x; }
static inline void vstore(float *p, vf a) { *p = a; }
static inline vf vload(const void *p, int32_t type, int64_t i) { return load1(p, type, i); }
#endif

/* dot(w[0:n] of wtype, x[0:n] fp32) */
static inline float dot(const void *w, int32_t wtype, const float *x, int64_t n) {
    vf a0 = vzero(), a1 = vzero();
    int64_t i = 0;
    for (; i + 2 * VW <= n; i += 2 * VW) {
        a0 = vfma(vload(w, wtype, i), vload(x, T_F32, i), a0);
        a1 = vfma(vload(w, wtype, i + VW), vload(x, T_F32, i + VW), a1);
    }
    float s = vsum(a0) + vsum(a1);
    for (; i < n; i++) s += load1(w, wtype, i) * x[i];
    return s;
}

/* ---------------------------------------------------------------------------------------- */
/* Elementwise pieces                                                                         */

static inline float activate(float x, int32_t act) {
    switch (act) {
    case A_GELU_TANH: return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case A_GELU_FAST: return 0.5f * x * (1.0f + tanhf(x * 0.7978845608f * (1.0f + 0.044715f * x * x)));
    case A_GELU_ERF: return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    case A_RELU: return x > 0.0f ? x : 0.0f;
    case A_SILU: return x / (1.0f + expf(-x));
    case A_TANH: return tanhf(x);
    default: return x;
    }
}

static void layer_norm(const float *x, const float *w, const float *b, float *out, int64_t n, float eps) {
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < n; i++) mean += x[i];
    mean /= (double)n;
    for (int64_t i = 0; i < n; i++) { double d = x[i] - mean; var += d * d; }
    float inv = (float)(1.0 / sqrt(var / (double)n + (double)eps)), m = (float)mean;
    for (int64_t i = 0; i < n; i++) out[i] = (x[i] - m) * inv * w[i] + b[i];
}

/* ---------------------------------------------------------------------------------------- */
/* int8 x int8 dot products. Activations are quantized per row to int8 with scale absmax/127,
 * rounded half to even, exactly as quantize.Int8Linear does for prompts; the int32 sums are
 * exact, so a decode step's projections equal the prompt path's bit for bit.               */

static float quantize_row(const float *x, int64_t n, int8_t *q) {
    float mx = 0.0f;
    for (int64_t i = 0; i < n; i++) { float a = fabsf(x[i]); mx = a > mx ? a : mx; }
    const float s = (mx > 1e-12f ? mx : 1e-12f) / 127.0f;
    for (int64_t i = 0; i < n; i++) q[i] = (int8_t)nearbyintf(x[i] / s);
    return s;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* vpdpbusd multiplies unsigned by signed bytes: feed x + 128 and subtract 128 * sum(w). */
#define I8_UNSIGNED_X 1
static inline int32_t dot_i8(const int8_t *w, const uint8_t *xu, int64_t n, int32_t wsum) {
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 128 <= n; i += 128) {
        a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(xu + i), _mm512_loadu_si512(w + i));
        a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(xu + i + 64), _mm512_loadu_si512(w + i + 64));
    }
    for (; i + 64 <= n; i += 64) a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(xu + i), _mm512_loadu_si512(w + i));
    int32_t s = _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1));
    for (; i < n; i++) s += (int32_t)xu[i] * w[i];
    return s - 128 * wsum;
}
#elif defined(__AVX2__)
#define I8_UNSIGNED_X 0
static inline int32_t dot_i8(const int8_t *w, const int8_t *x, int64_t n, int32_t wsum) {
    (void)wsum;
    __m256i acc = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + i)));
        __m256i xv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(x + i)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(wv, xv));
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    int32_t s = _mm_cvtsi128_si32(s4);
    for (; i < n; i++) s += (int32_t)x[i] * w[i];
    return s;
}
#else
#define I8_UNSIGNED_X 0
static inline int32_t dot_i8(const int8_t *w, const int8_t *x, int64_t n, int32_t wsum) {
    (void)wsum;
    int32_t s = 0;
    for (int64_t i = 0; i < n; i++) s += (int32_t)x[i] * w[i];
    return s;
}
#endif

static inline void store_out(const Linear *L, int64_t n, float v, float *yb, int32_t act, int accumulate) {
    if (L->bias) v += L->bias[n];
    v = activate(v, act);
    yb[n] = accumulate ? yb[n] + v : v;
}

static void linear_i8(const Linear *L, const float *x, int64_t x_stride, float *y, int64_t y_stride,
                      int64_t B, int32_t act, int accumulate, int threads, int8_t *xq, float *xs) {
    const int64_t K = L->cols, N = L->rows;
    for (int64_t b = 0; b < B; b++) {
        int8_t *q = xq + b * K;
        xs[b] = quantize_row(x + b * x_stride, K, q);
        if (I8_UNSIGNED_X) for (int64_t i = 0; i < K; i++) q[i] = (int8_t)(uint8_t)((int32_t)q[i] + 128);
    }
    const int8_t *W = (const int8_t *)L->weight;
    const int64_t blocks = (N + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t n0 = blk * 4, n1 = n0 + 4 < N ? n0 + 4 : N;
        for (int64_t b = 0; b < B; b++) {
            const void *xb = xq + b * K;
            float *yb = y + b * y_stride;
            int32_t s[4];
#if I8_UNSIGNED_X
            if (n1 - n0 == 4 && K % 64 == 0) {
                /* Four rows at once share each activation load. */
                const int8_t *w0 = W + n0 * K;
                __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t i = 0; i < K; i += 64) {
                    prefetch_next_block(w0, 4 * K, 4 * i, 256);
                    const __m512i xv = _mm512_loadu_si512((const uint8_t *)xb + i);
                    a0 = _mm512_dpbusd_epi32(a0, xv, _mm512_loadu_si512(w0 + i));
                    a1 = _mm512_dpbusd_epi32(a1, xv, _mm512_loadu_si512(w0 + K + i));
                    a2 = _mm512_dpbusd_epi32(a2, xv, _mm512_loadu_si512(w0 + 2 * K + i));
                    a3 = _mm512_dpbusd_epi32(a3, xv, _mm512_loadu_si512(w0 + 3 * K + i));
                }
                s[0] = _mm512_reduce_add_epi32(a0) - 128 * L->wsum[n0];
                s[1] = _mm512_reduce_add_epi32(a1) - 128 * L->wsum[n0 + 1];
                s[2] = _mm512_reduce_add_epi32(a2) - 128 * L->wsum[n0 + 2];
                s[3] = _mm512_reduce_add_epi32(a3) - 128 * L->wsum[n0 + 3];
            } else
#endif
            for (int64_t n = n0; n < n1; n++) s[n - n0] = dot_i8(W + n * K, xb, K, L->wsum ? L->wsum[n] : 0);
            for (int64_t n = n0; n < n1; n++) store_out(L, n, (float)s[n - n0] * xs[b] * L->scale[n], yb, act, accumulate);
        }
    }
}

#if defined(__AVX512F__)
/* bf16 rows without shuffles: 32 bf16 loaded as 16 u32 lanes hold the even elements in their
 * low halves and the odd ones in their high halves, so `<< 16` and `& 0xFFFF0000` turn them into
 * two fp32 vectors; x is split into matching even/odd halves once per call. */
#define HAVE_BF16_PAIRS 1
static void split_even_odd(const float *x, int64_t K, float *xp) {
    for (int64_t c = 0; c < K; c += 32)
        for (int64_t j = 0; j < 16; j++) { xp[c + j] = x[c + 2 * j]; xp[c + 16 + j] = x[c + 2 * j + 1]; }
}

static void linear_bf16(const Linear *L, const float *x, int64_t x_stride, float *y, int64_t y_stride,
                        int64_t B, int32_t act, int accumulate, int threads, float *xp) {
    const int64_t K = L->cols, N = L->rows;
    for (int64_t b = 0; b < B; b++) split_even_odd(x + b * x_stride, K, xp + b * K);
    const uint16_t *W = (const uint16_t *)L->weight;
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    const int64_t blocks = (N + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t n0 = blk * 4, n1 = n0 + 4 < N ? n0 + 4 : N, rows = n1 - n0;
        const uint16_t *w0 = W + n0 * K;
        for (int64_t b = 0; b < B; b++) {
            const float *xb = xp + b * K;
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t i = 0; i < K; i += 32) {
                prefetch_next_block(w0, rows * K * 2, rows * i * 2, rows * 64);
                const __m512 xe = _mm512_loadu_ps(xb + i), xo = _mm512_loadu_ps(xb + i + 16);
                for (int64_t r = 0; r < rows; r++) {
                    const __m512i wv = _mm512_loadu_si512(w0 + r * K + i);
                    acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(wv, 16)), xe, acc[r]);
                    acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(wv, high)), xo, acc[r]);
                }
            }
            float *yb = y + b * y_stride;
            for (int64_t r = 0; r < rows; r++) store_out(L, n0 + r, _mm512_reduce_add_ps(acc[r]), yb, act, accumulate);
        }
    }
}
#else
#define HAVE_BF16_PAIRS 0
#endif

/* ---------------------------------------------------------------------------------------- */
/* y[b] = act(W x[b] + bias) (+ y[b] when accumulate), for B rows; x rows are x_stride apart.  */

static void linear(const Linear *L, const float *x, int64_t x_stride, float *y, int64_t y_stride,
                   int64_t B, int32_t act, int accumulate, int threads) {
    const int64_t K = L->cols, N = L->rows, wsize = (int64_t)type_size(L->wtype);
    if (L->wtype == T_I8) {
        int8_t *xq = malloc((size_t)(B * K));
        float *xs = malloc((size_t)B * sizeof(float));
        if (xq && xs) linear_i8(L, x, x_stride, y, y_stride, B, act, accumulate, threads, xq, xs);
        free(xq);
        free(xs);
        return;
    }
#if HAVE_BF16_PAIRS
    if (L->wtype == T_BF16 && K % 32 == 0) {
        float *xp = malloc((size_t)(B * K) * sizeof(float));
        if (xp) linear_bf16(L, x, x_stride, y, y_stride, B, act, accumulate, threads, xp);
        free(xp);
        return;
    }
#endif
    const char *W = (const char *)L->weight;
    const int64_t blocks = (N + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t n0 = blk * 4, n1 = n0 + 4 < N ? n0 + 4 : N;
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + b * x_stride;
            float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (n1 - n0 == 4) {
                /* Four rows at once: x is loaded once per four rows, four independent sums. */
                const void *w0 = W + n0 * K * wsize, *w1 = W + (n0 + 1) * K * wsize;
                const void *w2 = W + (n0 + 2) * K * wsize, *w3 = W + (n0 + 3) * K * wsize;
                vf a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
                int64_t i = 0;
                /* No software prefetch here: for fp32 rows (32 KB per block) it measured 20-25%
                 * slower than the hardware prefetcher alone. */
                for (; i + VW <= K; i += VW) {
                    vf xv = vload(xb, T_F32, i);
                    a0 = vfma(vload(w0, L->wtype, i), xv, a0);
                    a1 = vfma(vload(w1, L->wtype, i), xv, a1);
                    a2 = vfma(vload(w2, L->wtype, i), xv, a2);
                    a3 = vfma(vload(w3, L->wtype, i), xv, a3);
                }
                s[0] = vsum(a0); s[1] = vsum(a1); s[2] = vsum(a2); s[3] = vsum(a3);
                for (; i < K; i++) {
                    s[0] += load1(w0, L->wtype, i) * xb[i]; s[1] += load1(w1, L->wtype, i) * xb[i];
                    s[2] += load1(w2, L->wtype, i) * xb[i]; s[3] += load1(w3, L->wtype, i) * xb[i];
                }
            } else {
                for (int64_t n = n0; n < n1; n++) s[n - n0] = dot(W + n * K * wsize, L->wtype, xb, K);
            }
            float *yb = y + b * y_stride;
            for (int64_t n = n0; n < n1; n++) store_out(L, n, s[n - n0], yb, act, accumulate);
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Attention of one new query per row over positions [0, pos] of the cache.                   */

static void attention(const Model *m, int64_t layer, const float *qkv, int64_t qkv_stride, float *out,
                      float *scores, int64_t B, int64_t pos, int threads) {
    const int64_t nh = m->n_head, kvh = m->kv_heads, hd = m->head_dim, g = nh / kvh, S = pos + 1;
    const int32_t ct = m->cache_type;
    const size_t cs = type_size(ct);
    const int64_t head_stride = m->cache_len * hd;  /* elements between kv heads */
    /* Work items: (row, kv head, slice of its query heads). MQA has one kv head, so its g query
     * heads are split between threads; each slice reads every cached key/value once. */
    const int64_t per_slice = g >= threads ? (g + threads - 1) / threads : 1;
    const int64_t slices = (g + per_slice - 1) / per_slice;
    #pragma omp parallel for schedule(static) num_threads(threads) collapse(2)
    for (int64_t bk = 0; bk < B * kvh; bk++) {
        for (int64_t sl = 0; sl < slices; sl++) {
            const int64_t b = bk / kvh, kv = bk % kvh;
            const int64_t h0 = kv * g + sl * per_slice, h1 = h0 + per_slice < (kv + 1) * g ? h0 + per_slice : (kv + 1) * g;
            const int64_t base = ((layer * m->cache_batch + b) * kvh + kv) * head_stride;
            const char *K = (const char *)m->k_cache + base * cs, *V = (const char *)m->v_cache + base * cs;
            const float *qrow = qkv + b * qkv_stride;
            for (int64_t h = h0; h < h1; h++) {
                /* MQA columns: [q (nh*hd) | k | v]; MHA: per head (q, k, v). */
                const float *q = m->multi_query ? qrow + h * hd : qrow + h * 3 * hd;
                float *sc = scores + (b * nh + h) * m->cache_len;
                float mx = -INFINITY;
                for (int64_t s = 0; s < S; s++) {
                    float v = dot(K + s * hd * cs, ct, q, hd) * m->attn_scale;
                    sc[s] = v;
                    mx = v > mx ? v : mx;
                }
                float total = 0.0f;
                for (int64_t s = 0; s < S; s++) { sc[s] = expf(sc[s] - mx); total += sc[s]; }
                const float inv = 1.0f / total;
                float *o = out + b * m->n_embd + h * hd;
                int64_t d = 0;
                for (; d + VW <= hd; d += VW) {
                    vf acc = vzero();
                    for (int64_t s = 0; s < S; s++) acc = vfma(vset(sc[s]), vload(V + s * hd * cs, ct, d), acc);
                    vstore(o + d, acc);
                }
                for (; d < hd; d++) {
                    float acc = 0.0f;
                    for (int64_t s = 0; s < S; s++) acc += sc[s] * load1(V + s * hd * cs, ct, d);
                    o[d] = acc;
                }
                for (d = 0; d < hd; d++) o[d] *= inv;
            }
        }
    }
}

/* Write row b's new key/value (from its qkv row) into the cache at position pos. */
static void store_kv(const Model *m, int64_t layer, const float *qkv_row, int64_t b, int64_t pos) {
    const int64_t kvh = m->kv_heads, hd = m->head_dim, d = m->n_embd;
    for (int64_t kv = 0; kv < kvh; kv++) {
        const int64_t at = (((layer * m->cache_batch + b) * kvh + kv) * m->cache_len + pos) * hd;
        const float *k = m->multi_query ? qkv_row + d : qkv_row + kv * 3 * hd + hd;
        const float *v = m->multi_query ? qkv_row + d + hd : qkv_row + kv * 3 * hd + 2 * hd;
        for (int64_t i = 0; i < hd; i++) {
            store1(m->k_cache, m->cache_type, at + i, k[i]);
            store1(m->v_cache, m->cache_type, at + i, v[i]);
        }
    }
}

/* ---------------------------------------------------------------------------------------- */

/* fp32 work space santa_decode needs for B rows. */
int64_t santa_workspace_floats(const Model *m, int64_t B) {
    const int64_t qkv = m->multi_query ? m->n_embd + 2 * m->head_dim : 3 * m->n_embd;
    return B * (3 * m->n_embd + qkv + m->inner + m->n_head * m->cache_len);
}

/* One decode step: token ids[b] at position pos for rows b < B; logits (B, vocab) fp32. */
void santa_decode(const Model *m, const int64_t *ids, int64_t B, int64_t pos, float *logits, float *work,
                  int32_t threads) {
    const int64_t d = m->n_embd, qkv_n = m->layers[0].c_attn.rows, inner = m->inner;
    float *x = work, *h = x + B * d, *att = h + B * d, *qkv = att + B * d, *mlp = qkv + B * qkv_n;
    float *scores = mlp + B * inner;
    const size_t ts = type_size(m->wte_type), ps = type_size(m->wpe_type);
    for (int64_t b = 0; b < B; b++) {
        const char *tok = (const char *)m->wte + ids[b] * d * ts, *p = (const char *)m->wpe + pos * d * ps;
        const float s = m->wte_scale ? m->wte_scale[ids[b]] : 1.0f;  /* x * 1.0f is exact */
        for (int64_t i = 0; i < d; i++) x[b * d + i] = load1(tok, m->wte_type, i) * s + load1(p, m->wpe_type, i);
    }
    for (int64_t l = 0; l < m->n_layer; l++) {
        const Layer *L = &m->layers[l];
        for (int64_t b = 0; b < B; b++) layer_norm(x + b * d, L->ln_1_w, L->ln_1_b, h + b * d, d, m->eps);
        linear(&L->c_attn, h, d, qkv, qkv_n, B, A_NONE, 0, threads);
        for (int64_t b = 0; b < B; b++) store_kv(m, l, qkv + b * qkv_n, b, pos);
        attention(m, l, qkv, qkv_n, att, scores, B, pos, threads);
        linear(&L->attn_proj, att, d, x, d, B, A_NONE, 1, threads);
        for (int64_t b = 0; b < B; b++) layer_norm(x + b * d, L->ln_2_w, L->ln_2_b, h + b * d, d, m->eps);
        linear(&L->c_fc, h, d, mlp, inner, B, m->activation, 0, threads);
        linear(&L->mlp_proj, mlp, inner, x, d, B, A_NONE, 1, threads);
    }
    for (int64_t b = 0; b < B; b++) layer_norm(x + b * d, m->ln_f_w, m->ln_f_b, h + b * d, d, m->eps);
    linear(&m->lm_head, h, d, logits, m->vocab, B, A_NONE, 0, threads);
}

/* The SIMD width this build uses (16: AVX-512, 8: AVX2, 1: plain C), for `santa info`. */
int32_t santa_simd_width(void) { return VW; }
