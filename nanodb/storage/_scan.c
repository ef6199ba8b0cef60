/* Integer dot products of the compact (8-bit) copy of the vectors with 8-bit queries.
 *
 * nanodb_scores(codes, row_scale, rows, dim, q, q_offset, q_scale, nq, out, ldo) writes
 *     out[j * ldo + r] = (float)(sum_d codes[r, d] * q[j, d] - q_offset[j]) * (q_scale[j] * row_scale[r])
 * for unsigned 8-bit codes (the signed code plus 128) and signed 8-bit queries, so q_offset[j] is
 * 128 * sum_d q[j, d] and the integer part is the exact dot product of the signed codes. The sums are
 * exact (32-bit integers); only the final two float multiplications round. Loaded with ctypes: the
 * GIL is released while it runs, so one call per core scores segments in parallel.
 *
 * nanodb_scores_rows(codes, row_scale, rows, n, dim, q, q_offset, q_scale, nq, out, ldo) scores the
 * listed rows alone (a filter's allowed rows): out[j * ldo + i] is the score of row rows[i].
 *
 * The loop is chosen at run time (nanodb_level): AVX-512 VNNI (vpdpbusd: 64 unsigned x signed byte
 * products per instruction) when the CPU has it and dim is a multiple of 64; else AVX2 (both operands
 * widened to 16 bits, vpmaddwd: 16 products per instruction, exact for any byte) when dim is a multiple
 * of 16; else plain C. The integer sums are exact, so every loop writes the same bits.
 * nanodb_scores_level(level, ...) runs a given loop (or the best below it that runs here), for tests.
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>

/* Row r of a pass: the r-th listed row, or row r when none are listed. */
#define ROW(idx, r) ((idx) ? (idx)[r] : (r))

/* The version of this file's exported functions and their signatures. nanodb.storage.kernel.KERNEL_ABI
 * must equal it, or a library built from another _scan.c is not used: bump both with any change. */
#define NANODB_KERNEL_ABI 3

