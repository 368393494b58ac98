/* Fused dequantize-matmul for packed weight formats, CPU, few activation rows (decode).
 *
 *   Y[m, n] = sum_k X[m, k] * W[n, k]        X: [M, K] fp32 or bf16, W: packed rows, Y: [M, N] like X
 *
 * W stays in its stored layout (GGUF blocks as llama.cpp writes them; mlx affine / MXFP4 codes with
 * separate scales), one row per output.  Each block of a row is dequantized into a small float
 * buffer and dotted with the M activation rows, so the weights are read once per call and never
 * materialized.  Block layouts and formulas: kimiq/quant/dequant.py (the torch reference these
 * kernels are tested against) and ../shared/reference/quantization-formats.md sections 1-3.
 *
 * Threads: OpenMP over output rows (the process's libgomp, which torch already loaded).
 * Built at first use by kimiq/ops/qmatmul.py with the host compiler (-O3 -march=native).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define MMAX 16
#define QK_K 256

static inline float f16_to_f32(const uint8_t *p) {
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
}

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);  /* NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static float E8M0_HALF[256];  /* 2^(e-128): MXFP4 codes are stored doubled (kvalues 0..12) */

static void init_tables(void) {
    static int done = 0;
    if (done) return;
    for (int e = 0; e < 256; e++) E8M0_HALF[e] = ldexpf(1.0f, e - 128);
    done = 1;
}

/* ------------------------------------------------------------------ block decoders
 * decode(block, q, sc, mn): integer codes q[QK] and, per sub-block j of S weights, scale sc[j] and
 * min mn[j] such that w = sc[j] * q - mn[j] (mn unused by formats without a min). */

static inline void dec_q8_0(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    (void)mn;
    sc[0] = f16_to_f32(b);
    memcpy(q, b + 2, 32);
}

static const int8_t E2M1X2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};  /* doubled E2M1 */
static const int8_t NIBBLE_M8[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};  /* q4_0: nibble - 8 */

/* 16 packed bytes -> 32 codes: lo[j] = T[b[j] & 15], hi[j] = T[b[j] >> 4] (pshufb where available) */
static inline void nibble_lut(const uint8_t *b, const int8_t *T, int8_t *lo, int8_t *hi) {
#if defined(__AVX2__) || defined(__SSSE3__)
    const __m128i t = _mm_loadu_si128((const __m128i *)T), m = _mm_set1_epi8(15);
    const __m128i v = _mm_loadu_si128((const __m128i *)b);
    _mm_storeu_si128((__m128i *)lo, _mm_shuffle_epi8(t, _mm_and_si128(v, m)));
    _mm_storeu_si128((__m128i *)hi, _mm_shuffle_epi8(t, _mm_and_si128(_mm_srli_epi16(v, 4), m)));
#else
    for (int j = 0; j < 16; j++) {
        lo[j] = T[b[j] & 15];
        hi[j] = T[b[j] >> 4];
    }
#endif
}

static inline void dec_q4_0(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    (void)mn;
    sc[0] = f16_to_f32(b);
    nibble_lut(b + 2, NIBBLE_M8, q, q + 16);  /* byte stores then wide loads stall store forwarding */
}

static inline void dec_mxfp4(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    (void)mn;
    sc[0] = E8M0_HALF[b[0]];
    nibble_lut(b + 1, E2M1X2, q, q + 16);
}

static inline void q5_codes(const uint8_t *qh4, const uint8_t *qs, int8_t *q, int off) {
    uint32_t qh;
    memcpy(&qh, qh4, 4);
#if defined(__AVX2__) || defined(__SSSE3__)
    /* bit j of qh -> 16 in byte j (lo half: bits 0-15, hi half: 16-31); vector stores only, as nibble_lut */
    const __m128i sel = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
    const __m128i h = _mm_cvtsi32_si128((int)qh), m = _mm_set1_epi8(15), sixteen = _mm_set1_epi8(16);
    __m128i bl = _mm_shuffle_epi8(h, _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
    __m128i bh = _mm_shuffle_epi8(h, _mm_setr_epi8(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    bl = _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(bl, sel), sel), sixteen);
    bh = _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(bh, sel), sel), sixteen);
    const __m128i v = _mm_loadu_si128((const __m128i *)qs), o = _mm_set1_epi8((char)off);
    _mm_storeu_si128((__m128i *)q, _mm_sub_epi8(_mm_or_si128(_mm_and_si128(v, m), bl), o));
    _mm_storeu_si128((__m128i *)(q + 16), _mm_sub_epi8(_mm_or_si128(_mm_and_si128(_mm_srli_epi16(v, 4), m), bh), o));
#else
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)(((qs[j] & 0xF) | (((qh >> j) & 1) << 4)) - off);
        q[j + 16] = (int8_t)(((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - off);
    }
#endif
}

static inline void dec_q5_0(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    (void)mn;
    sc[0] = f16_to_f32(b);
    q5_codes(b + 2, b + 6, q, 16);
}

static inline void dec_q5_1(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    sc[0] = f16_to_f32(b);
    mn[0] = -f16_to_f32(b + 2);  /* w = d*q + m */
    q5_codes(b + 4, b + 8, q, 0);
}

static inline void crumbs(const uint8_t *qs, int8_t *q) {  /* element 128h + 32s + l = (qs[32h + l] >> 2s) & 3 */
    for (int h = 0; h < 2; h++)
        for (int s = 0; s < 4; s++)
            for (int l = 0; l < 32; l++) q[128 * h + 32 * s + l] = (int8_t)((qs[32 * h + l] >> (2 * s)) & 3);
}

static inline void dec_q2_k(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    const float d = f16_to_f32(b + 80), dmin = f16_to_f32(b + 82);
    for (int j = 0; j < 16; j++) {
        sc[j] = d * (b[j] & 0xF);
        mn[j] = dmin * (b[j] >> 4);
    }
    crumbs(b + 16, q);
}

