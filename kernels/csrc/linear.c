/* CPU kernels of a decode step (moeray_decode_attention: see above it, at the end). Linears, fp32 activations:
 * y = x @ W^T, x [n, I] and y [n, O] fp32, W [O, I] as
 *   moeray_linear_f32   fp32 weights;
 *   moeray_linear_i8    int8 weights q with one bf16 scale per output s [O] (weight-only int8: W = q * s);
 *   moeray_linear_w8a8  the same weights, each row of x quantized to int8 too (W8A8: see quantize_row);
 *   moeray_linear_bf16  bf16 weights (each made fp32, exactly, before its FMA).
 * Compiled and loaded by kernels/native.py (which says why, when each runs, and what checks it); no Python, no
 * torch headers.
 *
 * Every y[r, o] = sum_k x[r, k] W[o, k] (times s[o]) is summed the same way whatever n is and wherever row r and
 * output o fall: 16 lane-wise fp32 partial sums (lane k mod 16) in k order (int8: two such sums, over the even
 * and the odd blocks of 16, then added), then a fixed tree over the lanes. So a row's result does not depend on
 * the other rows (a sequence's tokens do not depend on what it is batched with) nor on the thread count.
 *
 * Tiles of 4 outputs x up to 6 rows (24 accumulators, 4 weight vectors and a row vector: 29 of AVX-512's 32
 * registers; int8 3 rows, two accumulators each; with AVX2's 16 registers of half the width, 1 output x 4 rows, int8
 * 1 x 3: see OUTS): a weight vector is loaded (and converted) once for the tile's rows and a row vector once for its
 * outputs; the tile's weight rows stay in L1 while every row tile passes over them, so the weight is read from
 * memory once per call at any n. Threads split the outputs (OpenMP, the runtime torch uses). GCC/Clang vector extensions, in
 * vectors of the machine's width (v16f below): AVX-512, AVX2 or whatever -march gives.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* 16 fp32 (int32) lanes, the unit every kernel here sums in: v16f (v16i) is NH vectors of the machine's width, one
 * zmm on AVX-512, two ymm on AVX / AVX2, four xmm on plain x86-64. GCC keeps a vector type wider than the machine's
 * registers in memory (it has no register mode for it): 64-byte vectors on an AVX2 CPU made every kernel here 3-100x
 * slower than its loads. Its operations are the inline functions below (add, fma16, ...), lane j is lane(v, j); each
 * sum is the same whatever NH. */
#if defined(__AVX512F__)
#define NH 1
#elif defined(__AVX__)
#define NH 2
#else
#define NH 4
#endif
#define HW (16 / NH) /* lanes a machine vector */
typedef float hvf __attribute__((vector_size(64 / NH)));
typedef int32_t hvi __attribute__((vector_size(64 / NH)));
typedef struct { hvf h[NH]; } v16f;
typedef struct { hvi h[NH]; } v16i; /* also lane masks of compares: all ones or zero */
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

/* IN_REGISTER(v): v (a v16f) is loaded into registers here (GCC would fold its load into each use); a hint.
 * ROUNDED(v): v (a machine vector) is rounded here, whatever follows (GCC contracts a * b + c into an FMA across
 * statements). */
#define IN_REGISTER(v)                                                                                            \
    do {                                                                                                          \
        UNROLLED for (int h_ = 0; h_ < NH; h_++) __asm__("" : "+v"((v).h[h_]));                                   \
    } while (0)
#define ROUNDED(v) __asm__("" : "+v"(v))

/* UNROLLED: a loop of a few constant steps, fully unrolled, so that its arrays of vectors stay in registers (with
 * NH > 1 GCC left some in memory; with AVX-512 it spilled fewer of the wide int8 tiles' too) */
#define UNROLLED _Pragma("GCC unroll 16")

static inline v16f zero(void) { return (v16f){{{0}}}; }
static inline v16f splat(float s) {
    v16f r;
    UNROLLED for (int h = 0; h < NH; h++) r.h[h] = (hvf){0} + s;
    return r;
}
static inline v16f add(v16f a, v16f b) {
    UNROLLED for (int h = 0; h < NH; h++) a.h[h] += b.h[h];
    return a;
}
static inline v16f sub(v16f a, v16f b) {
    UNROLLED for (int h = 0; h < NH; h++) a.h[h] -= b.h[h];
    return a;
}
static inline v16f times(v16f a, float s) {
    UNROLLED for (int h = 0; h < NH; h++) a.h[h] *= s;
    return a;
}
static inline v16f fma16(v16f acc, v16f a, v16f b) { /* acc + a * b, lane-wise */
    UNROLLED for (int h = 0; h < NH; h++) acc.h[h] += a.h[h] * b.h[h];
    return acc;
}
static inline float lane(v16f a, int j) { return a.h[j / HW][j % HW]; }
static inline void set_lane(v16f *a, int j, float x) { a->h[j / HW][j % HW] = x; }
static inline void store(float *p, v16f a) { /* a machine vector at a time: a whole-struct copy goes by the stack */
    UNROLLED for (int h = 0; h < NH; h++) memcpy(p + h * HW, &a.h[h], sizeof a.h[h]);
}
static inline v16i bits_of(v16f a) {
    v16i r;
    UNROLLED for (int h = 0; h < NH; h++) r.h[h] = (hvi)a.h[h];
    return r;
}
static inline v16f float_of(v16i a) {
    v16f r;
    UNROLLED for (int h = 0; h < NH; h++) r.h[h] = (hvf)a.h[h];
    return r;
}
static inline v16i gt(v16f a, v16f b) { /* all ones where a > b */
    v16i r;
    UNROLLED for (int h = 0; h < NH; h++) r.h[h] = (hvi)(a.h[h] > b.h[h]);
    return r;
}
static inline v16i nan_mask(v16f a) { /* all ones where a is NaN */
    v16i r;
    UNROLLED for (int h = 0; h < NH; h++) r.h[h] = (hvi)(a.h[h] != a.h[h]);
    return r;
}
static inline v16i or16(v16i a, v16i b) {
    UNROLLED for (int h = 0; h < NH; h++) a.h[h] |= b.h[h];
    return a;
}
static inline int32_t ilane(v16i a, int j) { return a.h[j / HW][j % HW]; }
static inline v16f pick(v16i m, v16f a, v16f b) { /* a where m (all ones), else b */
    v16i ai = bits_of(a), bi = bits_of(b);
    UNROLLED for (int h = 0; h < NH; h++) ai.h[h] = (ai.h[h] & m.h[h]) | (bi.h[h] & ~m.h[h]);
    return float_of(ai);
}

/* Wide tiles: OUTS outputs x ROWS rows (fp32 weights; ROWS also the most rows of any tile), OUTS2 x ROWS2 for the
 * kernels of two chains (int8, bf16). AVX-512: 24 accumulators, 4 weight vectors and a row vector of its 32 registers.
 * AVX2 (16 registers, each 8 lanes: a v16f takes two): 1 x 4 (8 accumulators) and 1 x 3 (12); measured against 2 x 2
 * (fp32) and 2 x 1 (int8, bf16), the bench model's shapes: 1.1-1.4x at 4 rows, 1.05-1.1x at 16 (fp32; 0.82x on
 * 512 x 1024, where one output a tile reads the 16 rows from L2 twice as often), 1.15-1.45x (int8, bf16) */
#if NH == 1
#define OUTS 4
#define ROWS 6
#define OUTS2 4
#define ROWS2 3
#else
#define OUTS 1
#define ROWS 4
#define OUTS2 1
#define ROWS2 3
#endif
#define GROUP 4 /* one-output tiles a call (a call's setup and return cost ~10% at 1-4 rows of 512) */
/* int8 weights, one-output tiles (weight-only, 1-2 rows): the stream prefetched this many bytes ahead. Its FMAs take
 * 4x fp32's time a cache line, so fewer lines are in flight: read out of cache at one row, 1.05-1.25x without (16-17
 * -> 17-21 GB/s, 2 threads, AVX2 EPYC; the engine's fp32-int8-all at batch 1: 0.99-1.10x, within its noise); fp32 and
 * bf16 streams were at the read rate already, W8A8 did not move */
#define INT8_AHEAD 2048
#define NARROW_X_BYTES 16384 /* bytes of rows at most for tiles of one output (LINEAR) */

static inline v16f load_f32(const float *p) { /* 16 fp32 values */
    v16f r;
    UNROLLED for (int h = 0; h < NH; h++) memcpy(&r.h[h], p + h * HW, sizeof r.h[h]);
    return r;
}

static inline v16f load_i8(const int8_t *p) { /* 16 int8 weights as fp32 (exact) */
    v16f r;
#if defined(__AVX512F__)
    __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    memcpy(&r, &v, 64);
#elif defined(__AVX2__)
    __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))));
    r.h[0] = (hvf)lo, r.h[1] = (hvf)hi;
#else
    r = zero();
    for (int i = 0; i < 16; i++) set_lane(&r, i, (float)p[i]);
#endif
    return r;
}

static inline v16f load_bf16(const uint16_t *p) { /* 16 bf16 values as fp32 (exact) */
    v16f r;
#if defined(__AVX512F__)
    const __m512i v = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
    memcpy(&r, &v, 64);
#elif defined(__AVX2__)
    const __m256i lo = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
    const __m256i hi = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + 8))), 16);
    r.h[0] = (hvf)lo, r.h[1] = (hvf)hi;