int nanodb_kernel_abi(void)
{
    return NANODB_KERNEL_ABI;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define NANODB_X86 1
/* acc += the 16 4-byte dot products of unsigned a with signed b, in place: written with the intrinsic,
 * GCC 12 copies all 16 accumulators of the 4 x 4 loop every step (1.2x slower for batches). */
#define DPB(acc, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b))
#define PREFETCH_ROWS 64
#define DOTS_AHEAD 8
#define GATHER_AHEAD 8 /* listed rows fetched ahead: they are scattered, the hardware prefetcher misses them */

/* The four sums of a0..a3, in order. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static inline __m128i sum4(__m512i a0, __m512i a1, __m512i a2, __m512i a3)
{
    __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
    __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* out[0..3] = (float)(dots - offset) * (qs * rs[0..3]), as the plain loop computes each (SSE2: any x86-64). */
static inline void store4(float *o, __m128i dots, int32_t offset, float qs, const float *rs)
{
    __m128 v = _mm_cvtepi32_ps(_mm_sub_epi32(dots, _mm_set1_epi32(offset)));
    _mm_storeu_ps(o, _mm_mul_ps(v, _mm_mul_ps(_mm_set1_ps(qs), _mm_loadu_ps(rs))));
}

/* The block of 4 rows r..r+3 of a pass: their codes (c) and steps (rs). Fetches rows read later: listed
 * rows GATHER_AHEAD ahead (scattered: the hardware prefetcher misses them); else, when `interleaved` (the
 * block's rows read piece by piece in turn, which the prefetcher does not follow), the rows PREFETCH_ROWS
 * ahead (a prefetch never faults). */
static inline void row_block(const uint8_t *codes, const float *row_scale, const int64_t *idx, int64_t r, int64_t rows,
                             int64_t dim, int interleaved, const uint8_t **c, float *rs)
{
    for (int64_t i = 0; i < 4; i++) {
        c[i] = codes + ROW(idx, r + i) * dim;
        rs[i] = row_scale[ROW(idx, r + i)];
    }
    if (idx && r + GATHER_AHEAD + 4 <= rows)
        for (int64_t i = 0; i < 4; i++)
            for (int64_t d = 0; d < dim; d += 64)
                _mm_prefetch((const char *)(codes + idx[r + GATHER_AHEAD + i] * dim + d), _MM_HINT_T0);
    else if (!idx && interleaved)
        for (int64_t d = 0; d < 4 * dim; d += 64)
            _mm_prefetch((const char *)(c[0] + PREFETCH_ROWS * dim + d), _MM_HINT_T0);
}

__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void scores_vnni(const uint8_t *codes, const float *row_scale, const int64_t *idx, int64_t rows, int64_t dim,
                        const int8_t *q, const int32_t *qo, const float *qs, int64_t nq, float *out, int64_t ldo)
{
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        const uint8_t *c[4];
        float rs[4];
        row_block(codes, row_scale, idx, r, rows, dim, nq >= 4, c, rs); /* only the 4 x 4 loop interleaves */
        const uint8_t *c0 = c[0], *c1 = c[1], *c2 = c[2], *c3 = c[3];
        int64_t j = 0;
        for (; j + 4 <= nq; j += 4) { /* 4 rows x 4 queries: 8 loads per 16 dot instructions */
            const int8_t *q0 = q + j * dim, *q1 = q0 + dim, *q2 = q1 + dim, *q3 = q2 + dim;
            __m512i z = _mm512_setzero_si512();
            __m512i a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z;
            __m512i a20 = z, a21 = z, a22 = z, a23 = z, a30 = z, a31 = z, a32 = z, a33 = z;
            for (int64_t d = 0; d < dim; d += 64) {
                __m512i x0 = _mm512_loadu_si512(c0 + d), x1 = _mm512_loadu_si512(c1 + d);
                __m512i x2 = _mm512_loadu_si512(c2 + d), x3 = _mm512_loadu_si512(c3 + d);
                __m512i v = _mm512_loadu_si512(q0 + d);
                DPB(a00, x0, v); DPB(a01, x1, v);
                DPB(a02, x2, v); DPB(a03, x3, v);
                v = _mm512_loadu_si512(q1 + d);
                DPB(a10, x0, v); DPB(a11, x1, v);
                DPB(a12, x2, v); DPB(a13, x3, v);
                v = _mm512_loadu_si512(q2 + d);
                DPB(a20, x0, v); DPB(a21, x1, v);
                DPB(a22, x2, v); DPB(a23, x3, v);
                v = _mm512_loadu_si512(q3 + d);
                DPB(a30, x0, v); DPB(a31, x1, v);
                DPB(a32, x2, v); DPB(a33, x3, v);
            }
            store4(out + j * ldo + r, sum4(a00, a01, a02, a03), qo[j], qs[j], rs);
            store4(out + (j + 1) * ldo + r, sum4(a10, a11, a12, a13), qo[j + 1], qs[j + 1], rs);
            store4(out + (j + 2) * ldo + r, sum4(a20, a21, a22, a23), qo[j + 2], qs[j + 2], rs);
            store4(out + (j + 3) * ldo + r, sum4(a30, a31, a32, a33), qo[j + 3], qs[j + 3], rs);
        }
        for (; j < nq; j++) { /* 4 rows x 1 query */
            const int8_t *qj = q + j * dim;
            /* one row after the other, in address order: the hardware prefetcher streams them (a single
             * query at 1M x 512: 19.5 ms on one core, against 47 ms reading the 4 rows in turn) */
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t d = 0; d < dim; d += 64)
                a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(c0 + d), _mm512_loadu_si512(qj + d));
            for (int64_t d = 0; d < dim; d += 64)
                a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(c1 + d), _mm512_loadu_si512(qj + d));
            for (int64_t d = 0; d < dim; d += 64)
                a2 = _mm512_dpbusd_epi32(a2, _mm512_loadu_si512(c2 + d), _mm512_loadu_si512(qj + d));
            for (int64_t d = 0; d < dim; d += 64)
                a3 = _mm512_dpbusd_epi32(a3, _mm512_loadu_si512(c3 + d), _mm512_loadu_si512(qj + d));
            store4(out + j * ldo + r, sum4(a0, a1, a2, a3), qo[j], qs[j], rs);
        }
    }
    for (; r < rows; r++)
        for (int64_t j = 0; j < nq; j++) {
            const uint8_t *c = codes + ROW(idx, r) * dim;
            __m512i a = _mm512_setzero_si512();
            for (int64_t d = 0; d < dim; d += 64)
                a = _mm512_dpbusd_epi32(a, _mm512_loadu_si512(c + d), _mm512_loadu_si512(q + j * dim + d));
            out[j * ldo + r] = (float)(_mm512_reduce_add_epi32(a) - qo[j]) * (qs[j] * row_scale[ROW(idx, r)]);
        }
}