static inline void dec_q3_k(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    (void)mn;
    const uint8_t *hmask = b, *s = b + 96;
    const float d = f16_to_f32(b + 108);
    for (int j = 0; j < 16; j++) {
        const int lo4 = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
        const int hi2 = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        sc[j] = d * ((lo4 | (hi2 << 4)) - 32);
    }
    crumbs(b + 32, q);
    for (int g = 0; g < 8; g++)  /* contiguous inner loop: vector stores (byte stores stall the wide loads) */
        for (int l = 0; l < 32; l++) q[32 * g + l] += (int8_t)(4 * ((hmask[l] >> g) & 1) - 4);
}

static inline void scale_min_k4(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

static inline void k4_scales(const uint8_t *b, float *sc, float *mn) {
    const float d = f16_to_f32(b), dmin = f16_to_f32(b + 2);
    for (int j = 0; j < 8; j++) {
        int s, m;
        scale_min_k4(b + 4, j, &s, &m);
        sc[j] = d * s;
        mn[j] = dmin * m;
    }
}

static inline void dec_q4_k(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    k4_scales(b, sc, mn);
    const uint8_t *qs = b + 16;  /* sub-block 2c: low nibbles of qs[32c..], 2c+1: high nibbles */
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            q[64 * c + l] = (int8_t)(qs[32 * c + l] & 0xF);
            q[64 * c + 32 + l] = (int8_t)(qs[32 * c + l] >> 4);
        }
}

static inline void dec_q5_k(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    k4_scales(b, sc, mn);
    const uint8_t *qh = b + 16, *qs = b + 48;
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            q[64 * c + l] = (int8_t)((qs[32 * c + l] & 0xF) | (((qh[l] >> (2 * c)) & 1) << 4));
            q[64 * c + 32 + l] = (int8_t)((qs[32 * c + l] >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4));
        }
}

