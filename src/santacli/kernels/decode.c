/* santacli's native CPU decode step: one token per row through the whole GPTBigCode stack, or
 * T tokens per row at once to verify a speculative draft (each weight read once for all of them).
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
#if defined(__F16C__)
    return _cvtsh_ss(h);  /* exact, like the bit manipulation below */
#else
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
#endif
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
 * prefetcher little to go on; fp32's 32 KB blocks were slower with it. Always inlined: GCC
 * otherwise finds the function free of side effects and drops calls to it. */
static inline __attribute__((always_inline)) void prefetch_next_block(const void *block, int64_t block_bytes, int64_t done_bytes, int64_t bytes) {
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

/* tanh as a rational function (Eigen's fast tanh; |error| < 4e-7), branch-free so that loops over
 * it vectorize: glibc's tanhf cost ~12 ns a call, 2.5 ms per token at SantaCoder's shape. */
static inline float tanh_fast(float x) {
    const float c = 7.90531110763549805f;  /* tanh rounds to +-1 beyond */
    x = x > c ? c : (x < -c ? -c : x);
    const float x2 = x * x;
    float p = -2.76076847742355e-16f;
    p = x2 * p + 2.00018790482477e-13f;
    p = x2 * p + -8.60467152213735e-11f;
    p = x2 * p + 5.12229709037114e-08f;
    p = x2 * p + 1.48572235717979e-05f;
    p = x2 * p + 6.37261928875436e-04f;
    p = x2 * p + 4.89352455891786e-03f;
    float q = 1.19825839466702e-06f;
    q = x2 * q + 1.18534705686654e-04f;
    q = x2 * q + 2.26843463243900e-03f;
    q = x2 * q + 4.89352518554385e-03f;
    return x * p / q;
}

/* y = act(y) in place for the tanh-based GELUs, B rows of N, vectorized by the compiler. (Without
 * -ffast-math it neither contracts nor reorders these operations, so the vector lanes and the
 * scalar remainder compute each element identically, whatever the row count.) */
static void gelu_rows(float *y, int64_t y_stride, int64_t B, int64_t N, int32_t act, int threads) {
    const int64_t chunk = 1024, chunks = (N + chunk - 1) / chunk;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < B * chunks; i++) {
        float *yb = y + (i / chunks) * y_stride;
        const int64_t n0 = (i % chunks) * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        if (act == A_GELU_TANH) {
            for (int64_t n = n0; n < n1; n++) {
                const float x = yb[n];
                yb[n] = 0.5f * x * (1.0f + tanh_fast(0.7978845608028654f * (x + 0.044715f * x * x * x)));
            }
        } else {
            for (int64_t n = n0; n < n1; n++) {
                const float x = yb[n];
                yb[n] = 0.5f * x * (1.0f + tanh_fast(x * 0.7978845608f * (1.0f + 0.044715f * x * x)));
            }
        }
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

#if defined(__AVX2__)
/* The sum of an AVX2 vector's 8 int32 lanes (the int8 dot products and the prompt GEMM). */
static inline int32_t hsum_epi32(__m256i a) {
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    return _mm_cvtsi128_si32(s4);
}
#endif

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
    int32_t s = hsum_epi32(acc);
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

/* ---------------------------------------------------------------------------------------- */
/* Several activation rows at once (B candidates, or the T tokens of a speculative step): the
 * kernels below take 4 weight rows x XB activation rows per pass, so each weight vector loaded
 * (and widened) feeds XB products. Every (weight row, activation row) pair keeps its own
 * accumulator and runs the same operations in the same order as when its activation row is
 * alone, so results never depend on how many rows a step has. The `nb` argument is a constant
 * at each call (see the switches): the compiler keeps the accumulators in registers.          */

#if defined(__AVX512F__) || VW == 1
#define XB 4
#else
#define XB 2  /* AVX2 has 16 vector registers */
#endif
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define DISPATCH_NB(nb, call) switch (nb) { \
    case 1: { enum { NB = 1 }; call; } break; \
    case 2: { enum { NB = 2 }; call; } break; \
    case 3: { enum { NB = 3 < XB ? 3 : XB }; call; } break; \
    default: { enum { NB = XB }; call; } break; }

#if I8_UNSIGNED_X
/* 4 int8 weight rows (K apart) x NB offset activation rows (K apart); int32 sums are exact. */
ALWAYS_INLINE void i8_rows(const int8_t *w0, int64_t K, const int8_t *xq, const int32_t *wsum, const int NB,
                           int32_t s[XB][4]) {
    __m512i acc[XB][4];
    for (int bb = 0; bb < NB; bb++) for (int r = 0; r < 4; r++) acc[bb][r] = _mm512_setzero_si512();
    for (int64_t i = 0; i < K; i += 64) {
        prefetch_next_block(w0, 4 * K, 4 * i, 256);
        __m512i wv[4];
        for (int r = 0; r < 4; r++) {
            wv[r] = _mm512_loadu_si512(w0 + r * K + i);
            /* Keep the weights in registers: folded into each vpdpbusd, they are loaded NB times. */
            if (NB > 1) __asm__("" : "+v"(wv[r]));
        }
        for (int bb = 0; bb < NB; bb++) {
            const __m512i xv = _mm512_loadu_si512((const uint8_t *)xq + bb * K + i);
            for (int r = 0; r < 4; r++) acc[bb][r] = _mm512_dpbusd_epi32(acc[bb][r], xv, wv[r]);
        }
    }
    for (int bb = 0; bb < NB; bb++)
        for (int r = 0; r < 4; r++) s[bb][r] = _mm512_reduce_add_epi32(acc[bb][r]) - 128 * wsum[r];
}
#define I8_ROWS_OK(K) ((K) % 64 == 0)
#elif defined(__AVX2__)
/* pmaddubsw multiplies unsigned by signed bytes into 16-bit pair sums: feed |w| and x with w's
 * sign (|w| * sign(w) x = w x). With |x|, |w| <= 127 a pair sum stays <= 32,258, short of
 * saturating, so the sums are exact; 32 products take 4 instructions where widening both
 * operands to 16 bits took twice as many. */
ALWAYS_INLINE void i8_rows(const int8_t *w0, int64_t K, const int8_t *xq, const int32_t *wsum, const int NB,
                           int32_t s[XB][4]) {
    (void)wsum;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[XB][4];
    for (int bb = 0; bb < NB; bb++) for (int r = 0; r < 4; r++) acc[bb][r] = _mm256_setzero_si256();
    for (int64_t i = 0; i < K; i += 32) {
        prefetch_next_block(w0, 4 * K, 4 * i, 128);
        for (int r = 0; r < 4; r++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w0 + r * K + i));
            const __m256i aw = _mm256_abs_epi8(wv);
            for (int bb = 0; bb < NB; bb++) {
                const __m256i xv = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xq + bb * K + i)), wv);
                acc[bb][r] = _mm256_add_epi32(acc[bb][r], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xv), ones));
            }
        }
    }
    for (int bb = 0; bb < NB; bb++)
        for (int r = 0; r < 4; r++) s[bb][r] = hsum_epi32(acc[bb][r]);
}
#define I8_ROWS_OK(K) ((K) % 32 == 0)
#else
ALWAYS_INLINE void i8_rows(const int8_t *w0, int64_t K, const int8_t *xq, const int32_t *wsum, const int NB,
                           int32_t s[XB][4]) {
    for (int bb = 0; bb < NB; bb++)
        for (int r = 0; r < 4; r++) s[bb][r] = dot_i8(w0 + r * K, (const void *)(xq + bb * K), K, wsum ? wsum[r] : 0);
}
#define I8_ROWS_OK(K) 1
#endif

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
        for (int64_t b0 = 0; b0 < B; b0 += XB) {
            const int64_t nb = B - b0 < XB ? B - b0 : XB;
            int32_t s[XB][4];
            if (n1 - n0 == 4 && I8_ROWS_OK(K)) {
                DISPATCH_NB(nb, i8_rows(W + n0 * K, K, xq + b0 * K, L->wsum ? L->wsum + n0 : NULL, NB, s))
            } else {
                for (int64_t bb = 0; bb < nb; bb++)
                    for (int64_t n = n0; n < n1; n++)
                        s[bb][n - n0] = dot_i8(W + n * K, (const void *)(xq + (b0 + bb) * K), K, L->wsum ? L->wsum[n] : 0);
            }
            for (int64_t bb = 0; bb < nb; bb++)
                for (int64_t n = n0; n < n1; n++)
                    store_out(L, n, (float)s[bb][n - n0] * xs[b0 + bb] * L->scale[n], y + (b0 + bb) * y_stride, act,
                              accumulate);
        }
    }
}