static void scores_plain(const uint8_t *codes, const float *rs, const int64_t *idx, int64_t rows, int64_t dim,
                         const int8_t *q, const int32_t *qo, const float *qs, int64_t nq, float *out, int64_t ldo);

/* The four sums of a0..a3 (8 lanes each), in order. */
__attribute__((target("avx2")))
static inline __m128i sum4_avx2(__m256i a0, __m256i a1, __m256i a2, __m256i a3)
{
    __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

/* 16 unsigned codes at p widened to 16-bit lanes; 16 of the queries' 16-bit copy at p. */
#define CODES16(p) _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(p)))
#define QUERY16(p) _mm256_load_si256((const __m256i *)(p))
/* acc += the 8 sums of adjacent 16-bit products of x and v: 2 * 255 * 128 fits, so they are exact. */
#define MADD(acc, x, v) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(x, v))

__attribute__((target("avx2")))
static int32_t dot_avx2(const uint8_t *c, const int16_t *q, int64_t dim)
{
    __m256i a = _mm256_setzero_si256();
    for (int64_t d = 0; d < dim; d += 16)
        MADD(a, CODES16(c + d), QUERY16(q + d));
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1)));
}

/* Like scores_vnni with 16-bit products: the queries are widened once into a 16-bit copy, and each block
 * of 4 rows is widened as it is read (4 rows x 2 queries: 2.8x the plain loop's speed per query for a
 * batch, measured at 500K x 512 on one AMD EPYC core). */
__attribute__((target("avx2")))
static void scores_avx2(const uint8_t *codes, const float *row_scale, const int64_t *idx, int64_t rows, int64_t dim,
                        const int8_t *q, const int32_t *qo, const float *qs, int64_t nq, float *out, int64_t ldo)
{
    int16_t *qw = aligned_alloc(32, (size_t)(nq * dim) * sizeof(int16_t)); /* dim % 16 == 0: 32-byte multiple */
    if (!qw) {
        scores_plain(codes, row_scale, idx, rows, dim, q, qo, qs, nq, out, ldo);
        return;
    }
    for (int64_t i = 0; i < nq * dim; i += 16)
        _mm256_store_si256((__m256i *)(qw + i), _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + i))));
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        const uint8_t *c[4];
        float rs[4];
        row_block(codes, row_scale, idx, r, rows, dim, 1, c, rs); /* both loops interleave the 4 rows */
        const uint8_t *c0 = c[0], *c1 = c[1], *c2 = c[2], *c3 = c[3];
        int64_t j = 0;
        for (; j + 2 <= nq; j += 2) { /* 4 rows x 2 queries */
            const int16_t *q0 = qw + j * dim, *q1 = q0 + dim;
            __m256i z = _mm256_setzero_si256();
            __m256i a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z;
            for (int64_t d = 0; d < dim; d += 16) { /* 11 of the 16 vector registers */
                __m256i v0 = QUERY16(q0 + d), v1 = QUERY16(q1 + d);
                __m256i x = CODES16(c0 + d);
                MADD(a00, x, v0); MADD(a10, x, v1);
                x = CODES16(c1 + d);
                MADD(a01, x, v0); MADD(a11, x, v1);
                x = CODES16(c2 + d);
                MADD(a02, x, v0); MADD(a12, x, v1);
                x = CODES16(c3 + d);
                MADD(a03, x, v0); MADD(a13, x, v1);
            }
            store4(out + j * ldo + r, sum4_avx2(a00, a01, a02, a03), qo[j], qs[j], rs);
            store4(out + (j + 1) * ldo + r, sum4_avx2(a10, a11, a12, a13), qo[j + 1], qs[j + 1], rs);
        }
        for (; j < nq; j++) { /* 4 rows x 1 query */
            const int16_t *qj = qw + j * dim;
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t d = 0; d < dim; d += 16) {
                __m256i v = QUERY16(qj + d);
                MADD(a0, CODES16(c0 + d), v); MADD(a1, CODES16(c1 + d), v);
                MADD(a2, CODES16(c2 + d), v); MADD(a3, CODES16(c3 + d), v);
            }
            store4(out + j * ldo + r, sum4_avx2(a0, a1, a2, a3), qo[j], qs[j], rs);
        }
    }
    for (; r < rows; r++)
        for (int64_t j = 0; j < nq; j++)
            out[j * ldo + r] = (float)(dot_avx2(codes + ROW(idx, r) * dim, qw + j * dim, dim) - qo[j])
                               * (qs[j] * row_scale[ROW(idx, r)]);
    free(qw);
}