static inline void dec_q6_k(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    (void)mn;
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *s = (const int8_t *)(b + 192);
    const float d = f16_to_f32(b + 208);
    for (int j = 0; j < 16; j++) sc[j] = d * s[j];
    for (int h = 0; h < 2; h++) {  /* element 128h + 32r + l; low nibble from ql[64h + 32(r&1) + l] */
        const uint8_t *L = ql + 64 * h, *H = qh + 32 * h;
        int8_t *o = q + 128 * h;
        for (int l = 0; l < 32; l++) {
            o[l] = (int8_t)(((L[l] & 0xF) | ((H[l] & 3) << 4)) - 32);
            o[l + 32] = (int8_t)(((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32);
            o[l + 64] = (int8_t)(((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32);
            o[l + 96] = (int8_t)(((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32);
        }
    }
}

/* ------------------------------------------------------------------ drivers */

/* A float vector of VL lanes: v_fma(x, codes, acc) widens VL int8/uint8 codes to float and accumulates
 * x * codes; the sum over lanes is taken once per output (no horizontal sum per sub-block). */
#if defined(__AVX512F__)
#define VL 16
typedef __m512 vf;
static inline vf v_zero(void) { return _mm512_setzero_ps(); }
static inline vf v_fma_i8(const float *x, const int8_t *q, vf a) {
    return _mm512_fmadd_ps(_mm512_loadu_ps(x), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))), a);
}
static inline vf v_fma_u8(const float *x, const uint8_t *q, vf a) {
    return _mm512_fmadd_ps(_mm512_loadu_ps(x), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q))), a);
}
static inline vf v_scale_add(vf v, float s, vf a) { return _mm512_fmadd_ps(v, _mm512_set1_ps(s), a); }
static inline float v_sum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define VL 8
typedef __m256 vf;
static inline vf v_zero(void) { return _mm256_setzero_ps(); }
static inline vf v_fma_i8(const float *x, const int8_t *q, vf a) {
    return _mm256_fmadd_ps(_mm256_loadu_ps(x), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q))), a);
}
static inline vf v_fma_u8(const float *x, const uint8_t *q, vf a) {
    return _mm256_fmadd_ps(_mm256_loadu_ps(x), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q))), a);
}
static inline vf v_scale_add(vf v, float s, vf a) { return _mm256_fmadd_ps(v, _mm256_set1_ps(s), a); }
static inline float v_sum(vf v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
#else
#define VL 1
typedef float vf;
static inline vf v_zero(void) { return 0.f; }
static inline vf v_fma_i8(const float *x, const int8_t *q, vf a) { return a + x[0] * (float)q[0]; }
static inline vf v_fma_u8(const float *x, const uint8_t *q, vf a) { return a + x[0] * (float)q[0]; }
static inline vf v_scale_add(vf v, float s, vf a) { return a + v * s; }
static inline float v_sum(vf v) { return v; }
#endif

/* sum over a sub-block of S (a multiple of VL) inputs of x * q, as a vector */
static inline vf sub_i8(const float *x, const int8_t *q, int S) {
    vf v = v_zero();
    for (int t = 0; t < S; t += VL) v = v_fma_i8(x + t, q + t, v);
    return v;
}

static inline vf sub_u8(const float *x, const uint8_t *q, int S) {
    vf v = v_zero();
    for (int t = 0; t < S; t += VL) v = v_fma_u8(x + t, q + t, v);
    return v;
}

/* X (fp32 or bf16) -> fp32 copy; returns the pointer to use (X itself when already fp32). */
static const float *x_f32(const void *X, int64_t M, int64_t K, int x_bf16, float **owned) {
    *owned = NULL;
    if (!x_bf16) return (const float *)X;
    float *f = (float *)malloc(sizeof(float) * M * K);
    const uint16_t *h = (const uint16_t *)X;
    for (int64_t i = 0; i < M * K; i++) f[i] = bf16_to_f32(h[i]);
    *owned = f;
    return f;
}

/* Sums of x over consecutive runs of S inputs: [M, K/S] (for formats with a min / bias). */
static float *x_sums(const float *x, int64_t M, int64_t K, int S) {
    float *s = (float *)malloc(sizeof(float) * M * (K / S));
    for (int64_t i = 0; i < M * (K / S); i++) {
        float a = 0.f;
        for (int l = 0; l < S; l++) a += x[i * S + l];
        s[i] = a;
    }
    return s;
}

static inline void y_store(void *Y, int64_t idx, float v, int bf16) {
    if (bf16) ((uint16_t *)Y)[idx] = f32_to_bf16(v);
    else ((float *)Y)[idx] = v;
}

#define PAR_MIN 262144 /* weights per call below which one thread is as fast (fork/join costs ~ the work) */

/* ------------------------------------------------------------------ activations, prepared once
 * Each kernel reads the activations in one of three forms, made once per call, or once for several weights
 * (kimiq_cpu.qexperts: a MoE layer's gate and up projections share theirs): fp32, with sums per 16 and per 32 for
 * the formats with a min (the formats multiplied in fp32), int8 per 32 (Q8_0 / Q4_0 / MXFP4 with VNNI), int8 per
 * 256 with int16 sums per 16 (Q4_K / Q6_K with VNNI, llama.cpp's Q8_K). */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define KQ_I8_ACTIVATIONS 1
#else
#define KQ_I8_ACTIVATIONS 0
#endif
#define KQ_ACT_F32 1
#define KQ_ACT_SUMS 16 /* the fp32 activations' sums per 16 and per 32 (formats with a min) */
#define KQ_ACT_Q8 2
#define KQ_ACT_Q8K 4
#define KQ_ACT_Q8K4 8  /* the same, each 256 in Q4_K's nibble order: 32-value sub-blocks 0 2 1 3 4 6 5 7 */

typedef struct kq_act {
    int64_t M, K;
    const float *x;  /* [M, K] */
    float *owned, *xs16, *xs32;  /* the fp32 copy of bf16 input; sums of each 16 / 32 */
    int8_t *xq;  /* int8 per 32: [M, K] and scales [M, K/32] */
    float *dx;
    int8_t *xqk, *xqk4;  /* int8 per 256: [M, K] (natural, Q4_K order), scales [M, K/256], sums of each 16 [M, K/16] */
    float *dxk;
    int16_t *bsk;
} kq_act;

#if KQ_I8_ACTIVATIONS
static void x_q8(const float *x, int64_t n, int8_t *xq, float *dx);
static void x_q8k(const float *x, int64_t n, int8_t *xq, float *dx, int16_t *bs, int q4k_order);
#endif

void kq_act_free(kq_act *a) {
    if (!a) return;
    free(a->owned);
    free(a->xs16);
    free(a->xs32);
    free(a->xq);
    free(a->dx);
    free(a->xqk);
    free(a->xqk4);
    free(a->dxk);
    free(a->bsk);
    free(a);
}

/* X [M, K] (fp32, or bf16 when bf16 != 0) in the forms of ``kinds`` (KQ_ACT_* bits); NULL if K does not fit them */
kq_act *kq_act_new(const void *X, int64_t M, int64_t K, int bf16, int kinds) {
    if (M < 1 || K % 32 || ((kinds & (KQ_ACT_Q8K | KQ_ACT_Q8K4)) && K % QK_K)) return NULL;
    init_tables();
    kq_act *a = (kq_act *)calloc(1, sizeof(kq_act));
    a->M = M;
    a->K = K;
    a->x = x_f32(X, M, K, bf16, &a->owned);
    if (kinds & KQ_ACT_SUMS) {
        a->xs16 = x_sums(a->x, M, K, 16);
        a->xs32 = x_sums(a->x, M, K, 32);
    }
#if KQ_I8_ACTIVATIONS
    if (kinds & KQ_ACT_Q8) {
        a->xq = (int8_t *)aligned_alloc(64, (size_t)((M * K + 63) / 64 * 64));
        a->dx = (float *)malloc(sizeof(float) * M * (K / 32));
        x_q8(a->x, M * K, a->xq, a->dx);
    }
    for (int order = 0; order < 2; order++) {
        if (!(kinds & (order ? KQ_ACT_Q8K4 : KQ_ACT_Q8K))) continue;
        int8_t *xq = (int8_t *)aligned_alloc(64, (size_t)((M * K + 63) / 64 * 64));
        *(order ? &a->xqk4 : &a->xqk) = xq;
        if (!a->dxk) {
            a->dxk = (float *)malloc(sizeof(float) * M * (K / QK_K));
            a->bsk = (int16_t *)malloc(sizeof(int16_t) * M * (K / 16));
        }
        x_q8k(a->x, M * K, xq, a->dxk, a->bsk, order);
    }
#endif
    return a;
}

#ifdef _OPENMP
#include <omp.h>
#endif

/* The entry points, per format: kq_<name>(W, N, K, X, M, Y, bf16, nthreads) = Y [M, N] = X [M, K] @ W^T (Y in X's
 * dtype), threads over output rows; kq_range_<name>(W, K, n0, n1, act, Y, ldy): rows n0..n1-1 only, fp32
 * Y[m * ldy + n - n0], one thread, no checks; kq_act_kind_<name>(): the activation form its kernel reads;
 * kq_block_<name>(): weights per block (K a multiple of it). */
#define GGUF_ENTRY(NAME, QK, KIND)                                                                        \
    void kq_range_##NAME(const uint8_t *W, int64_t K, int64_t n0, int64_t n1, const kq_act *a, float *Y,  \
                         int64_t ldy) {                                                                 \
        range_##NAME(W, K, n0, n1, a, Y, ldy);                                                          \
    }                                                                                                   \
    int kq_act_kind_##NAME(void) { return KIND; }                                                       \
    int kq_block_##NAME(void) { return QK; } /* K must be a multiple */                                 \
    int kq_##NAME(const uint8_t *W, int64_t N, int64_t K, const void *X, int64_t M, void *Y, int bf16,  \
                  int nthreads) {                                                                       \
        if (M < 1 || M > MMAX || K % QK) return -1;                                                     \
        kq_act *a = kq_act_new(X, M, K, bf16, KIND);                                                    \
        if (!a) return -1;                                                                              \
        float *y = bf16 ? (float *)malloc(sizeof(float) * M * N) : (float *)Y;                          \
        const int nt = (N * K >= PAR_MIN) ? nthreads : 1;                                               \
        _Pragma("omp parallel num_threads(nt) if (nt > 1)") {                                           \
            int t = 0, T = 1;                                                                           \
            KQ_THREAD(t, T);                                                                            \
            const int64_t n0 = N * t / T, n1 = N * (t + 1) / T;                                         \
            range_##NAME(W, K, n0, n1, a, y + n0, N);                                                   \
            for (int64_t m = 0; bf16 && m < M; m++) /* each thread rounds its own outputs */            \
                for (int64_t n = n0; n < n1; n++) ((uint16_t *)Y)[m * N + n] = f32_to_bf16(y[m * N + n]); \
        }                                                                                               \
        if (bf16) free(y);                                                                              \
        kq_act_free(a);                                                                                 \
        return 0;                                                                                       \
    }