#else
    uint32_t u[16];
    for (int i = 0; i < 16; i++) u[i] = (uint32_t)p[i] << 16;
    memcpy(&r, u, 64);
#endif
    return r;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float hsum(v16f a) { /* a fixed tree: lane i + (i + 8), then + 4, + 2, + 1 (as vector halves) */
#if NH == 1
    const v8f b = __builtin_shufflevector(a.h[0], a.h[0], 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(a.h[0], a.h[0], 8, 9, 10, 11, 12, 13, 14, 15);
#elif NH == 2
    const v8f b = a.h[0] + a.h[1];
#endif
#if NH <= 2
    const v4f c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
#else
    const v4f c = (a.h[0] + a.h[2]) + (a.h[1] + a.h[3]);
#endif
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* R rows of x [., I] against the C weight rows w[c]: acc[r][c] gets the 16 partial sums, made of A lane-wise
 * sums over every A-th block of 16 inputs (sum a takes blocks a, a + A, ...; a block past the last whole A goes to
 * sum 0), added in a order: A independent chains of FMAs a row and output, for kernels whose single chain would
 * wait on the FMA's latency (int8: a block of 16 weights is 16 bytes). pf: where to prefetch the next tile's
 * weights from (elements past w[c]; 0: none); one-output int8 tiles prefetch their own stream (INT8_AHEAD). */
#define TILE(NAME, WT, LOAD, R, C, A)                                                                        \
    static inline void NAME##R(const float *x, int64_t I, const WT *const *w, v16f acc[][C], int64_t pf) {   \
        v16f part[R][C][A];                                                                                  \
        UNROLLED for (int r = 0; r < R; r++)                                                                 \
            UNROLLED for (int c = 0; c < C; c++)                                                             \
                UNROLLED for (int a = 0; a < A; a++) part[r][c][a] = zero();                                 \
        int64_t k = 0;                                                                                       \
        for (; k + 16 * A <= I; k += 16 * A) {                                                               \
            if (pf && (k * (int64_t)sizeof(WT)) % 64 == 0)                                                   \
                UNROLLED for (int c = 0; c < C; c++) __builtin_prefetch(w[c] + pf + k, 0, 3);                \
            if (C == 1 && sizeof(WT) == 1 && k % 64 == 0) /* int8, one output a tile: see INT8_AHEAD */      \
                __builtin_prefetch(w[0] + k + INT8_AHEAD, 0, 3);                                             \
            UNROLLED for (int a = 0; a < A; a++) {                                                           \
                v16f wv[C];                                                                                  \
                UNROLLED for (int c = 0; c < C; c++) wv[c] = LOAD(w[c] + k + 16 * a);                        \
                UNROLLED for (int r = 0; r < R; r++) {                                                       \
                    v16f xv = load_f32(x + r * I + k + 16 * a);                                              \
                    if (C > 1) IN_REGISTER(xv); /* one load a row, not one a product (GCC folds it) */       \
                    UNROLLED for (int c = 0; c < C; c++) part[r][c][a] = fma16(part[r][c][a], xv, wv[c]);    \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
        for (; k < I; k += 16)                                                                               \
            UNROLLED for (int c = 0; c < C; c++) {                                                           \
                const v16f wv = LOAD(w[c] + k);                                                              \
                UNROLLED for (int r = 0; r < R; r++)                                                         \
                    part[r][c][0] = fma16(part[r][c][0], load_f32(x + r * I + k), wv);                       \
            }                                                                                                \
        UNROLLED for (int r = 0; r < R; r++)                                                                 \
            UNROLLED for (int c = 0; c < C; c++) {                                                           \
                acc[r][c] = part[r][c][0];                                                                   \
                UNROLLED for (int a = 1; a < A; a++) acc[r][c] = add(acc[r][c], part[r][c][a]);              \
            }                                                                                                \
    }

/* output tiles G group .. G group + G - 1 (C outputs each) of a linear, one after another, every row in tiles of up
 * to RMAX (at most ROWS), each output's sum times SCALE(o); A as TILE */
#define TILES(NAME, WT, LOAD, SCALE, C, A, RMAX, G)                                                          \
    TILE(NAME##_, WT, LOAD, 1, C, A)                                                                         \
    TILE(NAME##_, WT, LOAD, 2, C, A)                                                                         \
    TILE(NAME##_, WT, LOAD, 3, C, A)                                                                         \
    TILE(NAME##_, WT, LOAD, 4, C, A)                                                                         \
    TILE(NAME##_, WT, LOAD, 5, C, A)                                                                         \
    TILE(NAME##_, WT, LOAD, 6, C, A)                                                                         \
    static void NAME(const job *j, int64_t group) {                                                          \
        const WT *w = j->w, *wr[C];                                                                          \
        const int64_t I = j->I, O = j->O, n = j->n;                                                          \
        const uint16_t *s = j->s;                                                                            \
        (void)s;                                                                                             \
        for (int64_t t = group * G; t < group * G + G && t * C < O; t++) {                                   \
            for (int c = 0; c < C; c++) /* past the end: the last output again (computed, not stored) */     \
                wr[c] = w + (t * C + c < O ? t * C + c : O - 1) * I;                                         \
            for (int64_t r0 = 0; r0 < n; r0 += RMAX) {                                                       \
                v16f acc[6][C]; /* 6: the switch's cases, whatever ROWS */                                   \
                const int R = n - r0 < RMAX ? (int)(n - r0) : RMAX;                                          \
                const float *xr = j->x + r0 * I;                                                             \
                /* the first pass over this tile's weights prefetches the next tile's */                     \
                const int64_t pf = C > 1 && r0 == 0 && (t + 1) * C < O ? C * I : 0;                          \
                switch (R) {                                                                                 \
                    case 1: NAME##_1(xr, I, wr, acc, pf); break;                                             \
                    case 2: NAME##_2(xr, I, wr, acc, pf); break;                                             \
                    case 3: NAME##_3(xr, I, wr, acc, pf); break;                                             \
                    case 4: NAME##_4(xr, I, wr, acc, pf); break;                                             \
                    case 5: NAME##_5(xr, I, wr, acc, pf); break;                                             \
                    default: NAME##_6(xr, I, wr, acc, pf);                                                   \
                }                                                                                            \
                for (int r = 0; r < R; r++)                                                                  \
                    for (int c = 0; c < C && t * C + c < O; c++)                                             \
                        j->y[(r0 + r) * O + t * C + c] = hsum(acc[r][c]) SCALE(t * C + c);                   \
            }                                                                                                \
        }                                                                                                    \
    }

/* A linear to run, y [n, O] = x [n, I] @ w^T, as output tiles: one output a tile at up to NARROW_ROWS rows when
 * they fit in NARROW_X_BYTES (they are read again for each output, from L1; the weight is read as one sequential
 * stream a thread: 4 weight rows read side by side ran at half the GB/s at one row, AMD EPYC), else WIDE_OUTS
 * outputs a tile in passes of up to WIDE_ROWS rows (each row vector loaded once for WIDE_OUTS outputs; with more
 * than one, the first pass prefetches the next tile's weights: then faster from 3 rows in int8, 5 in fp32; see
 * OUTS for each ISA's shapes). A: TILE's. Each output is summed the same way in both. */
struct job;
typedef void (*tile_fn)(const struct job *, int64_t);
typedef struct job {
    const float *x;
    int64_t n, I;
    const void *w;
    const uint16_t *s;
    int64_t O;
    float *y;
    tile_fn tile; /* set by job_of */
    int64_t tiles;
    int w8a8;      /* W8A8: its rows are read quantized, from xq, xs and xsum (qbind points them) */
    int quantize;  /* W8A8: run() quantizes x into them first (0: another job of the call did, the same rows) */
    int8_t *xq;    /* [n, qstride(I)] */
    float *xs;     /* [n] */
    int32_t *xsum; /* [n] */
} job;

#define LINEAR(NAME, WT, LOAD, SCALE, A, WIDE_OUTS, WIDE_ROWS, NARROW_ROWS)                                  \
    TILES(NAME##_narrow, WT, LOAD, SCALE, 1, A, ROWS, GROUP)                                                 \
    TILES(NAME##_wide, WT, LOAD, SCALE, WIDE_OUTS, A, WIDE_ROWS, 1)                                          \
    static job NAME(const float *x, int64_t n, int64_t I, const void *w, const uint16_t *s, int64_t O, float *y) { \
        const int narrow = n <= NARROW_ROWS && n * I * 4 <= NARROW_X_BYTES;                                  \
        return (job){x, n, I, w, s, O, y, narrow ? NAME##_narrow : NAME##_wide,                              \
                     narrow ? (O + GROUP - 1) / GROUP : (O + WIDE_OUTS - 1) / WIDE_OUTS, 0, 0, NULL, NULL, NULL}; \
    }

#define NO_SCALE(o)
#define BF16_SCALE(o) *bf16_to_f32(s[o])
LINEAR(linear_f32, float, load_f32, NO_SCALE, 1, OUTS, ROWS, 4)
LINEAR(linear_i8, int8_t, load_i8, BF16_SCALE, 2, OUTS2, ROWS2, 2)
LINEAR(linear_bf16, uint16_t, load_bf16, NO_SCALE, 2, OUTS2, ROWS2, 2)

/* W8A8 (wtype 2): int8 weights q with bf16 scales s [O], as linear_i8's, and each row of x quantized to int8 too,
 * symmetric, one scale a row (dynamic, per token): xq = rint(x * (127 / m)), m = max |x| over the row (0 for a row
 * of zeros), scale m / 127. y[r, o] = ((float)(sum_k xq[r, k] q[o, k]) * (m_r / 127)) * s[o]: the integer sum is
 * exact (|q|, |xq| <= 127, I <= QMAX_I), so y is kernels/quant.py's w8a8_reference bit for bit, whatever the other
 * rows, the tiles or the thread count. With AVX-512 VNNI a vpdpbusd takes 64 weights: (q + 128) as unsigned bytes
 * times xq, the sum less 128 sum_k xq[r, k]; elsewhere int32 products, 16 at a time. */
#define QMAX_I 65536 /* inputs at most: 255 * 127 * I stays below 2^31 */
/* QOUTS outputs x QROWS rows a wide tile (n > 2); narrow (n <= 2), QNOUTS outputs a tile and QNG tiles a call; and
 * the weight's layout, QBLK (made at load: kernels/quant.py's interleave_rows).
 * AVX-512 VNNI: q [O, I] as it is; wide, 4 x 4 accumulators and 4 weight vectors; narrow, one output a tile (one row
 * read as one stream, 64 bytes a step).
 * Elsewhere a step takes 16 weights of each of a tile's 4 rows, and 4 rows read side by side are 4 streams of short
 * runs, read out of cache at about half the rate of one stream (AVX2 EPYC). So there the rows are interleaved in
 * groups of QGROUP: group g (rows QGROUP g .. + p - 1, p = QGROUP but for the last group of O % QGROUP rows) is p I
 * bytes from byte QGROUP g I on, 16 weights of its first row, 16 of its second, ..., then the next 16 of each: row
 * QGROUP g + c's weights k .. k + 15 at QGROUP g I + (k / 16) 16 p + 16 c. A tile is a group's 4 outputs, read as
 * one sequential stream prefetched INT8_AHEAD bytes ahead, at up to 2 rows a pass with AVX2 (8 accumulators, 4
 * weight vectors, a row vector of its 16 registers; 4 with AVX-512's 32): against the rows as they are (4 outputs x
 * 2 rows narrow, 2 x 4 wide, the next tile's rows prefetched), the engine's w8a8-all 1.28x at batch 1 and 16 with
 * the bench's small preset (rows of 512 B), 1.14x and 1.02x with its wide preset (2-7 KB); 2 x 4 tiles reading half a
 * group each were 0.92x 4 x 2 at batch 16 (wide preset; 2 threads, AVX2 EPYC, one process, ABBA order). */
#define QGROUP 4
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define QBLK 0 /* rows as they are */
#define QROWS 4
#define QOUTS 4
#define QNOUTS 1
#define QNG GROUP
#else
#define QBLK 16 /* interleaved in blocks of 16 */
#if NH == 1
#define QROWS 4
#else
#define QROWS 2
#endif
#define QOUTS 4
#define QNOUTS 4
#define QNG 1
#endif

/* 16, the bytes of a row an interleaved W8A8 weight holds together, or 0: rows as they are (QBLK) */
int moeray_w8a8_block(void) { return QBLK; }

static inline int64_t qstride(int64_t I) { return (I + 63) / 64 * 64; } /* a quantized row, zero-padded */

typedef uint32_t hvu __attribute__((vector_size(64 / NH)));
typedef int8_t hvb __attribute__((vector_size(16 / NH)));

static void quantize_row(const float *x, int64_t I, int8_t *q, float *scale, int32_t *sum) {
    hvu mv[4] = {{0}, {0}, {0}, {0}}; /* max |x| as bits (integer order is float order for |x|; NaN above inf) */
    for (int64_t k = 0; k < I; k += HW) { /* I a multiple of 16 */
        hvu a;
        memcpy(&a, x + k, sizeof a);
        a &= 0x7fffffffu;
        hvu *m = mv + (k / HW) % 4;
        *m = (*m & (hvu)(*m >= a)) | (a & (hvu)(*m < a));
    }
    uint32_t mb = 0;
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < HW; i++) mb = mv[j][i] > mb ? mv[j][i] : mb;
    float m;
    memcpy(&m, &mb, 4);
    *scale = m / 127.f;
    if (!(m > 0.f && m < INFINITY)) { /* zeros, inf or NaN: zeros */
        memset(q, 0, qstride(I)), *sum = 0;
        return;
    }
    const float inv = 127.f / m;
    const hvf magic = (hvf){0} + 12582912.f; /* 1.5 * 2^23: + magic - magic rounds to an integer, ties to even */
    hvi t = {0};
    for (int64_t k = 0; k < I; k += HW) { /* |x * inv| <= 127 (within an ulp): no clamp */
        hvf v;
        memcpy(&v, x + k, sizeof v);
        v *= inv;
        ROUNDED(v); /* x * inv rounded, as the reference's: no FMA with the + magic */
        const hvi r = __builtin_convertvector((v + magic) - magic, hvi);
        const hvb b = __builtin_convertvector(r, hvb);
        memcpy(q + k, &b, HW);
        t += r;
    }
    memset(q + I, 0, qstride(I) - I);
    int32_t total = 0;
    for (int i = 0; i < HW; i++) total += t[i];
    *sum = total;
}

/* dot[r][c] = sum_k xq[r, k] w[c][k] (exact) for R rows of quantized x (rows Ip apart, xsum their sums) and C
 * weight rows, weights k .. k + 15 of row c at w[c] + (k / 16) ws (QBLK 16; ws 16 p); pf: prefetch w[0] + pf + that
 * (0: none; QBLK 0: the next tile's rows, w[c] + pf + k) */
#define QTILE(R, C)                                                                                               \
    static inline void qtile_##R##_##C(const int8_t *xq, int64_t Ip, const int32_t *xsum, int64_t I,              \
                                       const int8_t *const *w, int64_t ws, int32_t dot[][C], int64_t pf) {        \
        QTILE_BODY(R, C)                                                                                          \
    }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define QTILE_STEP(R, C, LOAD)                                                                                    \
    {                                                                                                             \
        __m512i wv[C];                                                                                            \
        for (int c = 0; c < C; c++) wv[c] = _mm512_xor_si512(LOAD, flip);                                         \
        for (int r = 0; r < R; r++) {                                                                             \
            __m512i xv = _mm512_loadu_si512(xq + r * Ip + k); /* zeros past I */                                  \
            if (C > 1) __asm__("" : "+v"(xv)); /* one load a row, not one a product (as TILE's IN_REGISTER) */    \
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], wv[c], xv);                    \
        }                                                                                                         \
    }
#define QTILE_BODY(R, C)                                                                                          \
    const __m512i flip = _mm512_set1_epi8((char)0x80); /* q + 128 as unsigned bytes */                            \
    (void)ws;                                                                                                     \
    __m512i acc[R][C];                                                                                            \
    for (int r = 0; r < R; r++)                                                                                   \
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_si512();                                           \
    int64_t k = 0;                                                                                                \
    for (; k + 64 <= I; k += 64) {                                                                                \
        if (pf)                                                                                                   \
            for (int c = 0; c < C; c++) __builtin_prefetch(w[c] + pf + k, 0, 3);                                  \
        QTILE_STEP(R, C, _mm512_loadu_si512(w[c] + k))                                                            \
    }                                                                                                             \
    if (k < I) {                                                                                                  \
        const __mmask64 in = ((__mmask64)1 << (I - k)) - 1;                                                       \
        QTILE_STEP(R, C, _mm512_maskz_loadu_epi8(in, w[c] + k))                                                   \
    }                                                                                                             \
    for (int r = 0; r < R; r++)                                                                                   \
        for (int c = 0; c < C; c++) dot[r][c] = _mm512_reduce_add_epi32(acc[r][c]) - 128 * xsum[r];
#elif defined(__AVX2__) /* vpmaddwd: 16 int8 values widened to int16, their products summed in pairs (exact) */
static inline void hsum4(const __m256i *a, int32_t *out) { /* out[i]: the sum of a[i]'s 8 lanes, i < 4 */
    const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
    const __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    memcpy(out, &t, 16);
}
#define QTILE_BODY(R, C)                                                                                          \
    __m256i acc[R][C];                                                                                            \
    (void)xsum;                                                                                                   \
    for (int r = 0; r < R; r++)                                                                                   \
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_si256();                                           \
    for (int64_t k = 0, at = 0; k < I; k += 16, at += ws) {                                                       \
        if (pf) __builtin_prefetch(w[0] + pf + at, 0, 3);                                                         \
        __m256i wv[C];                                                                                            \
        for (int c = 0; c < C; c++) wv[c] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w[c] + at)));  \
        for (int r = 0; r < R; r++) {                                                                             \
            const __m256i xv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(xq + r * Ip + k)));         \
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(xv, wv[c]));    \
        }                                                                                                         \
    }                                                                                                             \
    for (int r = 0; r < R; r++) {                                                                                 \
        for (int c = 0; c + 4 <= C; c += 4) hsum4(acc[r] + c, dot[r] + c);                                        \
        for (int c = C - C % 4; c < C; c++) {                                                                     \
            int32_t t[8];                                                                                         \
            memcpy(t, &acc[r][c], 32);                                                                            \
            dot[r][c] = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));                        \
        }                                                                                                         \
    }
