/* y = x @ (q * s)^T for a weight-only int8 linear on CPU with fp32 activations: q int8 [O, I] (one scale per
 * output), s bf16 [O], x [n, I] and y [n, O] fp32. Compiled and loaded by kernels/native.py (which says why and
 * what checks it); no Python, no torch headers.
 *
 * Every y[r, o] = s[o] * sum_k x[r, k] q[o, k] is summed the same way whatever n is and wherever row r and
 * output o fall: 16 lane-wise fp32 partial sums (lane k mod 16) in k order, then a fixed tree over the lanes.
 * So a row's result does not depend on the other rows (a sequence's tokens do not depend on what it is batched
 * with) nor on the thread count.
 *
 * Tiles of 4 outputs x up to 4 rows: a weight vector is converted once for the tile's rows and a row vector
 * loaded once for its 4 outputs; the 4 weight rows (4 I bytes) stay in L1 while every row tile passes over
 * them, so the weight is read from memory once per call at any n. Threads split the outputs (OpenMP, the
 * runtime torch uses). GCC/Clang vector extensions: AVX-512, AVX2 or whatever -march gives.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float v16f __attribute__((vector_size(64)));

#define OUTS 4 /* outputs a tile */

static inline v16f load_q(const int8_t *p) { /* 16 int8 weights as fp32 (exact) */
    v16f r;
#if defined(__AVX512F__)
    __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    memcpy(&r, &v, 64);
#elif defined(__AVX2__)
    __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))));
    memcpy(&r, &lo, 32);
    memcpy((char *)&r + 32, &hi, 32);
#else
    for (int i = 0; i < 16; i++) r[i] = (float)p[i];
#endif
    return r;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float hsum(v16f a) { /* a fixed tree: lane i + (i + 8), then + 4, + 2, + 1 */
    float t[16];
    memcpy(t, &a, 64);
    for (int w = 8; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) t[i] += t[i + w];
    return t[0];
}

/* R rows (1..4) of x [., I] fp32 against OUTS weight rows: acc[r][c] holds the 16 partial sums */
#define TILE(R)                                                                                            \
    static inline void tile##R(const float *x, int64_t I, const int8_t *const *qr, v16f acc[][OUTS]) {     \
        for (int r = 0; r < R; r++)                                                                        \
            for (int c = 0; c < OUTS; c++) acc[r][c] = (v16f){0};                                          \
        for (int64_t k = 0; k < I; k += 16) {                                                              \
            v16f w[OUTS];                                                                                  \
            for (int c = 0; c < OUTS; c++) w[c] = load_q(qr[c] + k);                                       \
            for (int r = 0; r < R; r++) {                                                                  \
                v16f xv;                                                                                   \
                memcpy(&xv, x + r * I + k, 64);                                                            \
                for (int c = 0; c < OUTS; c++) acc[r][c] += xv * w[c];                                     \
            }                                                                                              \
        }                                                                                                  \
    }
TILE(1)
TILE(2)
TILE(3)
TILE(4)

/* 0 on success; 1: I not a multiple of 16, or n or O < 1 */
int moeray_int8_linear(const float *x, int64_t n, int64_t I, const int8_t *q, const uint16_t *s, int64_t O, float *y,
                       int threads) {
    if (I % 16 || n < 1 || O < 1) return 1;
    const int64_t tiles = (O + OUTS - 1) / OUTS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int8_t *qr[OUTS];
        for (int c = 0; c < OUTS; c++) /* past the end: the last output again (computed, not stored) */
            qr[c] = q + (t * OUTS + c < O ? t * OUTS + c : O - 1) * I;
        for (int64_t r0 = 0; r0 < n; r0 += 4) {
            v16f acc[4][OUTS];
            const int R = n - r0 < 4 ? (int)(n - r0) : 4;
            const float *xr = x + r0 * I;
            switch (R) {
                case 1: tile1(xr, I, qr, acc); break;
                case 2: tile2(xr, I, qr, acc); break;
                case 3: tile3(xr, I, qr, acc); break;
                default: tile4(xr, I, qr, acc);
            }
            for (int r = 0; r < R; r++)
                for (int c = 0; c < OUTS && t * OUTS + c < O; c++)
                    y[(r0 + r) * O + t * OUTS + c] = hsum(acc[r][c]) * bf16_to_f32(s[t * OUTS + c]);
        }
    }
    return 0;
}