#ifdef _OPENMP
#define KQ_THREAD(t, T) (t = omp_get_thread_num(), T = omp_get_num_threads())
#else
#define KQ_THREAD(t, T) ((void)0)
#endif

/* QK weights per block of BB bytes, sub-blocks of S weights with their own scale (and min if HASMIN), multiplied
 * in fp32. */
#define GGUF_GEMM(NAME, QK, BB, S, DEC, HASMIN)                                                          \
    static void range_##NAME(const uint8_t *W, int64_t K, int64_t n0, int64_t n1, const kq_act *a, float *Y, \
                             int64_t ldy) {                                                             \
        const int64_t M = a->M, nb = K / QK, ns = K / S;                                                \
        const float *x = a->x, *xs = S == 16 ? a->xs16 : a->xs32;                                       \
        for (int64_t n = n0; n < n1; n++) {                                                             \
            int8_t q[QK] __attribute__((aligned(64)));                                                  \
            float sc[QK / S], mn[QK / S];                                                               \
            vf acc[MMAX];                                                                               \
            float accs[MMAX] = {0};                                                                     \
            const uint8_t *row = W + n * nb * BB;                                                       \
            /* decode: accumulators in registers (acc[m] lives in memory; its store-load round trip       \
               lengthened every FMA chain): Q6_K 1024x2304 170 -> 137 us; the formats with a min were slower \
               this way (Q4_K 108 -> 172 us) and keep the general loop */                               \
            if (M == 1 && !HASMIN) {                                                                    \
                vf a0 = v_zero(), a1 = v_zero();                                                        \
                for (int64_t ib = 0; ib < nb; ib++) {                                                   \
                    DEC(row + ib * BB, q, sc, mn);                                                      \
                    const float *xb = x + ib * QK;                                                      \
                    for (int j = 0; j < QK / S; j++) {                                                  \
                        if (j & 1) a1 = v_scale_add(sub_i8(xb + j * S, q + j * S, S), sc[j], a1);       \
                        else a0 = v_scale_add(sub_i8(xb + j * S, q + j * S, S), sc[j], a0);             \
                    }                                                                                   \
                }                                                                                       \
                Y[n - n0] = v_sum(a0) + v_sum(a1);                                                      \
                continue;                                                                               \
            }                                                                                           \
            for (int64_t m = 0; m < M; m++) acc[m] = v_zero();                                          \
            for (int64_t ib = 0; ib < nb; ib++) {                                                       \
                DEC(row + ib * BB, q, sc, mn);                                                          \
                for (int64_t m = 0; m < M; m++) {                                                       \
                    const float *xb = x + m * K + ib * QK;                                              \
                    for (int j = 0; j < QK / S; j++) {                                                  \
                        acc[m] = v_scale_add(sub_i8(xb + j * S, q + j * S, S), sc[j], acc[m]);          \
                        if (HASMIN) accs[m] -= mn[j] * xs[m * ns + ib * (QK / S) + j];                  \
                    }                                                                                   \
                }                                                                                       \
            }                                                                                           \
            for (int64_t m = 0; m < M; m++) Y[m * ldy + n - n0] = v_sum(acc[m]) + accs[m];              \
        }                                                                                               \
    }                                                                                                   \
    GGUF_ENTRY(NAME, QK, KQ_ACT_F32 | (HASMIN ? KQ_ACT_SUMS : 0))

/* The GGUF formats, once: X(name, weights per block QK, bytes per block, weights per sub-block S, decoder, has a
 * min).  The first list holds the 32-weight, one-scale formats whose decode kernels can take int8 activations. */
#define GGUF_I8_FORMATS(X)                                                                                \
    X(q8_0, 32, 34, 32, dec_q8_0, 0)                                                                      \
    X(q4_0, 32, 18, 32, dec_q4_0, 0)                                                                      \
    X(mxfp4, 32, 17, 32, dec_mxfp4, 0)
#define GGUF_K8_FORMATS(X)                                                                                \
    X(q4_k, QK_K, 144, 32, dec_q4_k, 1)                                                                   \
    X(q6_k, QK_K, 210, 16, dec_q6_k, 0)
#define GGUF_OTHER_FORMATS(X)                                                                             \
    X(q5_0, 32, 22, 32, dec_q5_0, 0)                                                                      \
    X(q5_1, 32, 24, 32, dec_q5_1, 1)                                                                      \
    X(q2_k, QK_K, 84, 16, dec_q2_k, 1)                                                                    \
    X(q3_k, QK_K, 110, 16, dec_q3_k, 0)                                                                   \
    X(q5_k, QK_K, 176, 32, dec_q5_k, 1)