#else
#define QTILE_BODY(R, C)                                                                                          \
    hvi acc[R][C][NH];                                                                                            \
    (void)xsum, (void)pf;                                                                                         \
    int64_t at = 0;                                                                                               \
    for (int r = 0; r < R; r++)                                                                                   \
        for (int c = 0; c < C; c++)                                                                               \
            UNROLLED for (int h = 0; h < NH; h++) acc[r][c][h] = (hvi){0};                                        \
    for (int64_t k = 0; k < I; k += 16, at += ws)                                                                 \
        UNROLLED for (int h = 0; h < NH; h++) {                                                                   \
            hvi wv[C];                                                                                            \
            for (int c = 0; c < C; c++) {                                                                         \
                hvb b;                                                                                            \
                memcpy(&b, w[c] + at + h * HW, HW);                                                               \
                wv[c] = __builtin_convertvector(b, hvi);                                                          \
            }                                                                                                     \
            for (int r = 0; r < R; r++) {                                                                         \
                hvb b;                                                                                            \
                memcpy(&b, xq + r * Ip + k + h * HW, HW);                                                         \
                const hvi xv = __builtin_convertvector(b, hvi);                                                   \
                for (int c = 0; c < C; c++) acc[r][c][h] += xv * wv[c];                                           \
            }                                                                                                     \
        }                                                                                                         \
    for (int r = 0; r < R; r++)                                                                                   \
        for (int c = 0; c < C; c++) {                                                                             \
            int32_t t = 0;                                                                                        \
            UNROLLED for (int h = 0; h < NH; h++)                                                                 \
                for (int i = 0; i < HW; i++) t += acc[r][c][h][i];                                                \
            dot[r][c] = t;                                                                                        \
        }