/* The rescored rows are scattered: fetch row rows[i + DOTS_AHEAD] while row rows[i] is summed. */
static inline void fetch_ahead(const uint16_t *vectors, const int64_t *rows, int64_t i, int64_t n, int64_t dim)
{
    if (i + DOTS_AHEAD < n)
        for (int64_t d = 0; d < dim; d += 32)
            _mm_prefetch((const char *)(vectors + rows[i + DOTS_AHEAD] * dim + d), _MM_HINT_T0);
}

/* out[i] = float64 dot of float16 row rows[i] of `vectors` with float64 query qi[i]: each float16 value
 * times a query value (a float32 widened) is exact in float64, so only the sums round. */
__attribute__((target("avx512f")))
static void dots_avx512(const uint16_t *vectors, const int64_t *rows, int64_t n, int64_t dim, const double *queries,
                        const int64_t *qi, double *out)
{
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *x = vectors + rows[i] * dim;
        const double *q = queries + qi[i] * dim;
        fetch_ahead(vectors, rows, i, n, dim);
        __m512d a0 = _mm512_setzero_pd(), a1 = a0;
        for (int64_t d = 0; d < dim; d += 16) {
            __m512 x16 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + d)));
            a0 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(x16)), _mm512_loadu_pd(q + d), a0);
            a1 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x16), 1))),
                                 _mm512_loadu_pd(q + d + 8), a1);
        }
        out[i] = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
    }
}

__attribute__((target("avx2,f16c,fma")))
static void dots_avx2(const uint16_t *vectors, const int64_t *rows, int64_t n, int64_t dim, const double *queries,
                      const int64_t *qi, double *out)
{
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *x = vectors + rows[i] * dim;
        const double *q = queries + qi[i] * dim;
        fetch_ahead(vectors, rows, i, n, dim);
        __m256d a0 = _mm256_setzero_pd(), a1 = a0;
        for (int64_t d = 0; d < dim; d += 8) {
            __m256 x8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + d)));
            a0 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x8)), _mm256_loadu_pd(q + d), a0);
            a1 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x8, 1)), _mm256_loadu_pd(q + d + 4), a1);
        }
        __m256d s = _mm256_add_pd(a0, a1);
        __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
        out[i] = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
    }
}

/* Which loop nanodb_dots runs for this dim on this CPU: 2 AVX-512F (dim a multiple of 16), 1 AVX2 with
 * F16C and FMA (a multiple of 8), 0 none (the caller sums with NumPy). */