#if VW > 1
/* bf16 rows without shuffles: 2 * VW bf16 loaded as VW u32 lanes hold the even elements in their
 * low halves and the odd ones in their high halves, so `<< 16` and `& 0xFFFF0000` turn them into
 * two fp32 vectors; x is split into matching even/odd halves once per call. Per weight this is
 * half the instructions of widening 16-bit lanes one by one (vload), which left AVX2 bf16
 * decoding behind llama.cpp's f16. */
#define HAVE_BF16_PAIRS 1
#define BF16_CHUNK (2 * VW)
static void split_even_odd(const float *x, int64_t K, float *xp) {
    for (int64_t c = 0; c < K; c += BF16_CHUNK)
        for (int64_t j = 0; j < VW; j++) { xp[c + j] = x[c + 2 * j]; xp[c + VW + j] = x[c + 2 * j + 1]; }
}

ALWAYS_INLINE void bf16_pair(const uint16_t *p, vf *lo, vf *hi) {
#if defined(__AVX512F__)
    const __m512i wv = _mm512_loadu_si512(p);
    *lo = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
    *hi = _mm512_castsi512_ps(_mm512_and_si512(wv, _mm512_set1_epi32((int)0xFFFF0000u)));
#else
    const __m256i wv = _mm256_loadu_si256((const __m256i *)p);
    *lo = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
    *hi = _mm256_castsi256_ps(_mm256_and_si256(wv, _mm256_set1_epi32((int)0xFFFF0000u)));
#endif
}

/* `rows` (<= 4) bf16 weight rows x NB split activation rows (K apart). */
ALWAYS_INLINE void bf16_rows(const uint16_t *w0, int64_t rows, int64_t K, const float *xp, const int NB,
                             float s[XB][4]) {
    vf acc[XB][4];
    for (int bb = 0; bb < NB; bb++) for (int r = 0; r < 4; r++) acc[bb][r] = vzero();
    for (int64_t i = 0; i < K; i += BF16_CHUNK) {
        prefetch_next_block(w0, rows * K * 2, rows * i * 2, rows * BF16_CHUNK * 2);
        for (int r = 0; r < 4; r++) {
            if (r >= rows) break;
            vf lo, hi;
            bf16_pair(w0 + r * K + i, &lo, &hi);
            for (int bb = 0; bb < NB; bb++) {
                acc[bb][r] = vfma(lo, vload(xp + bb * K + i, T_F32, 0), acc[bb][r]);
                acc[bb][r] = vfma(hi, vload(xp + bb * K + i + VW, T_F32, 0), acc[bb][r]);
            }
        }
    }
    for (int bb = 0; bb < NB; bb++)
        for (int r = 0; r < rows; r++) s[bb][r] = vsum(acc[bb][r]);
}