#endif

#define QNAME(R, C) QNAME_(R, C) /* C expanded first (QOUTS, QNOUTS) */
#define QNAME_(R, C) qtile_##R##_##C
#define QTILES_OF(C) QTILE(1, C) QTILE(2, C) QTILE(3, C) QTILE(4, C) /* tiles of C outputs, 1 to 4 rows */
QTILES_OF(QOUTS)
#if QNOUTS != QOUTS
QTILES_OF(QNOUTS)
#endif
/* a W8A8 linear's output tiles, as TILES' (C outputs a tile, G tiles a call, rows in passes of up to QROWS), the
 * weight in QBLK's layout */
#define QTILES(NAME, C, G)                                                                                        \
    static void NAME(const job *j, int64_t group) {                                                               \
        const int8_t *w = j->w, *wr[C];                                                                           \
        const int64_t I = j->I, O = j->O, n = j->n, Ip = qstride(I);                                              \
        for (int64_t t = group * G; t < group * G + G && t * C < O; t++) {                                        \
            const int64_t g = t * C / QGROUP * QGROUP, p = O - g < QGROUP ? O - g : QGROUP; /* its rows' group */ \
            const int64_t ws = QBLK ? QBLK * p : 16;                                                              \
            for (int c = 0; c < C; c++) {                                                                         \
                const int64_t o = t * C + c < O ? t * C + c : O - 1;                                              \
                wr[c] = QBLK ? w + g * I + (o - g) * QBLK : w + o * I;                                            \
            }                                                                                                     \
            for (int64_t r0 = 0; r0 < n; r0 += QROWS) {                                                           \
                int32_t dot[4][C]; /* 4: the switch's cases, whatever QROWS */                                    \
                const int R = n - r0 < QROWS ? (int)(n - r0) : QROWS;                                             \
                const int8_t *xr = j->xq + r0 * Ip;                                                               \
                const int32_t *sr = j->xsum + r0;                                                                 \
                const int64_t pf = r0 ? 0 : QBLK ? INT8_AHEAD : C > 1 && (t + 1) * C < O ? C * I : 0;             \
                switch (R) {                                                                                      \
                    case 1: QNAME(1, C)(xr, Ip, sr, I, wr, ws, dot, pf); break;                                   \
                    case 2: QNAME(2, C)(xr, Ip, sr, I, wr, ws, dot, pf); break;                                   \
                    case 3: QNAME(3, C)(xr, Ip, sr, I, wr, ws, dot, pf); break;                                   \
                    default: QNAME(4, C)(xr, Ip, sr, I, wr, ws, dot, pf);                                         \
                }                                                                                                 \
                for (int r = 0; r < R; r++)                                                                       \
                    for (int c = 0; c < C && t * C + c < O; c++)                                                  \
                        j->y[(r0 + r) * O + t * C + c] =                                                          \
                            (float)dot[r][c] * j->xs[r0 + r] * bf16_to_f32(j->s[t * C + c]);                      \
            }                                                                                                     \
        }                                                                                                         \
    }
QTILES(w8a8_narrow, QNOUTS, QNG)
QTILES(w8a8_wide, QOUTS, 1)

static job linear_w8a8(const float *x, int64_t n, int64_t I, const void *w, const uint16_t *s, int64_t O, float *y) {
    const int narrow = n <= 2;
    return (job){x, n, I, w, s, O, y, narrow ? w8a8_narrow : w8a8_wide,
                 narrow ? (O + QNOUTS * QNG - 1) / (QNOUTS * QNG) : (O + QOUTS - 1) / QOUTS, 1, 0, NULL, NULL, NULL};
}

/* bytes of scratch the quantized rows of jobs[0, count) take (qbind) */
static size_t qbytes(const job *jobs, int count) {
    size_t b = 0;
    for (int i = 0; i < count; i++)
        if (jobs[i].w8a8) b += jobs[i].n * (qstride(jobs[i].I) + 8);
    return b;
}

/* points the W8A8 jobs' quantized rows into buf (qbytes of them): a job whose rows an earlier job of these reads
 * (the same x, n, I) shares them, and only the first quantizes */
static void qbind(job *jobs, int count, char *buf) {
    for (int i = 0; i < count; i++) {
        job *j = jobs + i;
        if (!j->w8a8) continue;
        int shared = 0;
        for (int e = 0; e < i && !shared; e++)
            if (jobs[e].w8a8 && jobs[e].x == j->x && jobs[e].n == j->n && jobs[e].I == j->I) {
                j->xq = jobs[e].xq, j->xs = jobs[e].xs, j->xsum = jobs[e].xsum, shared = 1;
            }
        if (shared) continue;
        j->quantize = 1;
        j->xq = (int8_t *)buf, buf += j->n * qstride(j->I);
        j->xs = (float *)buf, buf += j->n * 4;
        j->xsum = (int32_t *)buf, buf += j->n * 4;
    }
}

/* scratch for the quantized rows of the W8A8 jobs among a[0, na) and b[0, nb) (b's x may not be written yet), bound
 * to them (qbind); *buf NULL where none is W8A8. 0 on success, 2 out of memory. */
static int qalloc(job *a, int na, job *b, int nb, char **buf) {
    const size_t qa = qbytes(a, na), total = qa + qbytes(b, nb);
    *buf = NULL;
    if (!total) return 0;
    if (!(*buf = malloc(total))) return 2;
    qbind(a, na, *buf), qbind(b, nb, *buf + qa);
    return 0;
}

/* a W8A8 kernel's inputs past QMAX_I (wtype 2, linear_of's) */
static int too_wide(int wtype, int64_t a, int64_t b) { return wtype == 2 && (a > QMAX_I || b > QMAX_I); }

/* The tiles of `count` jobs, split among the threads of the enclosing OpenMP parallel region in contiguous
 * ranges (all of them, when called outside one); no barrier at the end. W8A8 jobs' rows are quantized first (split
 * among the threads, then a barrier). */
static void run(const job *jobs, int count) {
    int64_t rows = 0;
    for (int i = 0; i < count; i++) rows += jobs[i].quantize ? jobs[i].n : 0;
    if (rows) {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            int64_t i = 0, at = r;
            for (; !jobs[i].quantize || at >= jobs[i].n; i++) at -= jobs[i].quantize ? jobs[i].n : 0;
            const job *j = jobs + i;
            quantize_row(j->x + at * j->I, j->I, j->xq + at * qstride(j->I), j->xs + at, j->xsum + at);
        }
    }
    int64_t total = 0;
    for (int i = 0; i < count; i++) total += jobs[i].tiles;
    const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t lo = total * me / threads, hi = total * (me + 1) / threads; /* this thread's tiles, of all */
    int64_t first = 0;                                                          /* jobs[i]'s first tile, of all */
    for (int i = 0; i < count && first < hi; first += jobs[i++].tiles) {
        const int64_t from = lo > first ? lo - first : 0, to = hi - first < jobs[i].tiles ? hi - first : jobs[i].tiles;
        for (int64_t t = from; t < to; t++) jobs[i].tile(&jobs[i], t);
    }
}

static int linear(job j, int threads) {
    if (j.I % 16 || j.n < 1 || j.O < 1 || (j.w8a8 && j.I > QMAX_I)) return 1;
    char *buf;
    if (qalloc(&j, 1, NULL, 0, &buf)) return 2;
#pragma omp parallel num_threads(threads)
    run(&j, 1);
    free(buf);
    return 0;
}

/* 0 on success; 1: I not a multiple of 16, or n or O < 1 (W8A8: or I > QMAX_I); 2: out of memory */
int moeray_linear_f32(const float *x, int64_t n, int64_t I, const float *w, int64_t O, float *y, int threads) {
    return linear(linear_f32(x, n, I, w, NULL, O, y), threads);
}