#if KQ_I8_ACTIVATIONS
/* Formats of 32-weight blocks with one scale and no min (Q8_0, Q4_0, MXFP4): as llama.cpp, the activations
 * are quantized to int8 per 32 values (dx = max|x| / 127, round to nearest) and each block is one int8 dot
 * product (AVX512-VNNI), w . x = sc * dx * sum(q * xq): ~2x the fp32 path, with the activation rounding llama.cpp
 * has (|error| <= sum |w| * max|x_block| / 254 per output). */
static void x_q8(const float *x, int64_t n, int8_t *xq, float *dx) {  /* vectorized: cvtps rounds to nearest even,
                                                                        as lrintf in the default rounding mode */
    const __m512 sign = _mm512_set1_ps(-0.f);
    for (int64_t b = 0; b < n / 32; b++) {
        const __m512 v0 = _mm512_loadu_ps(x + b * 32), v1 = _mm512_loadu_ps(x + b * 32 + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
        const __m512 id = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        dx[b] = amax / 127.f;
        _mm_storeu_si128((__m128i *)(xq + b * 32), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, id))));
        _mm_storeu_si128((__m128i *)(xq + b * 32 + 16),
                         _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, id))));
    }
}

static inline float hsum128(__m128 h) {
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* block -> its 32 codes in a register and its scale: no trip through memory (16-byte stores followed by a 32-byte
 * load stall store forwarding) */
static inline __m256i nibbles32(const uint8_t *b, const int8_t *T) {
    const __m128i t = _mm_loadu_si128((const __m128i *)T), m = _mm_set1_epi8(15);
    const __m128i v = _mm_loadu_si128((const __m128i *)b);
    return _mm256_set_m128i(_mm_shuffle_epi8(t, _mm_and_si128(_mm_srli_epi16(v, 4), m)),
                            _mm_shuffle_epi8(t, _mm_and_si128(v, m)));
}
static inline __m256i reg_q8_0(const uint8_t *b, float *d) {
    *d = f16_to_f32(b);
    return _mm256_loadu_si256((const __m256i *)(b + 2));
}
static inline __m256i reg_q4_0(const uint8_t *b, float *d) {
    *d = f16_to_f32(b);
    return nibbles32(b + 2, NIBBLE_M8);
}
static inline __m256i reg_mxfp4(const uint8_t *b, float *d) {
    *d = E8M0_HALF[b[0]];
    return nibbles32(b + 1, E2M1X2);
}

/* (the X-macro's arguments; the block comes from reg_<name>, one scale per 32 weights.  The block product is
 * written out in both loops: a shared inline helper for it measured ~12% slower, 1024x2304 Q8_0 69 -> 77 µs, from
 * the compiler's different register allocation in the decode loop) */
#define GGUF_GEMM_I8(NAME, QK, BB, S, DEC, HASMIN)                                                        \
    static void range_##NAME(const uint8_t *W, int64_t K, int64_t n0, int64_t n1, const kq_act *a, float *Y, \
                             int64_t ldy) {                                                             \
        const int64_t M = a->M, nb = K / 32;                                                            \
        const int8_t *xq = a->xq;                                                                       \
        const float *dx = a->dx;                                                                        \
        for (int64_t n = n0; n < n1; n++) {                                                             \
            float sc;                                                                                   \
            __m256 acc[MMAX];                                                                           \
            const uint8_t *row = W + n * nb * BB;                                                       \
            if (M == 1) { /* decode: four accumulators in registers, so the FMA chain is not the limit */ \
                __m256 a4[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),          \
                                _mm256_setzero_ps()};                                                   \
                for (int64_t ib = 0; ib < nb; ib++) {                                                   \
                    const __m256i w = reg_##NAME(row + ib * BB, &sc), aw = _mm256_sign_epi8(w, w);      \
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(xq + ib * 32));              \
                    const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, _mm256_sign_epi8(v, w)); \
                    a4[ib & 3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(sc * dx[ib]), a4[ib & 3]); \
                }                                                                                       \
                const __m256 t = _mm256_add_ps(_mm256_add_ps(a4[0], a4[1]), _mm256_add_ps(a4[2], a4[3])); \
                Y[n - n0] = hsum128(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1))); \
                continue;                                                                               \
            }                                                                                           \
            for (int64_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();                               \
            for (int64_t ib = 0; ib < nb; ib++) {                                                       \
                const __m256i w = reg_##NAME(row + ib * BB, &sc), aw = _mm256_sign_epi8(w, w);          \
                for (int64_t m = 0; m < M; m++) {                                                       \
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(xq + m * K + ib * 32));      \
                    const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw,                  \
                                                          _mm256_sign_epi8(v, w));                      \
                    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(sc * dx[m * nb + ib]),    \
                                             acc[m]);                                                   \
                }                                                                                       \
            }                                                                                           \
            for (int64_t m = 0; m < M; m++)                                                             \
                Y[m * ldy + n - n0] =                                                                   \
                    hsum128(_mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1))); \
        }                                                                                               \
    }                                                                                                   \
    GGUF_ENTRY(NAME, QK, KQ_ACT_Q8)

GGUF_I8_FORMATS(GGUF_GEMM_I8)

/* Q4_K and Q6_K, as llama.cpp (its Q8_K): the activations quantized to int8 per 256 values (one scale dx =
 * max|x| / 127, and the sum of every 16 int8 values for the mins / offsets), the integer sub-block scales applied in
 * int32 (vpmaddubsw: 4- or 6-bit codes x int8 activations -> int16 pairs; vpdpwssd: x scale, summed into int32), one
 * float multiply per 256 weights.  |error| <= sum |w| * max|x| over the 256-block / 254 per output. */