static int dots_level(int64_t dim)
{
    __builtin_cpu_init();
    if (dim % 16 == 0 && __builtin_cpu_supports("avx512f"))
        return 2;
    if (dim % 8 == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")
        && __builtin_cpu_supports("fma"))
        return 1;
    return 0;
}
#endif

/* 1 when nanodb_dots runs on this CPU for this dim, else 0. */
int nanodb_dots_ok(int64_t dim)
{
#ifdef NANODB_X86
    return dots_level(dim) > 0;
#else
    (void)dim;
    return 0;
#endif
}

void nanodb_dots(const uint16_t *vectors, const int64_t *rows, int64_t n, int64_t dim, const double *queries,
                 const int64_t *qi, double *out)
{
#ifdef NANODB_X86
    if (dots_level(dim) == 2)
        dots_avx512(vectors, rows, n, dim, queries, qi, out);
    else
        dots_avx2(vectors, rows, n, dim, queries, qi, out);
#else
    (void)vectors; (void)rows; (void)n; (void)dim; (void)queries; (void)qi; (void)out;
#endif
}

static void scores_plain(const uint8_t *codes, const float *rs, const int64_t *idx, int64_t rows, int64_t dim,
                         const int8_t *q, const int32_t *qo, const float *qs, int64_t nq, float *out, int64_t ldo)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < nq; j++) {
            const uint8_t *c = codes + ROW(idx, r) * dim;
            int32_t s = 0;
            for (int64_t d = 0; d < dim; d++)
                s += (int32_t)c[d] * q[j * dim + d];
            out[j * ldo + r] = (float)(s - qo[j]) * (qs[j] * rs[ROW(idx, r)]);
        }
}

/* The best loop for this dim on this CPU: 2 AVX-512 VNNI, 1 AVX2, 0 plain C. */
int nanodb_level(int64_t dim)
{
#ifdef NANODB_X86
    __builtin_cpu_init();
    if (dim % 64 == 0 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw"))
        return 2;
    if (dim % 16 == 0 && __builtin_cpu_supports("avx2"))
        return 1;
#else
    (void)dim;
#endif
    return 0;
}

static void scores(int level, const uint8_t *codes, const float *row_scale, const int64_t *idx, int64_t rows,
                   int64_t dim, const int8_t *q, const int32_t *q_offset, const float *q_scale, int64_t nq, float *out,
                   int64_t ldo)
{
    int best = nanodb_level(dim);
    level = level < best ? level : best;
#ifdef NANODB_X86
    if (level == 2) {
        scores_vnni(codes, row_scale, idx, rows, dim, q, q_offset, q_scale, nq, out, ldo);
        return;
    }
    if (level == 1) {
        scores_avx2(codes, row_scale, idx, rows, dim, q, q_offset, q_scale, nq, out, ldo);
        return;
    }
#endif
    scores_plain(codes, row_scale, idx, rows, dim, q, q_offset, q_scale, nq, out, ldo);
}

void nanodb_scores_level(int64_t level, const uint8_t *codes, const float *row_scale, const int64_t *rows, int64_t n,
                         int64_t dim, const int8_t *q, const int32_t *q_offset, const float *q_scale, int64_t nq,
                         float *out, int64_t ldo)
{
    scores((int)level, codes, row_scale, rows, n, dim, q, q_offset, q_scale, nq, out, ldo);
}

void nanodb_scores(const uint8_t *codes, const float *row_scale, int64_t rows, int64_t dim, const int8_t *q,
                   const int32_t *q_offset, const float *q_scale, int64_t nq, float *out, int64_t ldo)
{
    scores(2, codes, row_scale, NULL, rows, dim, q, q_offset, q_scale, nq, out, ldo);
}

void nanodb_scores_rows(const uint8_t *codes, const float *row_scale, const int64_t *rows, int64_t n, int64_t dim,
                        const int8_t *q, const int32_t *q_offset, const float *q_scale, int64_t nq, float *out,
                        int64_t ldo)
{
    scores(2, codes, row_scale, rows, n, dim, q, q_offset, q_scale, nq, out, ldo);
}