int moeray_linear_i8(const float *x, int64_t n, int64_t I, const int8_t *q, const uint16_t *s, int64_t O, float *y,
                     int threads) {
    return linear(linear_i8(x, n, I, q, s, O, y), threads);
}

int moeray_linear_w8a8(const float *x, int64_t n, int64_t I, const int8_t *q, const uint16_t *s, int64_t O, float *y,
                       int threads) {
    return linear(linear_w8a8(x, n, I, q, s, O, y), threads);
}

int moeray_linear_bf16(const float *x, int64_t n, int64_t I, const uint16_t *w, int64_t O, float *y, int threads) {
    return linear(linear_bf16(x, n, I, w, NULL, O, y), threads);
}

/* Decode attention over a paged KV cache, read in place: for each sequence b and query head h (of H; kv-head
 * h / (H / KV), GQA), out[b, h] = sum_c p_c v[slot(b, c), kvh] with p = softmax over the allowed c of
 * scale * q[b, h] . k[slot(b, c), kvh]. q [B, H, hd] and out fp32; the pools [S, KV, hd] fp32 (pool_bf16 0) or
 * bf16 (1); slots [B, C] pool rows, mask [B, C] bytes (nonzero: may attend; each b has one at least). Per
 * (b, h), in a fixed order whatever B, C beyond b's last allowed key or the thread count: a dot product as 16
 * lane-wise partial sums and the lane tree (16 keys' trees side by side, lane_sums), the max, e^(s - max) 16 keys
 * at a time (exp_nonpositive; 0 for a key not attended) summed lane-wise (key c in lane c mod 16) then by the lane
 * tree, the v rows weighted and summed in c order, times 1 / that sum: a sequence's result does not depend on the
 * others of its step. hd a multiple of 16. Threads split the (b, kv-head) pairs; a pair's G = H / KV heads share each
 * k (from L1) and v row loaded, and its outputs are summed in registers, 4 heads x 64 of hd at a time (a pass over
 * the v rows' part each). The k and v rows are prefetched KV_AHEAD keys ahead. 0 on success, 1 bad arguments, 2 out
 * of memory. */
static inline v16f load_kv(const void *pool, int bf16, int64_t at) {
    return bf16 ? load_bf16((const uint16_t *)pool + at) : load_f32((const float *)pool + at);
}

/* lane j: the sum of a[j]'s 16 lanes, by a fixed tree (halves, then quarters, ... of each, side by side): hsum's */
static inline v16f lane_sums(const v16f a[16]) {
#if NH == 1
    hvf r1[8], r2[4], r3[2];
    for (int i = 0; i < 8; i++) {
        const hvf x = a[2 * i].h[0], y = a[2 * i + 1].h[0];
        r1[i] = __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    }
    for (int i = 0; i < 4; i++) {
        const hvf x = r1[2 * i], y = r1[2 * i + 1];
        r2[i] = __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    }
    for (int i = 0; i < 2; i++) {
        const hvf x = r2[2 * i], y = r2[2 * i + 1];
        r3[i] = __builtin_shufflevector(x, y, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
                __builtin_shufflevector(x, y, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    }
    return (v16f){{__builtin_shufflevector(r3[0], r3[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
                   __builtin_shufflevector(r3[0], r3[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31)}};
#else
    v16f r;
    for (int j = 0; j < 16; j++) set_lane(&r, j, hsum(a[j]));
    return r;
#endif
}

/* e^x for x <= 0, 16 lanes (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r, times 2^n;
 * within 2 ulp of expf), 0 below -87 (2^n would leave the normal range) */
static inline hvf exp_h(hvf x) { /* exp_nonpositive's, a machine vector */
    const hvi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, hvi); /* round(x log2 e), x <= 0 */
    const hvf nf = __builtin_convertvector(n, hvf);
    const hvf r = x - nf * 0.693359375f - nf * -2.12194440e-4f;
    hvf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const hvi bits = (n + 127) << 23;
    hvf scale;
    memcpy(&scale, &bits, sizeof scale);
    const hvf e = p * scale;
    hvi ebits;
    memcpy(&ebits, &e, sizeof ebits);
    ebits &= (hvi)(x >= -87.f); /* all ones where kept */
    hvf out;
    memcpy(&out, &ebits, sizeof out);
    return out;
}
static inline v16f exp_nonpositive(v16f x) {
    UNROLLED for (int h = 0; h < NH; h++) x.h[h] = exp_h(x.h[h]);
    return x;
}

/* a k or v row's hd values, KV_AHEAD keys before they are read (the rows are scattered over the pool: the hardware
 * prefetcher does not see them coming, and each waited on memory) */
#define KV_AHEAD 8
static inline void prefetch_kv(const void *pool, int bf16, int64_t at, int64_t hd) {
    const char *p = bf16 ? (const char *)((const uint16_t *)pool + at) : (const char *)((const float *)pool + at);
    for (int64_t i = 0; i < hd * (bf16 ? 2 : 4); i += 64) __builtin_prefetch(p + i, 0, 3);
}

int moeray_decode_attention(const float *q, int64_t B, int64_t H, int64_t hd, const void *k_pool,
                            const void *v_pool, int pool_bf16, int64_t KV, const int64_t *slots, const uint8_t *mask,
                            int64_t C, float scale, float *out, int threads) {
    if (hd % 16 || B < 1 || KV < 1 || H % KV || C < 1) return 1;
    const int64_t G = H / KV, pairs = B * KV, Cp = (C + 15) / 16 * 16; /* p rows padded to whole vectors */
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *p = malloc(sizeof(float) * G * Cp);
        if (!p) failed = 1;
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < pairs; pair++) {
            if (!p) continue;
            const int64_t b = pair / KV, kvh = pair % KV;
            const float *qb = q + (b * H + kvh * G) * hd;
            float *ob = out + (b * H + kvh * G) * hd;
            float top[G], inv[G];
            v16f tops[G];
            for (int64_t g = 0; g < G; g++) tops[g] = splat(-INFINITY);
            for (int64_t c0 = 0; c0 < Cp; c0 += 16) { /* scores, 16 keys at a time; -inf where not attended */
                int64_t row[16];
                int32_t on_lanes[16];
                for (int j = 0; j < 16; j++) {
                    const int64_t c = c0 + j;
                    on_lanes[j] = c < C && mask[b * C + c] ? -1 : 0;
                    row[j] = on_lanes[j] ? (slots[b * C + c] * KV + kvh) * hd : -1;
                    if (c + KV_AHEAD < C && mask[b * C + c + KV_AHEAD])
                        prefetch_kv(k_pool, pool_bf16, (slots[b * C + c + KV_AHEAD] * KV + kvh) * hd, hd);
                }
                v16i on;
                memcpy(&on, on_lanes, 64);
                for (int64_t g = 0; g < G; g++) {
                    v16f acc[16];
                    for (int j = 0; j < 16; j++) acc[j] = zero();
                    for (int64_t d = 0; d < hd; d += 16) {
                        const v16f qv = load_f32(qb + g * hd + d);
                        for (int j = 0; j < 16; j++)
                            if (row[j] >= 0) acc[j] = fma16(acc[j], qv, load_kv(k_pool, pool_bf16, row[j] + d));
                    }
                    const v16f sc = pick(on, times(lane_sums(acc), scale), splat(-INFINITY));
                    store(p + g * Cp + c0, sc);
                    tops[g] = pick(gt(sc, tops[g]), sc, tops[g]);
                }
            }
            for (int64_t g = 0; g < G; g++) {
                top[g] = -INFINITY;
                for (int j = 0; j < 16; j++) top[g] = lane(tops[g], j) > top[g] ? lane(tops[g], j) : top[g];
            }
            for (int64_t g = 0; g < G; g++) { /* e^(s - max), 16 keys at a time (0 where -inf), and their sum */
                v16f sum = zero();
                for (int64_t c = 0; c < Cp; c += 16) {
                    const v16f e = exp_nonpositive(sub(load_f32(p + g * Cp + c), splat(top[g])));
                    store(p + g * Cp + c, e);
                    sum = add(sum, e);
                }
                inv[g] = 1.f / hsum(sum);
            }
            /* out = sum_c p_c v_c / sum: 4 heads x 4 vectors of 16 outputs in registers, over the keys in order */
            for (int64_t g0 = 0; g0 < G; g0 += 4) {
                const int64_t gn = G - g0 < 4 ? G - g0 : 4;
                for (int64_t d0 = 0; d0 < hd; d0 += 64) {
                    const int64_t dn = (hd - d0) / 16 < 4 ? (hd - d0) / 16 : 4;
                    v16f acc[4][4];
                    for (int g = 0; g < 4; g++)
                        for (int j = 0; j < 4; j++) acc[g][j] = zero();
                    for (int64_t c = 0; c < C; c++) {
                        if (!mask[b * C + c]) continue;
                        const int64_t row = (slots[b * C + c] * KV + kvh) * hd + d0;
                        if (c + KV_AHEAD < C)
                            prefetch_kv(v_pool, pool_bf16, (slots[b * C + c + KV_AHEAD] * KV + kvh) * hd + d0, dn * 16);
                        v16f vv[4];
                        for (int j = 0; j < 4; j++)
                            vv[j] = j < dn ? load_kv(v_pool, pool_bf16, row + 16 * j) : zero();
                        for (int g = 0; g < 4; g++) {
                            if (g >= gn) break;
                            const v16f w = splat(p[(g0 + g) * Cp + c]);
                            for (int j = 0; j < 4; j++) acc[g][j] = fma16(acc[g][j], w, vv[j]);
                        }
                    }
                    for (int g = 0; g < gn; g++)
                        for (int j = 0; j < dn; j++)
                            store(ob + (g0 + g) * hd + d0 + 16 * j, times(acc[g][j], inv[g0 + g]));
                }
            }
        }
        free(p);
    }
    return failed ? 2 : 0;
}

/* xn [B, D] = norm * (x * r), r = 1 / sqrt(mean(x^2) + eps) per row (RMSNorm in fp32; the squares summed in
 * order) */
static void rms_norm(const float *x, int64_t B, int64_t D, const float *norm, float eps, float *xn) {
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * D;
        float ss = 0.f;
        for (int64_t d = 0; d < D; d++) ss += xb[d] * xb[d];
        const float r = 1.f / sqrtf(ss / (float)D + eps);
        for (int64_t d = 0; d < D; d++) xn[b * D + d] = norm[d] * (xb[d] * r);
    }
}

/* SwiGLU FFNs, y = w2(silu(w1 x) * w3 x), on blocks of rows: FFN i takes rows [at[i], at[i + 1]) of x [., D]
 * -> y [., D] fp32, its w1, w3 [F, D] and w2 [D, F] at w1[i], w3[i], w2[i]: fp32 (wtype 0), int8 with bf16 scales
 * s1[i], s3[i], s2[i] (wtype 1; 2: W8A8) or bf16 (wtype 3). Each linear as moeray_linear_* computes it; h [2 rows,
 * F] scratch. One parallel region: every FFN's w1 and w3 tiles split among the threads, then silu * up, then every
 * w2 tile (not a region a linear: at 4 rows an expert, 24 of them a MoE layer). 0 on success, 2 out of memory. */
typedef job (*job_fn)(const float *, int64_t, int64_t, const void *, const uint16_t *, int64_t, float *);

static int ffns(const float *x, const int64_t *at, int count, int64_t D, int64_t F, const void *const *w1,
                const void *const *w3, const void *const *w2, const uint16_t *const *s1, const uint16_t *const *s3,
                const uint16_t *const *s2, job_fn lin, float *h, float *y, int threads) {
    const int64_t rows = at[count];
    float *h1 = h, *h3 = h + rows * F;
    job up[2 * count], down[count];
    for (int i = 0; i < count; i++) {
        const int64_t n = at[i + 1] - at[i];
        up[2 * i] = lin(x + at[i] * D, n, D, w1[i], s1[i], F, h1 + at[i] * F);
        up[2 * i + 1] = lin(x + at[i] * D, n, D, w3[i], s3[i], F, h3 + at[i] * F);
        down[i] = lin(h1 + at[i] * F, n, F, w2[i], s2[i], D, y + at[i] * D);
    }
    char *buf;
    if (qalloc(up, 2 * count, down, count, &buf)) return 2;
#pragma omp parallel num_threads(threads)
    {
        run(up, 2 * count);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows * F; i++) h1[i] = h1[i] / (1.f + expf(-h1[i])) * h3[i];
        run(down, count);
    }
    free(buf);
    return 0;
}