static void linear_bf16(const Linear *L, const float *x, int64_t x_stride, float *y, int64_t y_stride,
                        int64_t B, int32_t act, int accumulate, int threads, float *xp) {
    const int64_t K = L->cols, N = L->rows;
    for (int64_t b = 0; b < B; b++) split_even_odd(x + b * x_stride, K, xp + b * K);
    const uint16_t *W = (const uint16_t *)L->weight;
    const int64_t blocks = (N + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t n0 = blk * 4, n1 = n0 + 4 < N ? n0 + 4 : N, rows = n1 - n0;
        for (int64_t b0 = 0; b0 < B; b0 += XB) {
            const int64_t nb = B - b0 < XB ? B - b0 : XB;
            float s[XB][4];
            DISPATCH_NB(nb, bf16_rows(W + n0 * K, rows, K, xp + b0 * K, NB, s))
            for (int64_t bb = 0; bb < nb; bb++)
                for (int64_t r = 0; r < rows; r++) store_out(L, n0 + r, s[bb][r], y + (b0 + bb) * y_stride, act, accumulate);
        }
    }
}
#else
#define HAVE_BF16_PAIRS 0
#define BF16_CHUNK 1
#endif

/* 4 weight rows of wtype (K apart) x NB fp32 activation rows (x_stride apart). */
ALWAYS_INLINE void float_rows(const char *w0, int32_t wtype, int64_t K, const float *x, int64_t x_stride,
                              const int NB, float s[XB][4]) {
    const int64_t rb = K * (int64_t)type_size(wtype);
    const void *w[4] = {w0, w0 + rb, w0 + 2 * rb, w0 + 3 * rb};
    vf acc[XB][4];
    for (int bb = 0; bb < NB; bb++) for (int r = 0; r < 4; r++) acc[bb][r] = vzero();
    int64_t i = 0;
    /* No software prefetch here: for fp32 rows (32 KB per block) it measured 20-25% slower
     * than the hardware prefetcher alone. */
    for (; i + VW <= K; i += VW) {
        vf wv[4];
        for (int r = 0; r < 4; r++) {
            wv[r] = vload(w[r], wtype, i);
#if defined(__AVX512F__) || defined(__AVX2__)
            if (NB > 1) __asm__("" : "+v"(wv[r]));  /* as in i8_rows: load each weight once */
#endif
        }
        for (int bb = 0; bb < NB; bb++) {
            const vf xv = vload(x + bb * x_stride, T_F32, i);
            for (int r = 0; r < 4; r++) acc[bb][r] = vfma(wv[r], xv, acc[bb][r]);
        }
    }
    for (int bb = 0; bb < NB; bb++) for (int r = 0; r < 4; r++) s[bb][r] = vsum(acc[bb][r]);
    for (; i < K; i++)
        for (int bb = 0; bb < NB; bb++)
            for (int r = 0; r < 4; r++) s[bb][r] += load1(w[r], wtype, i) * x[bb * x_stride + i];
}

/* ---------------------------------------------------------------------------------------- */
/* y[b] = act(W x[b] + bias) (+ y[b] when accumulate), for B rows; x rows are x_stride apart.  */

static void linear_rows(const Linear *L, const float *x, int64_t x_stride, float *y, int64_t y_stride,
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
    if (L->wtype == T_BF16 && K % BF16_CHUNK == 0) {
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
        for (int64_t b0 = 0; b0 < B; b0 += XB) {
            const int64_t nb = B - b0 < XB ? B - b0 : XB;
            float s[XB][4];
            if (n1 - n0 == 4) {
                /* A constant weight type too, so the loop holds no type switch. */
                const char *w0 = W + n0 * K * wsize;
                const float *xb = x + b0 * x_stride;
                switch (L->wtype) {
                case T_F32: DISPATCH_NB(nb, float_rows(w0, T_F32, K, xb, x_stride, NB, s)) break;
                case T_BF16: DISPATCH_NB(nb, float_rows(w0, T_BF16, K, xb, x_stride, NB, s)) break;
                default: DISPATCH_NB(nb, float_rows(w0, T_F16, K, xb, x_stride, NB, s)) break;
                }
            } else {
                for (int64_t bb = 0; bb < nb; bb++)
                    for (int64_t n = n0; n < n1; n++) s[bb][n - n0] = dot(W + n * K * wsize, L->wtype, x + (b0 + bb) * x_stride, K);
            }
            for (int64_t bb = 0; bb < nb; bb++)
                for (int64_t n = n0; n < n1; n++) store_out(L, n, s[bb][n - n0], y + (b0 + bb) * y_stride, act, accumulate);
        }
    }
}