static void x_q8k(const float *x, int64_t n, int8_t *xq, float *dx, int16_t *bs, int q4k_order) {
    static const int SLOT[8] = {0, 2, 1, 3, 4, 6, 5, 7};  /* Q4_K order: where 32-value sub-block j goes */
    const __m512 sign = _mm512_set1_ps(-0.f);
    for (int64_t b = 0; b < n / QK_K; b++) {
        const float *xb = x + b * QK_K;
        __m512 m = _mm512_setzero_ps();
        for (int l = 0; l < QK_K; l += 16) m = _mm512_max_ps(m, _mm512_andnot_ps(sign, _mm512_loadu_ps(xb + l)));
        const float amax = _mm512_reduce_max_ps(m);
        const __m512 id = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        dx[b] = amax / 127.f;
        for (int g = 0; g < QK_K / 16; g++) {
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + 16 * g), id));
            const int at = q4k_order ? 32 * SLOT[g / 2] + 16 * (g % 2) : 16 * g;
            _mm_storeu_si128((__m128i *)(xq + b * QK_K + at), _mm512_cvtsepi32_epi8(q));
            bs[b * (QK_K / 16) + g] = (int16_t)_mm512_reduce_add_epi32(q);
        }
    }
}

/* vpermw indices spreading sub-block scales over the int16 products of one 64-code register:
 * K4_IDX: the 32-code sub-blocks of Q4_K's low / high nibbles of 64 bytes (16 words each); K6_IDX[g]: 16-code
 * sub-blocks 4g..4g+3 (8 words each) */
static const uint16_t K4_IDX[4][32] __attribute__((aligned(64))) = {
#define R16(v) v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v
    {R16(0), R16(2)}, {R16(1), R16(3)}, {R16(4), R16(6)}, {R16(5), R16(7)}};
#undef R16
static const uint16_t K6_IDX[4][32] __attribute__((aligned(64))) = {
#define R8(v) v, v, v, v, v, v, v, v
    {R8(0), R8(1), R8(2), R8(3)}, {R8(4), R8(5), R8(6), R8(7)}, {R8(8), R8(9), R8(10), R8(11)},
    {R8(12), R8(13), R8(14), R8(15)}};
#undef R8

/* 256 codes in q[4] (64 each, unsigned) . 256 int8 activations at xb, each int16 pair product times its sub-block
 * scale in s[4], as 16 int32 partial sums (two chains) */
static inline __m512i dot256_i8(const __m512i q[4], const __m512i s[4], const int8_t *xb) {
    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
    for (int k = 0; k < 4; k += 2) {
        s0 = _mm512_dpwssd_epi32(s0, _mm512_maddubs_epi16(q[k], _mm512_loadu_si512((const void *)(xb + 64 * k))), s[k]);
        s1 = _mm512_dpwssd_epi32(s1, _mm512_maddubs_epi16(q[k + 1], _mm512_loadu_si512((const void *)(xb + 64 * k + 64))),
                                 s[k + 1]);
    }
    return _mm512_add_epi32(s0, s1);
}

/* One weight row . MR (1..4, a constant after inlining) Q8_K activation rows, out[r]: each 256-weight block is
 * decoded into registers once and used for all MR rows (accumulators stay in registers). */
#define KROWS static inline __attribute__((always_inline)) void

/* Q4_K: w = d * sc_j * q - dmin * m_j (q 0..15; 6-bit sc_j, m_j per 32 weights) */
KROWS rows_q4_k(const uint8_t *row, int64_t nb, const int8_t *xq, const float *dx, const int16_t *bs, int64_t K,
                const int MR, float *out) {
    const __m512i m4 = _mm512_set1_epi8(15);
    __m512 acc[4];
    __m128 accm[4];
    for (int r = 0; r < MR; r++) acc[r] = _mm512_setzero_ps(), accm[r] = _mm_setzero_ps();
    for (int64_t ib = 0; ib < nb; ib++) {
        const uint8_t *b = row + ib * 144;
        uint32_t a, c, e;  /* 12 bytes of 6-bit scales and mins (scale_min_k4), unpacked 4 at a time */
        memcpy(&a, b + 4, 4);
        memcpy(&c, b + 8, 4);
        memcpy(&e, b + 12, 4);
        const uint64_t sc = (a & 0x3f3f3f3fu) | (uint64_t)((e & 0x0f0f0f0fu) | (((a >> 6) & 0x03030303u) << 4)) << 32;
        const uint64_t mn = (c & 0x3f3f3f3fu) | (uint64_t)(((e >> 4) & 0x0f0f0f0fu) | (((c >> 6) & 0x03030303u) << 4))
                                                   << 32;
        const __m512i scw = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)sc)));
        const __m128i m16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)mn));
        const __m128i mlo = _mm_unpacklo_epi16(m16, m16), mhi = _mm_unpackhi_epi16(m16, m16);  /* per 16 values */
        __m512i q[4], s[4];
        for (int h = 0; h < 2; h++) {  /* 64 bytes: sub-blocks 4h, 4h+2 in the low nibbles, 4h+1, 4h+3 in the high
                                          (the activations come in that order: KQ_ACT_Q8K4) */
            const __m512i v = _mm512_loadu_si512((const void *)(b + 16 + 64 * h));
            q[2 * h] = _mm512_and_si512(v, m4);
            q[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            s[2 * h] = _mm512_permutexvar_epi16(_mm512_load_si512((const void *)K4_IDX[2 * h]), scw);
            s[2 * h + 1] = _mm512_permutexvar_epi16(_mm512_load_si512((const void *)K4_IDX[2 * h + 1]), scw);
        }
        const float d = f16_to_f32(b), dmin = f16_to_f32(b + 2);
        for (int r = 0; r < MR; r++) {
            const __m512i p = dot256_i8(q, s, xq + r * K + ib * QK_K);
            const float xd = dx[r * nb + ib];
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(d * xd), acc[r]);
            const int16_t *bb = bs + (r * nb + ib) * 16;  /* mins . sums of each 32 activations */
            const __m128i pm = _mm_add_epi32(_mm_madd_epi16(mlo, _mm_loadu_si128((const __m128i *)bb)),
                                             _mm_madd_epi16(mhi, _mm_loadu_si128((const __m128i *)(bb + 8))));
            accm[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(pm), _mm_set1_ps(dmin * xd), accm[r]);
        }
    }
    for (int r = 0; r < MR; r++) out[r] = _mm512_reduce_add_ps(acc[r]) - hsum128(accm[r]);
}