static job_fn linear_of(int wtype) { /* wtype: 0 fp32, 1 int8, 2 W8A8, 3 bf16 weights */
    static const job_fn kinds[] = {linear_f32, linear_i8, linear_w8a8, linear_bf16};
    return wtype >= 0 && wtype < 4 ? kinds[wtype] : NULL;
}

/* y [n, D] = x + f(xn) with xn = rms_norm(x, norm, eps), the FFN half of a layer; or f(x) where norm is NULL */
static void residual(const float *x, int64_t n, int64_t D, const float *norm, float *y) {
    if (norm)
        for (int64_t i = 0; i < n * D; i++) y[i] = x[i] + y[i];
}

/* one FFN f on x [n, D] -> y [n, D] (see residual): 0 on success; 1 bad arguments; 2 out of memory */
int moeray_ffn(const float *x, int64_t n, int64_t D, int64_t F, const float *norm, float eps, const void *w1,
               const void *w3, const void *w2, const uint16_t *s1, const uint16_t *s3, const uint16_t *s2, int wtype,
               float *y, int threads) {
    job_fn lin = linear_of(wtype);
    if (!lin || n < 1 || D % 16 || F % 16 || too_wide(wtype, D, F)) return 1;
    float *h = malloc(sizeof(float) * (2 * n * F + n * D)), *xn = h + 2 * n * F;
    if (!h) return 2;
    if (norm) rms_norm(x, n, D, norm, eps, xn);
    const int64_t at[2] = {0, n};
    const int rc = ffns(norm ? xn : x, at, 1, D, F, &w1, &w3, &w2, &s1, &s3, &s2, lin, h, y, threads);
    if (!rc) residual(x, n, D, norm, y);
    free(h);
    return rc;
}

/* A MoE layer f on n tokens x [n, D] -> y [n, D] fp32 (see residual; f on xn = the normed x): router logits
 * x @ gate^T (gate [E, D] fp32), the top k per token (the larger logit first, the lower expert on ties), their
 * softmax in fp32; each expert e's FFN (weights at w1[e], w3[e], w2[e], scales s*[e], as moeray_ffn) on its
 * tokens in token order; each token's outputs weighted and summed in expert order (as kernels/moe.py's combine).
 * 0 on success; 1 bad arguments; 2 out of memory. */
int moeray_moe(const float *x, int64_t n, int64_t D, int64_t F, const float *norm, float eps, const float *gate,
               int64_t E, int64_t k, const void *const *w1, const void *const *w3, const void *const *w2,
               const uint16_t *const *s1, const uint16_t *const *s3, const uint16_t *const *s2, int wtype, float *y,
               int threads) {
    job_fn lin = linear_of(wtype);
    if (!lin || n < 1 || D % 16 || F % 16 || k < 1 || k > E || E > 256 || too_wide(wtype, D, F)) return 1;
    float *logits = malloc(sizeof(float) * n * E), *wt = malloc(sizeof(float) * n * k);
    int64_t *chosen = malloc(sizeof(int64_t) * n * k), *rows = malloc(sizeof(int64_t) * n * k);
    float *buf = malloc(sizeof(float) * (2 * n * k * D + 2 * n * k * F + n * D));
    int rc = 0;
    if (!logits || !wt || !chosen || !rows || !buf) {
        rc = 2;
        goto done;
    }
    const float *x0 = x; /* the residual */
    if (norm) {
        float *xn = buf + 2 * n * k * D + 2 * n * k * F;
        rms_norm(x, n, D, norm, eps, xn);
        x = xn;
    }
    const job route = linear_f32(x, n, D, gate, NULL, E, logits);
    run(&route, 1); /* outside a parallel region: this thread, all tiles (E outputs) */
    for (int64_t t = 0; t < n; t++) {
        const float *l = logits + t * E;
        unsigned char taken[256] = {0};
        for (int64_t j = 0; j < k; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (!taken[e] && (best < 0 || l[e] > l[best])) best = e;
            taken[best] = 1;
            chosen[t * k + j] = best;
        }
        const float top = l[chosen[t * k]];
        float sum = 0.f;
        for (int64_t j = 0; j < k; j++) sum += wt[t * k + j] = expf(l[chosen[t * k + j]] - top);
        for (int64_t j = 0; j < k; j++) wt[t * k + j] /= sum;
    }
    /* dispatch: the experts' rows in blocks, expert order, token order within */
    float *xe = buf, *ye = buf + n * k * D, *h = buf + 2 * n * k * D;
    int64_t at[257], m = 0;
    int count = 0;
    const void *u1[256], *u3[256], *d2[256];
    const uint16_t *v1[256], *v3[256], *v2[256];
    at[0] = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t start = m;
        for (int64_t t = 0; t < n; t++)
            for (int64_t j = 0; j < k; j++)
                if (chosen[t * k + j] == e) {
                    rows[m] = t * k + j;
                    memcpy(xe + m++ * D, x + t * D, sizeof(float) * D);
                }
        if (m == start) continue;
        u1[count] = w1[e], u3[count] = w3[e], d2[count] = w2[e], v1[count] = s1[e], v3[count] = s3[e];
        v2[count] = s2[e];
        at[++count] = m;
    }
    if ((rc = ffns(xe, at, count, D, F, u1, u3, d2, v1, v3, v2, lin, h, ye, threads))) goto done;
    /* combine: each token's rows weighted and summed in expert order */
    memset(y, 0, sizeof(float) * n * D);
    for (int64_t i = 0; i < m; i++) {
        float *yt = y + rows[i] / k * D;
        const float w = wt[rows[i]];
        for (int64_t d = 0; d < D; d++) yt[d] += ye[i * D + d] * w;
    }
    residual(x0, n, D, norm, y);
done:
    free(logits), free(wt), free(chosen), free(rows), free(buf);
    return rc;
}