/* linear_rows, with the tanh GELUs applied in a vectorized pass over the finished rows. */
static void linear(const Linear *L, const float *x, int64_t x_stride, float *y, int64_t y_stride,
                   int64_t B, int32_t act, int accumulate, int threads) {
    if ((act == A_GELU_TANH || act == A_GELU_FAST) && !accumulate) {
        linear_rows(L, x, x_stride, y, y_stride, B, A_NONE, 0, threads);
        gelu_rows(y, y_stride, B, L->rows, act, threads);
    } else {
        linear_rows(L, x, x_stride, y, y_stride, B, act, accumulate, threads);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Attention of T new queries per cache row: query t of row b sits at position pos + t and     */
/* attends positions [0, pos + t] of that row (causal). Query (b, t) runs exactly the         */
/* arithmetic a one-token step at pos + t runs, so a T-token step equals T one-token steps.   */

#if VW == 16
#define VOP(op) _mm512_##op
#define VCAST_PS(i) _mm512_castsi512_ps(i)
#define VFLOOR(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)
typedef __m512i vi;
#elif VW == 8
#define VOP(op) _mm256_##op
#define VCAST_PS(i) _mm256_castsi256_ps(i)
#define VFLOOR(x) _mm256_floor_ps(x)
typedef __m256i vi;
#endif
#if VW > 1
static inline vf vsub(vf a, vf b) { return VOP(sub_ps)(a, b); }

/* exp of VW lanes (Cephes' expf: 2^n times a degree-5 polynomial of the remainder, ~1 ulp).
 * Inputs below -87.3 give ~1e-38 instead of a denormal or 0, which no softmax sum can tell
 * apart. Scalar expf cost ~12 ns a call: 2.3 ms per token at SantaCoder's shape and 500
 * positions. */
static inline vf vexp(vf x) {
    x = VOP(min_ps)(VOP(max_ps)(x, vset(-87.3f)), vset(88.3f));
    const vf n = VFLOOR(VOP(fmadd_ps)(x, vset(1.44269504088896341f), vset(0.5f)));
    x = VOP(fnmadd_ps)(n, vset(0.693359375f), x);
    x = VOP(fnmadd_ps)(n, vset(-2.12194440e-4f), x);
    vf y = vset(1.9875691500e-4f);
    y = VOP(fmadd_ps)(y, x, vset(1.3981999507e-3f));
    y = VOP(fmadd_ps)(y, x, vset(8.3334519073e-3f));
    y = VOP(fmadd_ps)(y, x, vset(4.1665795894e-2f));
    y = VOP(fmadd_ps)(y, x, vset(1.6666665459e-1f));
    y = VOP(fmadd_ps)(y, x, vset(5.0000001201e-1f));
    y = VOP(add_ps)(VOP(fmadd_ps)(y, VOP(mul_ps)(x, x), x), vset(1.0f));
    const vi e = VOP(slli_epi32)(VOP(add_epi32)(VOP(cvtps_epi32)(n), VOP(set1_epi32)(127)), 23);
    return VOP(mul_ps)(y, VCAST_PS(e));
}
#endif

/* Softmax of one head's scores over [0, S) in place, unnormalized; returns 1 / their sum. */
static inline float softmax_unscaled(float *sc, int64_t S) {
    float mx = -INFINITY;
    for (int64_t s = 0; s < S; s++) mx = sc[s] > mx ? sc[s] : mx;
#if VW > 1
    int64_t s = 0;
    for (; s + VW <= S; s += VW) vstore(sc + s, vexp(vsub(vload(sc + s, T_F32, 0), vset(mx))));
    if (s < S) {  /* the tail through the same vector code, so no element depends on S % VW */
        float tmp[VW] = {0};
        for (int64_t j = s; j < S; j++) tmp[j - s] = sc[j];
        vstore(tmp, vexp(vsub(vload(tmp, T_F32, 0), vset(mx))));
        for (int64_t j = s; j < S; j++) sc[j] = tmp[j - s];
    }
    float total = 0.0f;
    for (s = 0; s < S; s++) total += sc[s];
#else
    float total = 0.0f;
    for (int64_t s = 0; s < S; s++) { sc[s] = expf(sc[s] - mx); total += sc[s]; }
#endif
    return 1.0f / total;
}

/* o[0:hd] = sum over s < S of sc[s] * V[s] for one head (the reference order: s ascending). */
static inline void weigh_values(const char *V, int32_t ct, size_t cs, int64_t hd, const float *sc, int64_t S, float *o) {
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
}

/* The same for 8 heads at once: each value vector is loaded (and widened) once for all 8, and
 * every output element still accumulates s ascending, exactly as weigh_values does. */
static inline void weigh_values8(const char *V, int32_t ct, size_t cs, int64_t hd, const float *const sc[8], int64_t S,
                                 float *const o[8]) {
    int64_t d = 0;
    for (; d + VW <= hd; d += VW) {
        vf acc[8];
        for (int j = 0; j < 8; j++) acc[j] = vzero();
        for (int64_t s = 0; s < S; s++) {
            const vf v = vload(V + s * hd * cs, ct, d);
            for (int j = 0; j < 8; j++) acc[j] = vfma(vset(sc[j][s]), v, acc[j]);
        }
        for (int j = 0; j < 8; j++) vstore(o[j] + d, acc[j]);
    }
    for (; d < hd; d++)
        for (int j = 0; j < 8; j++) {
            float acc = 0.0f;
            for (int64_t s = 0; s < S; s++) acc += sc[j][s] * load1(V + s * hd * cs, ct, d);
            o[j][d] = acc;
        }
}

#if VW == 16
/* Scores of up to 16 consecutive keys (n of them, keys K[j], hd = 16 * C apart) for one query
 * head: q stays in registers and the 16 dot products are summed across lanes together by a
 * transpose tree, where a dot product per key paid a full horizontal sum each (2-3x slower).
 * Missing keys (j >= n) are never read; every key's arithmetic is the same whatever n is. */
ALWAYS_INLINE void scores16(const char *K, const int32_t ct, const int64_t C, const float *q, int64_t n,
                            float scale, float *out) {
    const size_t row = (size_t)(16 * C) * type_size(ct);
    __m512 qv[8], acc[16];
    for (int64_t c = 0; c < C; c++) qv[c] = _mm512_loadu_ps(q + 16 * c);
    for (int j = 0; j < 16; j++) {
        acc[j] = _mm512_setzero_ps();
        if (j < n)
            for (int64_t c = 0; c < C; c++) acc[j] = _mm512_fmadd_ps(qv[c], vload(K + j * row, ct, 16 * c), acc[j]);
    }
    __m512 t[8], u[4];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: a0+a2, b0+b2, a1+a3, b1+b3 */
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]), _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* per 128-bit lane: the lane's sums of keys 4i .. 4i+3 */
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
    const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
    const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
    const __m512 r = _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
    _mm512_mask_storeu_ps(out, (__mmask16)((1u << n) - 1u), _mm512_mul_ps(r, _mm512_set1_ps(scale)));
}