/* Q6_K: w = d * sc_j * (q - 32) (q 0..63; int8 sc_j per 16 weights) */
KROWS rows_q6_k(const uint8_t *row, int64_t nb, const int8_t *xq, const float *dx, const int16_t *bs, int64_t K,
                const int MR, float *out) {
    const __m512i m4 = _mm512_set1_epi8(15), m30 = _mm512_set1_epi8(0x30);
    __m512 acc[4];
    for (int r = 0; r < MR; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t ib = 0; ib < nb; ib++) {
        const uint8_t *b = row + ib * 210;
        const __m256i sc = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192)));
        const __m512i scw = _mm512_castsi256_si512(sc);
        __m512i q[4], s[4];
        for (int h = 0; h < 2; h++) {  /* elements 128h + 32r + l: low 4 bits from ql[64h + 32(r&1) + l] (low nibble
                                          for r < 2), high 2 bits from qh[32h + l] >> 2r */
            const __m512i L = _mm512_loadu_si512((const void *)(b + 64 * h));
            const __m256i H = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
            const __m512i Hz = _mm512_inserti64x4(_mm512_castsi256_si512(H), _mm256_srli_epi16(H, 2), 1);
            q[2 * h] = _mm512_or_si512(_mm512_and_si512(L, m4), _mm512_and_si512(_mm512_slli_epi16(Hz, 4), m30));
            q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(L, 4), m4), _mm512_and_si512(Hz, m30));
            s[2 * h] = _mm512_permutexvar_epi16(_mm512_load_si512((const void *)K6_IDX[2 * h]), scw);
            s[2 * h + 1] = _mm512_permutexvar_epi16(_mm512_load_si512((const void *)K6_IDX[2 * h + 1]), scw);
        }
        const float d = f16_to_f32(b + 208);
        for (int r = 0; r < MR; r++) {
            const __m512i p = dot256_i8(q, s, xq + r * K + ib * QK_K);
            /* - 32 * sum_j sc_j * (sum of the activations of sub-block j) */
            const __m256i off = _mm256_madd_epi16(sc, _mm256_loadu_si256((const __m256i *)(bs + (r * nb + ib) * 16)));
            const __m512i t = _mm512_sub_epi32(p, _mm512_zextsi256_si512(_mm256_slli_epi32(off, 5)));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(d * dx[r * nb + ib]), acc[r]);
        }
    }
    for (int r = 0; r < MR; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

/* (the X-macro's arguments) output rows against chunks of up to 4 activation rows */
#define K8_KIND_q4_k KQ_ACT_Q8K4 /* each format's activation form */
#define K8_KIND_q6_k KQ_ACT_Q8K
#define GGUF_GEMM_K8(NAME, QK, BB, S, DEC, HASMIN)                                                        \
    static void range_##NAME(const uint8_t *W, int64_t K, int64_t n0, int64_t n1, const kq_act *a, float *Y, \
                             int64_t ldy) {                                                             \
        const int64_t M = a->M, nb = K / QK_K;                                                          \
        for (int64_t n = n0; n < n1; n++) {                                                             \
            const uint8_t *row = W + n * nb * BB;                                                       \
            for (int64_t m0 = 0; m0 < M; m0 += 4) {                                                     \
                float o[4];                                                                             \
                const int64_t mc = M - m0 < 4 ? M - m0 : 4;                                             \
                const int8_t *xm = (K8_KIND_##NAME == KQ_ACT_Q8K4 ? a->xqk4 : a->xqk) + m0 * K;         \
                const float *dm = a->dxk + m0 * nb;                                                     \
                const int16_t *bm = a->bsk + m0 * nb * (QK_K / 16);                                     \
                switch (mc) {                                                                           \
                    case 1: rows_##NAME(row, nb, xm, dm, bm, K, 1, o); break;                           \
                    case 2: rows_##NAME(row, nb, xm, dm, bm, K, 2, o); break;                           \
                    case 3: rows_##NAME(row, nb, xm, dm, bm, K, 3, o); break;                           \
                    default: rows_##NAME(row, nb, xm, dm, bm, K, 4, o); break;                          \
                }                                                                                       \
                for (int64_t r = 0; r < mc; r++) Y[(m0 + r) * ldy + n - n0] = o[r];                     \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
    GGUF_ENTRY(NAME, QK, K8_KIND_##NAME)

GGUF_K8_FORMATS(GGUF_GEMM_K8)
#else
GGUF_I8_FORMATS(GGUF_GEMM)
GGUF_K8_FORMATS(GGUF_GEMM)
#endif
GGUF_OTHER_FORMATS(GGUF_GEMM)

/* 1 when Q8_0 / Q4_0 / MXFP4 (int8 per 32) and Q4_K / Q6_K (int8 per 256) quantize their activations (the VNNI
 * kernels above), else 0 */
int kq_i8_activations(void) { return KQ_I8_ACTIVATIONS; }

/* Rows of a packed matrix dequantized: Y[r, :] = W[rows[r], :] (rows NULL: rows 0..R-1, the whole matrix, for
 * prefill's dequantize-then-GEMM), fp32 or bf16.  Loops kept simple so that they vectorize. */
#define GGUF_ROWS(NAME, QK, BB, S, DEC, HASMIN)                                                          \
    int kq_rows_##NAME(const uint8_t *W, int64_t K, const int64_t *rows, int64_t R, void *Y, int bf16) { \
        if (K % QK) return -1;                                                                          \
        init_tables();                                                                                  \
        const int64_t nb = K / QK;                                                                      \
        for (int64_t r = 0; r < R; r++) {                                                               \
            int8_t q[QK] __attribute__((aligned(64)));                                                  \
            float sc[QK / S], mn[QK / S], v[QK] __attribute__((aligned(64)));                          \
            const uint8_t *row = W + (rows ? rows[r] : r) * nb * BB;                                    \
            for (int64_t ib = 0; ib < nb; ib++) {                                                       \
                DEC(row + ib * BB, q, sc, mn);                                                          \
                for (int j = 0; j < QK / S; j++) {                                                      \
                    const float a = sc[j], b = HASMIN ? mn[j] : 0.f;                                    \
                    for (int l = 0; l < S; l++) v[j * S + l] = a * (float)q[j * S + l] - b;            \
                }                                                                                       \
                const int64_t o = r * K + ib * QK;                                                      \
                if (bf16) {                                                                             \
                    uint16_t *y = (uint16_t *)Y + o;                                                    \
                    for (int l = 0; l < QK; l++) y[l] = f32_to_bf16(v[l]);                              \
                } else {                                                                                \
                    memcpy((float *)Y + o, v, sizeof(v));                                               \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        return 0;                                                                                       \
    }

GGUF_I8_FORMATS(GGUF_ROWS)
GGUF_K8_FORMATS(GGUF_ROWS)
GGUF_OTHER_FORMATS(GGUF_ROWS)

/* mlx affine: codes = LSB-first bitstream per row (uint32 words), scales/biases fp32 [N, K/g];
 * w = s * q + b.  A group of g >= 32 codes fills whole words, so every group starts on a word boundary. */
int kq_affine(const uint32_t *codes, const float *scales, const float *biases, int bits, int group, int64_t N,
              int64_t K, const void *X, int64_t M, void *Y, int bf16, int nthreads) {
    if (M < 1 || M > MMAX || K % group || group > 128 || (group * bits) % 32) return -1;
    float *owned;
    const float *x = x_f32(X, M, K, bf16, &owned);
    float *xs = x_sums(x, M, K, group);
    const int64_t G = K / group, wpr = K * bits / 32, wpg = group * bits / 32;
    const uint32_t mask = (1u << bits) - 1;
    const int nt = (N * K >= PAR_MIN) ? nthreads : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t n = 0; n < N; n++) {
        uint8_t q[128] __attribute__((aligned(64)));
        vf acc[MMAX];
        float accs[MMAX] = {0};
        for (int64_t m = 0; m < M; m++) acc[m] = v_zero();
        for (int64_t g = 0; g < G; g++) {
            const uint32_t *w = codes + n * wpr + g * wpg;
            if (bits == 4) {
                const uint8_t *by = (const uint8_t *)w;
                for (int j = 0; j < group / 2; j++) {
                    q[2 * j] = by[j] & 15;
                    q[2 * j + 1] = by[j] >> 4;
                }
            } else if (bits == 8) {
                memcpy(q, w, group);
            } else if (bits == 2) {
                const uint8_t *by = (const uint8_t *)w;
                for (int j = 0; j < group / 4; j++)
                    for (int t = 0; t < 4; t++) q[4 * j + t] = (by[j] >> (2 * t)) & 3;
            } else {
                for (int j = 0; j < group; j++) {
                    const int p = j * bits, wi = p >> 5, off = p & 31;
                    uint64_t two = w[wi];
                    if (off + bits > 32) two |= (uint64_t)w[wi + 1] << 32;
                    q[j] = (uint8_t)((two >> off) & mask);
                }
            }
            const float s = scales[n * G + g], bi = biases[n * G + g];
            for (int64_t m = 0; m < M; m++) {
                acc[m] = v_scale_add(sub_u8(x + m * K + g * group, q, group), s, acc[m]);
                accs[m] += bi * xs[m * G + g];
            }
        }
        for (int64_t m = 0; m < M; m++) y_store(Y, m * N + n, v_sum(acc[m]) + accs[m], bf16);
    }
    free(owned);
    free(xs);
    return 0;
}

/* MXFP4 in mlx's layout: codes uint32 [N, K/8] (element j = nibble j, LSB first), E8M0 uint8 [N, K/32]. */
int kq_mxfp4_mlx(const uint8_t *codes, const uint8_t *scales, int64_t N, int64_t K, const void *X, int64_t M,
                 void *Y, int bf16, int nthreads) {
    if (M < 1 || M > MMAX || K % 32) return -1;
    init_tables();
    float *owned;
    const float *x = x_f32(X, M, K, bf16, &owned);
    const int64_t G = K / 32;
    const int nt = (N * K >= PAR_MIN) ? nthreads : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t n = 0; n < N; n++) {
        int8_t q[32] __attribute__((aligned(64)));
        vf acc[MMAX];
        for (int64_t m = 0; m < M; m++) acc[m] = v_zero();
        for (int64_t g = 0; g < G; g++) {
            const uint8_t *c = codes + n * (K / 2) + g * 16;
            int8_t lo[16], hi[16];
            nibble_lut(c, E2M1X2, lo, hi);
            for (int j = 0; j < 16; j++) {
                q[2 * j] = lo[j];
                q[2 * j + 1] = hi[j];
            }
            const float h = E8M0_HALF[scales[n * G + g]];
            for (int64_t m = 0; m < M; m++) acc[m] = v_scale_add(sub_i8(x + m * K + g * 32, q, 32), h, acc[m]);
        }
        for (int64_t m = 0; m < M; m++) y_store(Y, m * N + n, v_sum(acc[m]), bf16);
    }
    free(owned);
    return 0;
}