/* bf16 of an fp32, rounded to nearest even (as torch's .to(torch.bfloat16); not for NaN) */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* The attention half of a decode step's layer in one call, as kernels/model.py's TransformerBlock computes it:
 * out [B, D] = x + wo(attention(rope(wq xn), rope(wk xn), wv xn)), xn = norm * x / sqrt(mean(x^2) + eps), the
 * new k and v written to the pools at write_slots [B] first (as decode_attention does), then each sequence's
 * keys read in place as moeray_decode_attention reads them (slots, mask [B, C]). x, norm and out fp32; wq [H hd,
 * D], wk and wv [KV hd, D], wo [D, H hd]: any wtype of linear_of (int8's bf16 scales sq, sk, sv, so); rope
 * [B, hd/2, 2] (cos, sin) of each sequence's position, rotating interleaved pairs (2j, 2j + 1) of q and k; pools
 * [S, KV, hd] fp32 or bf16 (pool_bf16). 0 on success, 1 bad arguments, 2 out of memory. */
int moeray_attention_block(const float *x, int64_t B, int64_t D, const float *norm, float eps, const void *wq,
                           const void *wk, const void *wv, const void *wo, const uint16_t *sq, const uint16_t *sk,
                           const uint16_t *sv, const uint16_t *so, int wtype, int64_t H, int64_t KV, int64_t hd,
                           const float *rope, void *k_pool, void *v_pool, int pool_bf16, const int64_t *write_slots,
                           const int64_t *slots, const uint8_t *mask, int64_t C, float scale, float *out,
                           int threads) {
    job_fn lin = linear_of(wtype);
    if (!lin || B < 1 || D % 16 || hd % 16 || KV < 1 || H % KV || C < 1 || too_wide(wtype, D, H * hd)) return 1;
    const int64_t Q = H * hd, K = KV * hd;
    float *buf = malloc(sizeof(float) * B * (D + 2 * Q + 2 * K));
    if (!buf) return 2;
    float *xn = buf, *q = xn + B * D, *k = q + B * Q, *v = k + B * K, *o = v + B * K;
    rms_norm(x, B, D, norm, eps, xn);
    job proj[3] = {lin(xn, B, D, wq, sq, Q, q), lin(xn, B, D, wk, sk, K, k), lin(xn, B, D, wv, sv, K, v)};
    job down = lin(o, B, Q, wo, so, D, out);
    char *qbuf;
    if (qalloc(proj, 3, &down, 1, &qbuf)) {
        free(buf);
        return 2;
    }
#pragma omp parallel num_threads(threads)
    run(proj, 3);
    for (int64_t b = 0; b < B; b++) {
        const float *rb = rope + b * hd;
        for (int64_t h = 0; h < H + KV; h++) {
            float *t = h < H ? q + b * Q + h * hd : k + b * K + (h - H) * hd;
            for (int64_t j = 0; j < hd / 2; j++) {
                const float re = t[2 * j], im = t[2 * j + 1], c = rb[2 * j], s = rb[2 * j + 1];
                t[2 * j] = re * c - im * s;
                t[2 * j + 1] = re * s + im * c;
            }
        }
        const int64_t at = write_slots[b] * K;
        for (int64_t i = 0; i < K; i++) {
            if (pool_bf16) {
                ((uint16_t *)k_pool)[at + i] = f32_to_bf16(k[b * K + i]);
                ((uint16_t *)v_pool)[at + i] = f32_to_bf16(v[b * K + i]);
            } else {
                ((float *)k_pool)[at + i] = k[b * K + i];
                ((float *)v_pool)[at + i] = v[b * K + i];
            }
        }
    }
    int rc = moeray_decode_attention(q, B, H, hd, k_pool, v_pool, pool_bf16, KV, slots, mask, C, scale, o, threads);
    if (!rc) {
#pragma omp parallel num_threads(threads)
        run(&down, 1);
        for (int64_t i = 0; i < B * D; i++) out[i] += x[i];
    }
    free(buf), free(qbuf);
    return rc;
}

/* One layer of a decode step as moeray_layers runs it: its attention half's norm and weights (as
 * moeray_attention_block's, wtype attn_wtype) and KV pools; its FFN half's norm and either a MoE layer (gate
 * [E, D], top k, E experts' weights as moeray_moe's) or, gate NULL, a dense FFN (w1[0], w3[0], w2[0] and scales as
 * moeray_ffn's), wtype ffn_wtype, hidden size F. Field for field ctypes' kernels.native._Layer. */
typedef struct {
    const float *attn_norm, *ffn_norm, *gate;
    float eps;
    const void *wq, *wk, *wv, *wo;
    const uint16_t *sq, *sk, *sv, *so;
    int attn_wtype, ffn_wtype;
    void *k_pool, *v_pool;
    int64_t E, k, F;
    const void *const *w1, *const *w3, *const *w2;
    const uint16_t *const *s1, *const *s3, *const *s2;
} moeray_layer;

/* defined below: moeray_layers makes a decode step's metadata with it */
int moeray_decode_meta(int64_t B, const int64_t *tables, int64_t width, const int64_t *starts, const int64_t *rings,
                       int64_t block_size, int64_t window, int64_t C, const float *inv_freq, int64_t half,
                       int64_t *write_slots, int64_t *ctx_slots, uint8_t *mask, float *rope);

/* The layers of a decode step, one after another, in one call: x [B, D] fp32 in place (in: their input, or, given
 * tokens [B], rows tokens[b] of the embedding table embed [V, D] fp32; out: the last layer's output, or given
 * final_norm [D], its RMSNorm with final_eps); each layer h = moeray_attention_block(x), then x = h + f(ffn_norm(h))
 * (moeray_moe or moeray_ffn): the same calls, so the same bits, as one call a half-layer. The step's shapes (H, KV,
 * hd), pool dtype and scale are every layer's, and so are its write and read slots, mask and RoPE, made here first
 * by moeray_decode_meta from tables, width, starts, rings, block_size, window, C, inv_freq and half (2 half = hd).
 * Given head (an LM head [O, D] of linear_of's head_wtype, scales head_s), also logits [n, O] of rows head_rows [n]
 * of the output, as moeray_linear_* computes them on those rows (n may be 0). 0 on success, 3 a token out of range,
 * 4 metadata that cannot be made, else a half-layer's code (or the head's: 1 bad arguments, 2 out of memory). */
int moeray_layers(float *x, int64_t B, int64_t D, const float *embed, int64_t V, const int64_t *tokens,
                  const moeray_layer *layers, int64_t count, const float *final_norm, float final_eps, int64_t H,
                  int64_t KV, int64_t hd, int pool_bf16, const int64_t *tables, int64_t width, const int64_t *starts,
                  const int64_t *rings, int64_t block_size, int64_t window, int64_t C, const float *inv_freq,
                  int64_t half, float scale, const void *head, const uint16_t *head_s, int head_wtype, int64_t O,
                  const int64_t *head_rows, int64_t n, float *logits, int threads) {
    if (tokens)
        for (int64_t b = 0; b < B; b++) {
            if (tokens[b] < 0 || tokens[b] >= V) return 3;
            memcpy(x + b * D, embed + tokens[b] * D, sizeof(float) * D);
        }
    if (C < 1 || 2 * half != hd) return 4;
    /* h [B, D], then write_slots [B] and slots [B, C] (int64), rope [B, half, 2] and mask [B, C] (bytes) */
    float *h = malloc(sizeof(float) * B * D + sizeof(int64_t) * B * (C + 1) + sizeof(float) * B * hd + B * C);
    if (!h) return 2;
    int64_t *write_slots = (int64_t *)(h + B * D), *slots = write_slots + B;
    float *rope = (float *)(slots + B * C);
    uint8_t *mask = (uint8_t *)(rope + B * hd);
    int rc = moeray_decode_meta(B, tables, width, starts, rings, block_size, window, C, inv_freq, half, write_slots,
                                slots, mask, rope) ? 4 : 0;
    for (int64_t i = 0; i < count && !rc; i++) {
        const moeray_layer *l = layers + i;
        rc = moeray_attention_block(x, B, D, l->attn_norm, l->eps, l->wq, l->wk, l->wv, l->wo, l->sq, l->sk, l->sv,
                                    l->so, l->attn_wtype, H, KV, hd, rope, l->k_pool, l->v_pool, pool_bf16,
                                    write_slots, slots, mask, C, scale, h, threads);
        if (rc) break;
        rc = l->gate ? moeray_moe(h, B, D, l->F, l->ffn_norm, l->eps, l->gate, l->E, l->k, l->w1, l->w3, l->w2, l->s1,
                                  l->s3, l->s2, l->ffn_wtype, x, threads)
                     : moeray_ffn(h, B, D, l->F, l->ffn_norm, l->eps, l->w1[0], l->w3[0], l->w2[0], l->s1[0],
                                  l->s3[0], l->s2[0], l->ffn_wtype, x, threads);
    }
    if (!rc && final_norm) rms_norm(x, B, D, final_norm, final_eps, x); /* in place: a row's reads before its writes */
    if (!rc && head && n) {
        job_fn lin = linear_of(head_wtype);
        int all = n == B; /* rows 0 .. B - 1 in order: x as it is, else the rows gathered into h */
        if (n > B) rc = 1;
        for (int64_t r = 0; r < n && !rc; r++) {
            if (head_rows[r] < 0 || head_rows[r] >= B) rc = 1;
            all &= head_rows[r] == r;
        }
        if (!rc && !all)
            for (int64_t r = 0; r < n; r++) memcpy(h + r * D, x + head_rows[r] * D, sizeof(float) * D);
        if (!rc && (!lin || too_wide(head_wtype, D, O))) rc = 1;
        if (!rc) rc = linear(lin(all ? x : h, n, D, head, head_s, O, logits), threads);
    }
    free(h);
    return rc;
}

/* A decode step's metadata, as kernels/cache.py's DecodeMetadata.build makes it, and its RoPE, as kernels/rope.py's
 * rope_freqs: B sequences, each with one new token at position p = starts[b] and its block table's first width
 * blocks tables[b, :width] (0 past its end), ring = rings[b] slots (its whole table). Writes write_slots [B] (pool
 * slot of the new token: ring index p mod ring), ctx_slots [B, C] (pool slot of each ring index i < C that the token
 * reads, 0 where it reads none) and mask [B, C] (1: may attend: without a window (window 0) i <= p; with one, i <
 * ring and the position there, p - ((p - i) mod ring), is >= 0 and within window of p), rope [B, half, 2] (cos and
 * sin of the fp32 angle p * inv_freq[j]). C at most width * block_size. 0 on success, 1 bad arguments. */
int moeray_decode_meta(int64_t B, const int64_t *tables, int64_t width, const int64_t *starts, const int64_t *rings,
                       int64_t block_size, int64_t window, int64_t C, const float *inv_freq, int64_t half,
                       int64_t *write_slots, int64_t *ctx_slots, uint8_t *mask, float *rope) {
    if (B < 1 || block_size < 1 || C < 1 || C > width * block_size || window < 0) return 1;
    for (int64_t b = 0; b < B; b++) {
        const int64_t p = starts[b], ring = rings[b], *table = tables + b * width;
        if (p < 0 || ring < 1 || (!window && p >= ring)) return 1;
        const int64_t w = p % ring;
        if (w / block_size >= width) return 1; /* the new token's block past the given ones */
        write_slots[b] = table[w / block_size] * block_size + w % block_size;
        for (int64_t i = 0; i < C; i++) {
            int ok;
            if (!window) {
                ok = i <= p;
            } else {
                const int64_t kpos = p - ((p - i) % ring + ring) % ring;
                ok = i < ring && kpos >= 0 && p - kpos < window;
            }
            mask[b * C + i] = (uint8_t)ok;
            ctx_slots[b * C + i] = ok ? table[i / block_size] * block_size + i % block_size : 0;
        }
        for (int64_t j = 0; j < half; j++) {
            const float angle = (float)p * inv_freq[j];
            rope[(b * half + j) * 2] = cosf(angle);
            rope[(b * half + j) * 2 + 1] = sinf(angle);
        }
    }
    return 0;
}

/* Per row of x [B, V] fp32 (a step's logits): best[b] its max and index[b] where it first occurs (NaN counts as
 * the max, as torch.max), lse[b] = best + log(sum_v e^(x[v] - best)): what sampling reads of every row. Each row in
 * chunks of STAT_CHUNK values, the (row, chunk) pairs split among the threads (a step of one row is two threads'
 * work: 32000 values took 34 us on one), then each row's chunks combined in order: the same bits whatever the thread
 * count. Places are kept as fp32, exact below 2^24: V at most STAT_MAX_V. 0 on success, 1 bad arguments, 2 out of
 * memory. */
#define STAT_CHUNK 4096
#define STAT_MAX_V (1 << 24)
typedef struct {
    float top, sum; /* the chunk's max (NaN: it has one) and sum of e^(x - top) */
    int64_t at;     /* where top (or the first NaN) first occurs, in the row */
} chunk_stat;

static chunk_stat chunk_stats(const float *row, int64_t from, int64_t to) {
    v16f m = splat(-INFINITY), where = zero(), iota;
    for (int i = 0; i < 16; i++) set_lane(&iota, i, (float)i);
    v16i nan = {{{0}}};
    int64_t v = from;
    for (; v + 16 <= to; v += 16) { /* lane-wise max and its first place (as floats: exact below 2^24) */
        const v16f xv = load_f32(row + v);
        const v16i more = gt(xv, m);
        nan = or16(nan, nan_mask(xv));
        m = pick(more, xv, m);
        where = pick(more, add(iota, splat((float)v)), where);
    }
    chunk_stat s = {-INFINITY, 0.f, from};
    int any_nan = 0;
    for (int i = 0; i < 16; i++) {
        any_nan |= ilane(nan, i);
        const float t = lane(m, i);
        const int64_t at = (int64_t)lane(where, i);
        if (t > s.top || (t == s.top && t > -INFINITY && at < s.at)) s.top = t, s.at = at;
    }
    for (; v < to; v++) {
        any_nan |= row[v] != row[v];
        if (row[v] > s.top) s.top = row[v], s.at = v;
    }
    if (any_nan) { /* torch.max's answer: the first NaN */
        for (s.at = from; row[s.at] == row[s.at]; s.at++) {}
        s.top = row[s.at];
        return s;
    }
    if (s.top == -INFINITY || s.top == INFINITY) return s; /* every x -inf (at: the first), or an inf: no sum */
    v16f acc = zero();
    for (v = from; v + 16 <= to; v += 16) acc = add(acc, exp_nonpositive(sub(load_f32(row + v), splat(s.top))));
    s.sum = hsum(acc);
    for (; v < to; v++) s.sum += expf(row[v] - s.top);
    return s;
}

int moeray_row_stats(const float *x, int64_t B, int64_t V, float *best, int64_t *index, float *lse, int threads) {
    if (B < 1 || V < 1 || V > STAT_MAX_V) return 1;
    const int64_t chunks = (V + STAT_CHUNK - 1) / STAT_CHUNK;
    chunk_stat *stats = malloc(sizeof(chunk_stat) * B * chunks);
    if (!stats) return 2;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B * chunks; i++) {
            const int64_t from = i % chunks * STAT_CHUNK;
            stats[i] = chunk_stats(x + i / chunks * V, from, from + STAT_CHUNK < V ? from + STAT_CHUNK : V);
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            const chunk_stat *s = stats + b * chunks;
            int64_t c = 0; /* the chunk of the max: the first with a NaN, else the first with the largest top */
            for (int64_t i = 0; i < chunks && s[c].top == s[c].top; i++)
                if (s[i].top != s[i].top || s[i].top > s[c].top) c = i;
            const float top = s[c].top;
            best[b] = top, index[b] = s[c].at;
            if (top != top || top == INFINITY || top == -INFINITY) { /* NaN, inf, -inf (every x -inf) */
                lse[b] = top;
                continue;
            }
            float sum = 0.f;
            for (int64_t i = 0; i < chunks; i++)
                if (s[i].top > -INFINITY) sum += s[i].sum * expf(s[i].top - top);
            lse[b] = top + logf(sum);
        }
    }
    free(stats);
    return 0;
}