/* scores16 with the cache type and head size as constants (hd = 16, 32, 64 or 128). */
static void scores16_any(const char *K, int32_t ct, int64_t hd, const float *q, int64_t n, float scale, float *out) {
#define SCORES_C(C_) switch (ct) { \
    case T_F32: scores16(K, T_F32, C_, q, n, scale, out); break; \
    case T_BF16: scores16(K, T_BF16, C_, q, n, scale, out); break; \
    default: scores16(K, T_F16, C_, q, n, scale, out); break; }
    switch (hd) {
    case 16: SCORES_C(1) break;
    case 32: SCORES_C(2) break;
    case 64: SCORES_C(4) break;
    default: SCORES_C(8) break;
    }
#undef SCORES_C
}
#define FAST_SCORES(hd) ((hd) == 16 || (hd) == 32 || (hd) == 64 || (hd) == 128)
#else
#define FAST_SCORES(hd) 0
static void scores16_any(const char *K, int32_t ct, int64_t hd, const float *q, int64_t n, float scale, float *out) {
    (void)K; (void)ct; (void)hd; (void)q; (void)n; (void)scale; (void)out;
}
#endif

static void attention(const Model *m, int64_t layer, const float *qkv, int64_t qkv_stride, float *out,
                      float *scores, int64_t B, int64_t T, int64_t pos, int threads) {
    const int64_t nh = m->n_head, kvh = m->kv_heads, hd = m->head_dim, g = nh / kvh;
    const int32_t ct = m->cache_type;
    const size_t cs = type_size(ct);
    const int64_t head_stride = m->cache_len * hd;  /* elements between kv heads */
    /* Work items: (row, kv head, slice of its query heads). MQA has one kv head, so its g query
     * heads are split between threads; a slice reads each cached key and value once per new
     * token for all its heads. */
    const int64_t per_slice = g >= threads ? (g + threads - 1) / threads : 1;
    const int64_t slices = (g + per_slice - 1) / per_slice;
    #pragma omp parallel for schedule(static) num_threads(threads) collapse(2)
    for (int64_t bk = 0; bk < B * kvh; bk++) {
        for (int64_t sl = 0; sl < slices; sl++) {
            const int64_t b = bk / kvh, kv = bk % kvh;
            const int64_t h0 = kv * g + sl * per_slice, h1 = h0 + per_slice < (kv + 1) * g ? h0 + per_slice : (kv + 1) * g;
            const int64_t base = ((layer * m->cache_batch + b) * kvh + kv) * head_stride;
            const char *K = (const char *)m->k_cache + base * cs, *V = (const char *)m->v_cache + base * cs;
            /* Scores: each block of cached keys is read once for every new token and head. */
            const int64_t blk = FAST_SCORES(hd) ? 16 : 1;
            for (int64_t s0 = 0; s0 < pos + T; s0 += blk) {
                for (int64_t t = s0 > pos ? s0 - pos : 0; t < T; t++) {
                    const int64_t r = b * T + t, S = pos + t + 1, n = S - s0 < blk ? S - s0 : blk;
                    const float *qrow = qkv + r * qkv_stride;
                    float *sc_r = scores + r * nh * m->cache_len;
                    for (int64_t h = h0; h < h1; h++) {
                        /* MQA columns: [q (nh*hd) | k | v]; MHA: per head (q, k, v). */
                        const float *q = m->multi_query ? qrow + h * hd : qrow + h * 3 * hd;
                        if (FAST_SCORES(hd))
                            scores16_any(K + s0 * hd * cs, ct, hd, q, n, m->attn_scale, sc_r + h * m->cache_len + s0);
                        else
                            sc_r[h * m->cache_len + s0] = dot(K + s0 * hd * cs, ct, q, hd) * m->attn_scale;
                    }
                }
            }
            for (int64_t t = 0; t < T; t++) {
                const int64_t r = b * T + t, S = pos + t + 1;
                float *sc_r = scores + r * nh * m->cache_len;
                float *o_r = out + r * m->n_embd;
                int64_t h = h0;
                for (; h + 8 <= h1; h += 8) {
                    float inv[8];
                    const float *sc[8];
                    float *o[8];
                    for (int j = 0; j < 8; j++) {
                        inv[j] = softmax_unscaled(sc_r + (h + j) * m->cache_len, S);
                        sc[j] = sc_r + (h + j) * m->cache_len;
                        o[j] = o_r + (h + j) * hd;
                    }
                    weigh_values8(V, ct, cs, hd, sc, S, o);
                    for (int j = 0; j < 8; j++) for (int64_t d = 0; d < hd; d++) o[j][d] *= inv[j];
                }
                for (; h < h1; h++) {
                    const float inv = softmax_unscaled(sc_r + h * m->cache_len, S);
                    float *o = o_r + h * hd;
                    weigh_values(V, ct, cs, hd, sc_r + h * m->cache_len, S, o);
                    for (int64_t d = 0; d < hd; d++) o[d] *= inv;
                }
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

/* fp32 work space santa_decode needs for `rows` = B * T new tokens. */
int64_t santa_workspace_floats(const Model *m, int64_t rows) {
    const int64_t qkv = m->multi_query ? m->n_embd + 2 * m->head_dim : 3 * m->n_embd;
    return rows * (3 * m->n_embd + qkv + m->inner + m->n_head * m->cache_len);
}

/* One decode step of T new tokens for each cache row b < B: token ids[b * T + t] at position
 * pos + t; logits (B * T, vocab) fp32. T = 1 is plain decoding; T > 1 verifies drafted tokens
 * (speculative decoding) reading each weight once for all B * T tokens. Every token is computed
 * with the same arithmetic, in the same order, whatever B and T: its logits and the keys and
 * values it writes are bit for bit those of one-token steps, so verified output equals plain
 * greedy output exactly. */
void santa_decode(const Model *m, const int64_t *ids, int64_t B, int64_t T, int64_t pos, float *logits,
                  float *work, int32_t threads) {
    const int64_t d = m->n_embd, qkv_n = m->layers[0].c_attn.rows, inner = m->inner, R = B * T;
    float *x = work, *h = x + R * d, *att = h + R * d, *qkv = att + R * d, *mlp = qkv + R * qkv_n;
    float *scores = mlp + R * inner;
    const size_t ts = type_size(m->wte_type), ps = type_size(m->wpe_type);
    for (int64_t r = 0; r < R; r++) {
        const char *tok = (const char *)m->wte + ids[r] * d * ts, *p = (const char *)m->wpe + (pos + r % T) * d * ps;
        const float s = m->wte_scale ? m->wte_scale[ids[r]] : 1.0f;  /* x * 1.0f is exact */
        for (int64_t i = 0; i < d; i++) x[r * d + i] = load1(tok, m->wte_type, i) * s + load1(p, m->wpe_type, i);
    }
    for (int64_t l = 0; l < m->n_layer; l++) {
        const Layer *L = &m->layers[l];
        for (int64_t r = 0; r < R; r++) layer_norm(x + r * d, L->ln_1_w, L->ln_1_b, h + r * d, d, m->eps);
        linear(&L->c_attn, h, d, qkv, qkv_n, R, A_NONE, 0, threads);
        /* Every new key/value is in the cache before any query reads it. */
        for (int64_t r = 0; r < R; r++) store_kv(m, l, qkv + r * qkv_n, r / T, pos + r % T);
        attention(m, l, qkv, qkv_n, att, scores, B, T, pos, threads);
        linear(&L->attn_proj, att, d, x, d, R, A_NONE, 1, threads);
        for (int64_t r = 0; r < R; r++) layer_norm(x + r * d, L->ln_2_w, L->ln_2_b, h + r * d, d, m->eps);
        linear(&L->c_fc, h, d, mlp, inner, R, m->activation, 0, threads);
        linear(&L->mlp_proj, mlp, inner, x, d, R, A_NONE, 1, threads);
    }
    for (int64_t r = 0; r < R; r++) layer_norm(x + r * d, m->ln_f_w, m->ln_f_b, h + r * d, d, m->eps);
    linear(&m->lm_head, h, d, logits, m->vocab, R, A_NONE, 0, threads);
}

/* ---------------------------------------------------------------------------------------- */
/* Prompt passes of int8 models: y[M, N] = (Xq Wq^T) * x_scale * w_scale + bias for M tokens at
 * once, a GEMM. PyTorch's int8 GEMM (torch._int_mm) is fast only where it finds VNNI; on
 * AVX2-only CPUs a 128-token prompt took 15x fp32's time. Here the activations are quantized
 * per row exactly as quantize.Int8Linear does and the int32 sums are exact, so the result is
 * bit for bit what every other int8 path computes; which path runs is measured per CPU
 * (santacli/prompt_gemm.py).
 *
 * Blocking: a thread takes a group of weight rows and packs them once (widened to int16 where
 * the multiply is pmaddwd, zero-padded to whole vectors and whole panels of G_NR rows). Then,
 * per block of KC columns and MC token rows, each panel's 16 KB slice stays in L1 while the
 * token rows stream past it from L2, G_MR at a time: each loaded vector feeds G_MR or G_NR
 * products. Sums cross the KC blocks in an int32 buffer; the fp32 epilogue runs once.        */

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* vpdpbusd: unsigned x signed bytes, 64 products a step; x is fed as x + 128 (see dot_i8). */
#define G_ISA "avx512-vnni"
#define G_KSTEP 64
#define G_MR_DEFAULT 2  /* tiles measured on a Zen 5 EPYC, 128 x 2048 x 8192: 2x4 6.2 ms, 4x4 6.8 */
#define G_NR_DEFAULT 4
#define G_X_OFFSET 128
typedef uint8_t gx_t;
typedef int8_t gw_t;
typedef __m512i gacc;
ALWAYS_INLINE gacc g_zero(void) { return _mm512_setzero_si512(); }
ALWAYS_INLINE gacc g_load(const void *p) { return _mm512_loadu_si512(p); }
ALWAYS_INLINE gacc g_mac(gacc acc, gacc x, gacc w) { return _mm512_dpbusd_epi32(acc, x, w); }
ALWAYS_INLINE int32_t g_sum(gacc a) { return _mm512_reduce_add_epi32(a); }
#elif defined(__AVX512BW__)
/* pmaddwd on int16 pairs: exact, since |x|, |w| <= 127 keep each pair sum far from overflow. */
#define G_ISA "avx512"
#define G_KSTEP 32
#define G_MR_DEFAULT 4  /* 4x4 11.2 ms, 8x2 13.9, 4x2 15.0 */
#define G_NR_DEFAULT 4
#define G_X_OFFSET 0
typedef int16_t gx_t;
typedef int16_t gw_t;
typedef __m512i gacc;
ALWAYS_INLINE gacc g_zero(void) { return _mm512_setzero_si512(); }
ALWAYS_INLINE gacc g_load(const void *p) { return _mm512_loadu_si512(p); }
ALWAYS_INLINE gacc g_mac(gacc acc, gacc x, gacc w) { return _mm512_add_epi32(acc, _mm512_madd_epi16(x, w)); }
ALWAYS_INLINE int32_t g_sum(gacc a) { return _mm512_reduce_add_epi32(a); }
#elif defined(__AVX2__)
#define G_ISA "avx2"
#define G_KSTEP 16
/* 4 token rows x 2 weight rows: 8 accumulators, 2 weight vectors and temporaries fit AVX2's 16
 * registers; measured 15.2 ms against 2x4 26.0, 3x2 17.1, 8x1 21.3, 4x3 25.8 (spills). */
#define G_MR_DEFAULT 4
#define G_NR_DEFAULT 2
#define G_X_OFFSET 0
typedef int16_t gx_t;
typedef int16_t gw_t;
typedef __m256i gacc;
ALWAYS_INLINE gacc g_zero(void) { return _mm256_setzero_si256(); }
ALWAYS_INLINE gacc g_load(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
ALWAYS_INLINE gacc g_mac(gacc acc, gacc x, gacc w) { return _mm256_add_epi32(acc, _mm256_madd_epi16(x, w)); }
ALWAYS_INLINE int32_t g_sum(gacc a) { return hsum_epi32(a); }
#else
#define G_ISA "plain C"
#define G_KSTEP 1
#define G_MR_DEFAULT 4
#define G_NR_DEFAULT 4
#define G_X_OFFSET 0
typedef int8_t gx_t;
typedef int8_t gw_t;
typedef int32_t gacc;
ALWAYS_INLINE gacc g_zero(void) { return 0; }
ALWAYS_INLINE gacc g_load(const void *p) { return *(const int8_t *)p; }
ALWAYS_INLINE gacc g_mac(gacc acc, gacc x, gacc w) { return acc + x * w; }
ALWAYS_INLINE int32_t g_sum(gacc a) { return a; }
#endif
#ifndef G_MR  /* -DG_MR=... / -DG_NR=... override the tile for measurements */
#define G_MR G_MR_DEFAULT
#endif
#ifndef G_NR
#define G_NR G_NR_DEFAULT
#endif

/* The int32 sums over kc columns of MR token rows (xp, ld apart) x G_NR packed weight rows
 * (wp, ld apart). */
ALWAYS_INLINE void g_tile(const gx_t *xp, const gw_t *wp, int64_t ld, int64_t kc, const int MR,
                          int32_t out[G_MR][G_NR]) {
    gacc acc[G_MR][G_NR];
    for (int m = 0; m < MR; m++) for (int r = 0; r < G_NR; r++) acc[m][r] = g_zero();
    for (int64_t k = 0; k < kc; k += G_KSTEP) {
        gacc wv[G_NR];
        for (int r = 0; r < G_NR; r++) {
            wv[r] = g_load(wp + r * ld + k);
#if defined(__AVX2__) || defined(__AVX512F__)
            __asm__("" : "+v"(wv[r]));  /* as in i8_rows: keep the weights in registers */
#endif
        }
        for (int m = 0; m < MR; m++) {
            const gacc xv = g_load(xp + m * ld + k);
            for (int r = 0; r < G_NR; r++) acc[m][r] = g_mac(acc[m][r], xv, wv[r]);
        }
    }
    for (int m = 0; m < MR; m++) for (int r = 0; r < G_NR; r++) out[m][r] = g_sum(acc[m][r]);
}

static void g_tile_any(const gx_t *xp, const gw_t *wp, int64_t ld, int64_t kc, int64_t mr,
                       int32_t out[G_MR][G_NR]) {
    switch (mr) {
    case 1: g_tile(xp, wp, ld, kc, 1, out); break;
    case 2: g_tile(xp, wp, ld, kc, 2 < G_MR ? 2 : G_MR, out); break;
    case 3: g_tile(xp, wp, ld, kc, 3 < G_MR ? 3 : G_MR, out); break;
    default: g_tile(xp, wp, ld, kc, G_MR, out); break;
    }
}

/* Weight rows [n0, n0 + rows) into whole zero-padded panels of G_NR rows x kp. */
static void g_pack_weights(const int8_t *W, int64_t K, int64_t n0, int64_t rows, int64_t kp, gw_t *wp) {
    const int64_t padded = (rows + G_NR - 1) / G_NR * G_NR;
    for (int64_t r = 0; r < padded; r++) {
        gw_t *dst = wp + r * kp;
        const int8_t *src = W + (n0 + r) * K;
        const int64_t n = r < rows ? K : 0;
        for (int64_t k = 0; k < n; k++) dst[k] = (gw_t)src[k];
        for (int64_t k = n; k < kp; k++) dst[k] = 0;
    }
}

/* The fp32 work space santa_linear_i8_prompt needs, in bytes (the caller allocates it once). */
int64_t santa_prompt_workspace_bytes(int64_t M, int64_t K) {
    const int64_t kp = (K + G_KSTEP - 1) / G_KSTEP * G_KSTEP;
    return M * kp * (int64_t)sizeof(gx_t) + M * (int64_t)sizeof(float) + M * K + 64;
}

/* Returns 0, or -1 when a weight buffer could not be allocated (y is then incomplete). */
int32_t santa_linear_i8_prompt(const Linear *L, const float *x, int64_t M, float *y, void *work, int32_t threads) {
    const int64_t K = L->cols, N = L->rows, kp = (K + G_KSTEP - 1) / G_KSTEP * G_KSTEP;
    gx_t *xp = (gx_t *)work;
    float *xs = (float *)(xp + M * kp);
    int8_t *q = (int8_t *)(xs + M);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t m = 0; m < M; m++) {
        xs[m] = quantize_row(x + m * K, K, q + m * K);
        gx_t *dst = xp + m * kp;
        for (int64_t k = 0; k < K; k++) dst[k] = (gx_t)((int32_t)q[m * K + k] + G_X_OFFSET);
        for (int64_t k = K; k < kp; k++) dst[k] = (gx_t)G_X_OFFSET;  /* meets zero weights */
    }
    /* Blocks: a panel's slice of KC columns (16 KB) stays in L1 while MC token rows (256 KB
     * of them) stream past it from L2; a thread's group of weight rows is packed once. */
    const int64_t KC = (16 * 1024 / (G_NR * (int64_t)sizeof(gw_t))) / G_KSTEP * G_KSTEP;
    int64_t MC = (256 * 1024 / (KC * (int64_t)sizeof(gx_t))) / G_MR * G_MR;
    if (MC < G_MR) MC = G_MR;
    int64_t group = 16 * G_NR;
    while (group > G_NR && (N + group - 1) / group < 4 * threads) group -= G_NR;  /* work for every thread */
    const int64_t groups = (N + group - 1) / group;
    const int8_t *W = (const int8_t *)L->weight;
    int32_t failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        gw_t *wp = aligned_alloc(64, (size_t)((group * kp * (int64_t)sizeof(gw_t) + 63) / 64 * 64));
        int32_t *acc = malloc((size_t)(M * group) * sizeof(int32_t));  /* sums across the KC blocks */
        if (!wp || !acc) {
            #pragma omp atomic write
            failed = -1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t g = 0; g < groups; g++) {
            if (!wp || !acc) continue;
            const int64_t n0 = g * group, rows = n0 + group < N ? group : N - n0;
            g_pack_weights(W, K, n0, rows, kp, wp);
            for (int64_t k0 = 0; k0 < kp; k0 += KC) {
                const int64_t kc = kp - k0 < KC ? kp - k0 : KC;
                for (int64_t mc0 = 0; mc0 < M; mc0 += MC) {
                    const int64_t mc1 = mc0 + MC < M ? mc0 + MC : M;
                    for (int64_t p = 0; p < rows; p += G_NR) {
                        const int64_t nr = rows - p < G_NR ? rows - p : G_NR;
                        for (int64_t m0 = mc0; m0 < mc1; m0 += G_MR) {
                            const int64_t mr = mc1 - m0 < G_MR ? mc1 - m0 : G_MR;
                            int32_t s[G_MR][G_NR];
                            g_tile_any(xp + m0 * kp + k0, wp + p * kp + k0, kp, kc, mr, s);
                            for (int64_t m = 0; m < mr; m++) {
                                int32_t *am = acc + (m0 + m) * group + p;
                                for (int64_t r = 0; r < nr; r++) am[r] = k0 ? am[r] + s[m][r] : s[m][r];
                            }
                        }
                    }
                }
            }
            for (int64_t m = 0; m < M; m++) {
                float *ym = y + m * N;
                for (int64_t r = 0; r < rows; r++) {
                    const int64_t n = n0 + r;
                    const int32_t a = acc[m * group + r], sum = G_X_OFFSET ? a - G_X_OFFSET * L->wsum[n] : a;
                    float v = (float)sum * xs[m] * L->scale[n];
                    if (L->bias) v += L->bias[n];
                    ym[n] = v;
                }
            }
        }
        free(wp);
        free(acc);
    }
    return failed;
}

/* ---------------------------------------------------------------------------------------- */
/* Loading an int8 model: each weight row to int8 with scale absmax/127 (round half to even,
 * clamped to +-127) and the sum of its int8 values, exactly as quantize.quantize_rows does in
 * PyTorch, where seven tensor passes per chunk made quantizing most of an int8 load (and slower
 * still with AVX2 kernels). One pass per row here, the rows split between threads.           */

#define QUANTIZE_ROW(T, LOAD) do { \
    const T *src = (const T *)w + r * cols; \
    float mx = 0.0f; \
    for (int64_t i = 0; i < cols; i++) { const float a = fabsf(LOAD(src[i])); mx = a > mx ? a : mx; } \
    const float s = (mx > 1e-12f ? mx : 1e-12f) / 127.0f; \
    int32_t sum = 0; \
    for (int64_t i = 0; i < cols; i++) { \
        float v = nearbyintf(LOAD(src[i]) / s); \
        v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v); \
        dst[i] = (int8_t)v; \
        sum += dst[i]; \
    } \
    scale[r] = s; \
    row_sum[r] = sum; \
} while (0)
#define AS_F32(v) (v)

void santa_quantize_rows(const void *w, int32_t wtype, int64_t rows, int64_t cols, int8_t *q, float *scale,
                         int32_t *row_sum, int32_t threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        int8_t *dst = q + r * cols;
        switch (wtype) {
        case T_F32: QUANTIZE_ROW(float, AS_F32); break;
        case T_BF16: QUANTIZE_ROW(uint16_t, bf16_to_f32); break;
        default: QUANTIZE_ROW(uint16_t, f16_to_f32); break;
        }
    }
}

/* The instruction set of the prompt GEMM above, for `santa info`. */
const char *santa_prompt_isa(void) { return G_ISA; }

/* The SIMD width this build uses (16: AVX-512, 8: AVX2, 1: plain C), for `santa info`. */
int32_t santa_simd_width(void) { return VW; }