/* steps greedy decode steps of B sequences in one call (the engine's decode_steps): at step s each sequence's
 * input is tokens[b] (s = 0) or the token step s - 1 chose for it, at position starts[b] + s; the step is
 * moeray_layers' with C = max_b min(rings[b], starts[b] + s + 1) keys (as decode_extent makes it for a single step;
 * the caller's C, width and tables cover the last step's), its head on every row; then moeray_row_stats of those
 * logits: out_tokens[s, b] = where the row's max first occurs, out_logprobs[s, b] = max - logsumexp. So each step
 * is a single step's call with the same arguments, and chooses as sampling's greedy path does, the same bits. 0 on
 * success, else moeray_layers' or moeray_row_stats' code; the pools hold every step's keys up to a failed one. */
int moeray_decode_steps(float *x, int64_t B, int64_t D, const float *embed, int64_t V, const int64_t *tokens,
                        const moeray_layer *layers, int64_t count, const float *final_norm, float final_eps, int64_t H,
                        int64_t KV, int64_t hd, int pool_bf16, const int64_t *tables, int64_t width,
                        const int64_t *starts, const int64_t *rings, int64_t block_size, int64_t window, int64_t C,
                        const float *inv_freq, int64_t half, float scale, const void *head, const uint16_t *head_s,
                        int head_wtype, int64_t O, int64_t steps, int64_t *out_tokens, float *out_logprobs,
                        int threads) {
    if (B < 1 || steps < 1 || !head || O < 1) return 1;
    int64_t *ints = malloc(sizeof(int64_t) * 3 * B);
    float *buf = malloc(sizeof(float) * (B * O + 2 * B));
    int rc = !ints || !buf ? 2 : 0;
    int64_t *pos = ints, *rows = ints + B, *index = ints + 2 * B;
    float *logits = buf, *best = buf + B * O, *lse = best + B;
    for (int64_t b = 0; b < B && !rc; b++) pos[b] = starts[b], rows[b] = b;
    for (int64_t s = 0; s < steps && !rc; s++) {
        int64_t c = 1;
        for (int64_t b = 0; b < B; b++) {
            const int64_t keys = rings[b] < pos[b] + 1 ? rings[b] : pos[b] + 1;
            c = keys > c ? keys : c;
        }
        if (c > C) {
            rc = 4;
            break;
        }
        rc = moeray_layers(x, B, D, embed, V, s ? out_tokens + (s - 1) * B : tokens, layers, count, final_norm,
                           final_eps, H, KV, hd, pool_bf16, tables, width, pos, rings, block_size, window, c, inv_freq,
                           half, scale, head, head_s, head_wtype, O, rows, B, logits, threads);
        if (!rc) rc = moeray_row_stats(logits, B, O, best, index, lse, threads);
        for (int64_t b = 0; b < B && !rc; b++) {
            out_tokens[s * B + b] = index[b];
            out_logprobs[s * B + b] = best[b] - lse[b];
            pos[b]++;
        }
    }
    free(ints), free(buf);
    return rc;
}
