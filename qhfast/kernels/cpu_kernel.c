/* qhfast's fused CPU step: QHAdam and QHM over a chunk table of a bucket's tensors.
 *
 * One call updates every tensor of a (device, dtype) bucket: each element of the parameters,
 * gradients and state is read and written once, in chunks spread over OpenMP threads (the
 * multi-tensor-apply design of torch's fused kernels). The file is compiled once per
 * combination of the macros below, whatever the number or shapes of the tensors (see
 * qhfast/_fused.py, which defines them and calls the functions through ctypes):
 *
 *   REAL     the compute type: float (fp32/bf16/fp16 parameters) or double (fp64)
 *   PARAM    0: the parameter is REAL; 1: bf16; 2: fp16
 *   MODE     for bf16/fp16 parameters, where the fp32 result lives (qhfast/_precision.py):
 *            1 master, 2 kahan, 3 stochastic, 4 nearest; 0 for REAL
 *   STATE    0: the moments are REAL; 1: bf16, written with stochastic rounding; 2: 8-bit
 *            codes with an fp32 scale per block of 256 elements (qhfast/_quantize.py), written
 *            with stochastic rounding
 *   COUNTER  the type of QHAdam's normalizers: double (CPU counters) or float (capturable)
 *
 * The arithmetic follows the eager foreach path (qhfast/qhadam.py, qhfast/qhm.py), with torch's
 * CPU lerp and scalar casts, so the two agree to the compute type's rounding; QHAdam's two
 * terms share one division (the eager path divides each).
 * Random bits for stochastic rounding come from a counter-based hash of (seed, element): the
 * caller draws 64 bits of seeds from torch's generator each step.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef REAL real;

#define INLINE static inline __attribute__((always_inline))

/* ---- conversions -------------------------------------------------------------------------- */

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bits_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even, NaN to torch's canonical bf16 NaN (c10::BFloat16) */
static inline uint16_t float_to_bf16_nearest(float f) {
    uint32_t u = float_bits(f);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0u : (uint16_t)rounded;
}

/* up with probability (dropped bits) / 2^16: unbiased; r holds 16 random bits. A NaN stays a
 * NaN (the addition could carry its payload into the sign, or leave an infinity) */
static inline uint16_t float_to_bf16_stochastic(float f, uint32_t r) {
    const uint16_t rounded = (uint16_t)((float_bits(f) + (r & 0xFFFFu)) >> 16);
    return f != f ? (uint16_t)0x7FC0u : rounded;
}

/* fp16 <-> fp32 in integer and float operations that the compiler vectorizes on any x86-64
 * (no F16C, no AVX512-FP16 needed: compilers do not vectorize _Float16 conversions without the
 * latter), bit for bit torch's conversions. */

/* exact: a normal half's exponent rebased from 15 to 127; a subnormal half m * 2^-24 as
 * (0.5 + m * 2^-24) - 0.5; infinities and NaNs keep their payload */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, magnitude = h & 0x7FFFu;
    const uint32_t normal = (magnitude << 13) + ((127u - 15u) << 23);
    const uint32_t special = (magnitude << 13) | 0x7F800000u;
    const uint32_t subnormal = float_bits(bits_float(0x3F000000u | magnitude) - 0.5f);
    uint32_t bits = magnitude < 0x0400u ? subnormal : normal;
    bits = magnitude >= 0x7C00u ? special : bits;
    return bits_float(sign | bits);
}

/* round to nearest even; overflow to infinity; NaN to 0x7E00 with its sign (c10::Half).
 * Below 2^-14 (subnormal halves) adding 0.5 rounds the magnitude to a multiple of 2^-24 in the
 * FPU's own round-to-nearest-even, and the sum's low bits are the half (2^-14 itself lands on
 * 0x0400, the smallest normal); above, the 13 dropped bits round to even in integers and the
 * exponent is rebased */
static inline uint16_t float_to_half_nearest(float f) {
    const uint32_t u = float_bits(f), magnitude = u & 0x7FFFFFFFu;
    const float a = fabsf(f); /* the selects test floats: with integer tests gcc 12 gives up */
    const uint32_t small = float_bits(a + 0.5f) - 0x3F000000u;
    const uint32_t normal =
        ((magnitude + 0x0FFFu + ((magnitude >> 13) & 1u)) >> 13) - ((127u - 15u) << 10);
    uint32_t half = a < 0x1p-14f ? small : normal;
    half = half > 0x7C00u ? 0x7C00u : half;
    half = a != a ? 0x7E00u : half; /* NaN */
    return (uint16_t)(((u >> 16) & 0x8000u) | half);
}

/* up or down at random, unbiased; r holds 13 (or more) random bits. From 2^-14 up the 13
 * dropped bits carry with probability (dropped bits) / 2^13 (as for bf16, sign-magnitude;
 * infinities stay, overflow goes to infinity). Below, on the subnormal grid (2^-24 apart),
 * the same on a + 2^-14, whose fp32 bits hold a's grid position in the same place (that
 * addition rounds a to 2^-37 first: a bias of at most 2^-14 of the grid spacing), less the
 * 2^-14 */
static inline uint16_t float_to_half_stochastic(float f, uint32_t r) {
    const uint32_t u = float_bits(f);
    const float a = fabsf(f);
    const int subnormal = a < 0x1p-14f;
    const uint32_t bits = subnormal ? float_bits(a + 0x1p-14f) : u & 0x7FFFFFFFu;
    uint32_t half = ((bits + (r & 0x1FFFu)) >> 13) - ((127u - 15u) << 10) - (subnormal ? 0x0400u : 0u);
    half = half > 0x7C00u ? 0x7C00u : half;
    half = a != a ? 0x7E00u : half; /* NaN */
    return (uint16_t)(((u >> 16) & 0x8000u) | half);
}

/* the parameter's format: FROM_PARAM reads a bf16/fp16 value, TO_PARAM_NEAREST and
 * TO_PARAM_STOCHASTIC round to it */
#if PARAM == 0
typedef real param_t;
#define LOAD_PARAM(p, i) ((p)[i])
#else
typedef uint16_t param_t;
#if PARAM == 1
#define FROM_PARAM bf16_to_float
#define TO_PARAM_NEAREST float_to_bf16_nearest
#define TO_PARAM_STOCHASTIC float_to_bf16_stochastic
#else
#define FROM_PARAM half_to_float
#define TO_PARAM_NEAREST float_to_half_nearest
#define TO_PARAM_STOCHASTIC float_to_half_stochastic
#endif
#define LOAD_PARAM(p, i) FROM_PARAM((p)[i])
#define STORE_NEAREST(p, i, x) ((p)[i] = TO_PARAM_NEAREST(x))
#endif

/* The element loop can run on a stage: fp32 copies of a block of the tensors that stay in L1,
 * read in by stage_in and written out by stage_out.
 *
 * fp16 with F16C (x86 since 2013): the stage holds the fp16 tensors (gradient, parameter,
 * compensation), converted by vcvtph2ps / vcvtps2ph (round to nearest even, as torch), 16 at a
 * time with AVX-512 and 8 without. The loop itself cannot use the conversion instructions:
 * compilers vectorize no _Float16 conversion without AVX512-FP16. Without F16C the loop
 * converts in integer and float operations (above).
 *
 * 8-bit state (STATE 2): the stage holds a quantization block of the moments, decoded, and
 * stage_out encodes the block's new values by its new scale. */
#if PARAM == 2 && defined(__F16C__)
#define STAGE_PARAM 1
#else
#define STAGE_PARAM 0
#endif
#define STAGE_STATE (STATE == 2)
#define STAGED (STAGE_PARAM || STAGE_STATE)
#if STAGE_STATE
#define BLOCK 256 /* one quantization block (qhfast/_quantize.py's BLOCK) */
#elif STAGE_PARAM
#define BLOCK 512
#else
#define BLOCK (1 << 30) /* one block: the whole span */
#endif
typedef struct {
#if STAGE_PARAM
    float grad[BLOCK], theta[BLOCK], compensation[BLOCK], out[BLOCK];
    uint32_t bits[BLOCK]; /* MODE 2: the random bits of each element's compensation */
#endif
#if STAGE_STATE
    float first[BLOCK], second[BLOCK]; /* the moments (QHM: its buffer in first) */
#endif
    char unused;
} stage_t;

#if STAGE_PARAM
#include <immintrin.h>
static void halves_to_floats(const uint16_t *src, float *dst, int n) {
    int k = 0;
#if defined(__AVX512F__)
    for (; k + 16 <= n; k += 16)
        _mm512_storeu_ps(dst + k, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + k))));
#endif
    for (; k + 8 <= n; k += 8)
        _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + k))));
    for (; k < n; k++) dst[k] = _cvtsh_ss(src[k]);
}

static void floats_to_halves(const float *src, uint16_t *dst, int n) {
    int k = 0;
#if defined(__AVX512F__)
    for (; k + 16 <= n; k += 16)
        _mm256_storeu_si256((__m256i *)(dst + k),
                         _mm512_cvtps_ph(_mm512_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; k + 8 <= n; k += 8)
        _mm_storeu_si128((__m128i *)(dst + k),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT));
    for (; k < n; k++) dst[k] = _cvtss_sh(src[k], _MM_FROUND_TO_NEAREST_INT);
}

/* rounds src to nearest halves (dst) and leaves in src what that lost (exact in fp32) */
static void floats_to_halves_and_residuals(float *src, uint16_t *dst, int n) {
    int k = 0;
#if defined(__AVX512F__)
    for (; k + 16 <= n; k += 16) {
        const __m512 x = _mm512_loadu_ps(src + k);
        const __m256i h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
        _mm256_storeu_si256((__m256i *)(dst + k), h);
        _mm512_storeu_ps(src + k, _mm512_sub_ps(x, _mm512_cvtph_ps(h)));
    }
#endif
    for (; k + 8 <= n; k += 8) {
        const __m256 x = _mm256_loadu_ps(src + k);
        const __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(dst + k), h);
        _mm256_storeu_ps(src + k, _mm256_sub_ps(x, _mm256_cvtph_ps(h)));
    }
    for (; k < n; k++) {
        dst[k] = _cvtss_sh(src[k], _MM_FROUND_TO_NEAREST_INT);
        src[k] = src[k] - _cvtsh_ss(dst[k]);
    }
}
#endif

static inline uint32_t weyl_hash(uint32_t x) {
    x *= 0x9E3779B1u;
    return x ^ (x >> 16);
}

/* ---- 8-bit codes ------------------------------------------------------------------------- */

/* a code map (qhfast/_quantize.py's CodeMap, whose docstring explains the encoding), its
 * steps and first codes by binade index packed into one table (one lookup for both): the fp32
 * bits of the steps (a power of two, or 0) with the first code in the low 8 bits */
typedef struct {
    const float *values;    /* the value of each of the 256 codes */
    const uint16_t *bf16_values; /* the same as bf16 (exact: every value has 8 significant bits
                                  * or fewer; qhfast/kernels/cpu.py checks) */
    const uint32_t *binade; /* by index (binades + 2): steps' fp32 bits | first code */
    int32_t binades;
    float below;            /* 2^binades */
} code_map_t;

/* x's code in its block (inverse: the block's, from block_inverse), rounded up
 * where the share of the gap x covers and the uniform draw u in [0, 1) add up to 1 or more
 * (floor(position + u)): the torch ops of _quantize.quantize, operation for operation */
INLINE uint32_t encode(float x, float inverse, float u, const uint32_t *binade, int32_t last,
                       float below, const int is_signed) {
    const float y = fabsf(x * inverse);
    const uint32_t bits = float_bits(y);
    int32_t index = 127 - (int32_t)(bits >> 23);
    index = index < 0 ? 0 : index;
    index = index > last ? last : index;
    const uint32_t entry = binade[index];
    const float mantissa = bits_float((bits & 0x7FFFFFu) | 0x3F800000u); /* in [1, 2) */
    const float position =
        index == last ? y * below : (mantissa - 1.0f) * bits_float(entry & ~0xFFu);
    int32_t code = (int32_t)(entry & 0xFFu) + (int32_t)floorf(position + u);
    code = y != y ? 0 : code;
    if (is_signed) code = x < 0.0f && code > 0 ? code + 127 : code;
    return (uint32_t)code;
}

/* a block's largest magnitude, NaN if it holds one (as torch's amax); the float
 * bits of magnitudes order as their values, and a NaN's above them all. (This and
 * decode_block are not inlined: the element loop's block is inlined into nine specialized
 * copies, and with them inlined too an 8-bit variant took 2.9 s to build instead of about
 * 1 s, for 1-3% of its step, measured with perf/kernel_bench.py.) */
__attribute__((noinline)) static float largest_magnitude(const float *restrict x, int count) {
    uint32_t top = 0;
    for (int k = 0; k < count; k++) {
        const uint32_t magnitude = float_bits(x[k]) & 0x7FFFFFFFu;
        top = magnitude > top ? magnitude : top;
    }
    return bits_float(top);
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* a packed binade table in four registers, for binade_entries: 64 entries (qhfast/kernels/cpu.py
 * pads the tables to that) */
typedef struct {
    __m512i quarter[4];
} binade_table_t;

static inline binade_table_t load_binade_table(const uint32_t *binade) {
    binade_table_t table;
    for (int q = 0; q < 4; q++) table.quarter[q] = _mm512_loadu_si512(binade + 16 * q);
    return table;
}

/* the table's entries at 16 indices in [0, 64): two permutes of 32 entries each and a blend,
 * in place of a gather */
static inline __m512i binade_entries(const binade_table_t *table, __m512i index) {
    const __m512i low = _mm512_permutex2var_epi32(table->quarter[0], index, table->quarter[1]);
    const __m512i high = _mm512_permutex2var_epi32(table->quarter[2], index, table->quarter[3]);
    return _mm512_mask_blend_epi32(_mm512_cmpge_epi32_mask(index, _mm512_set1_epi32(32)), low,
                                   high);
}

/* encode() on 16 values at once, operation for operation */
static inline __m128i encode16(__m512 x, __m512 inverse, __m512 u, const binade_table_t *table,
                               __m512i last, __m512 below, const int is_signed) {
    const __m512 y = _mm512_abs_ps(_mm512_mul_ps(x, inverse));
    const __m512i bits = _mm512_castps_si512(y);
    __m512i index = _mm512_sub_epi32(_mm512_set1_epi32(127), _mm512_srli_epi32(bits, 23));
    index = _mm512_min_epi32(_mm512_max_epi32(index, _mm512_setzero_si512()), last);
    const __m512i entry = binade_entries(table, index);
    const __m512 mantissa = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFF)), _mm512_set1_epi32(0x3F800000)));
    const __m512 steps = _mm512_castsi512_ps(_mm512_and_si512(entry, _mm512_set1_epi32(~0xFF)));
    const __m512 position = _mm512_mask_blend_ps(
        _mm512_cmpeq_epi32_mask(index, last),
        _mm512_mul_ps(_mm512_sub_ps(mantissa, _mm512_set1_ps(1.0f)), steps),
        _mm512_mul_ps(y, below));
    __m512i code = _mm512_add_epi32(
        _mm512_and_si512(entry, _mm512_set1_epi32(0xFF)),
        _mm512_cvt_roundps_epi32(_mm512_add_ps(position, u),
                                 _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    code = _mm512_mask_mov_epi32(code, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q),
                                 _mm512_setzero_si512());
    if (is_signed) {
        const __mmask16 negative =
            _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ) &
            _mm512_cmpgt_epi32_mask(code, _mm512_setzero_si512());
        code = _mm512_mask_add_epi32(code, negative, code, _mm512_set1_epi32(127));
    }
    return _mm512_cvtepi32_epi8(code);
}
#endif

/* The codes of a block of first moments (signed map) and, where `second`, of second moments
 * (non-negative map) by their blocks' inverses; the draws are the two 16-bit halves of each
 * element's random bits (RANDOM). The tables come as restrict arguments of a function that is
 * not inlined (inlined, gcc forgets them): codes are bytes, which may alias anything, and the
 * loop would stay scalar. With AVX-512, 16 at a time by encode16, the rest by that loop. */
INLINE void encode_codes(const float *restrict m, const float *restrict v, uint8_t *restrict mc,
                         uint8_t *restrict vc, int count, float m_inverse, float v_inverse,
                         const uint32_t *restrict m_binade, const uint32_t *restrict v_binade,
                         const code_map_t *maps, uint32_t first, uint32_t seed,
                         const int second) {
    const int32_t m_last = maps[0].binades + 1, v_last = maps[1].binades + 1;
    const float m_below = maps[0].below, v_below = maps[1].below;
    int k = 0;
#if defined(__AVX512F__)
    {
        const binade_table_t m_table = load_binade_table(m_binade);
        const binade_table_t v_table = load_binade_table(second ? v_binade : m_binade);
        const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                14, 15);
        for (; k + 16 <= count; k += 16) {
            __m512i r = _mm512_xor_si512(
                _mm512_add_epi32(_mm512_set1_epi32((int32_t)(first + (uint32_t)k)), lanes),
                _mm512_set1_epi32((int32_t)seed));
            r = _mm512_mullo_epi32(r, _mm512_set1_epi32((int32_t)0x9E3779B1u));
            r = _mm512_xor_si512(r, _mm512_srli_epi32(r, 16));
            const __m512 u = _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_and_si512(r, _mm512_set1_epi32(0xFFFF))),
                _mm512_set1_ps(0x1p-16f));
            _mm_storeu_si128((__m128i *)(mc + k),
                             encode16(_mm512_loadu_ps(m + k), _mm512_set1_ps(m_inverse), u,
                                      &m_table, _mm512_set1_epi32(m_last),
                                      _mm512_set1_ps(m_below), 1));
            if (second) {
                const __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(r, 16)),
                                               _mm512_set1_ps(0x1p-16f));
                _mm_storeu_si128((__m128i *)(vc + k),
                                 encode16(_mm512_loadu_ps(v + k), _mm512_set1_ps(v_inverse), w,
                                          &v_table, _mm512_set1_epi32(v_last),
                                          _mm512_set1_ps(v_below), 0));
            }
        }
    }
#endif
    for (; k < count; k++) {
        const uint32_t r = weyl_hash((first + (uint32_t)k) ^ seed);
        const float u = (float)(r & 0xFFFFu) * 0x1p-16f;
        mc[k] = (uint8_t)encode(m[k], m_inverse, u, m_binade, m_last, m_below, 1);
        if (second) {
            const float w = (float)(r >> 16) * 0x1p-16f;
            vc[k] = (uint8_t)encode(v[k], v_inverse, w, v_binade, v_last, v_below, 0);
        }
    }
}

__attribute__((noinline)) static void encode_first(
        const float *restrict m, uint8_t *restrict mc, int count, float m_inverse,
        const uint32_t *restrict m_binade, const code_map_t *maps, uint32_t first,
        uint32_t seed) {
    encode_codes(m, NULL, mc, NULL, count, m_inverse, 1.0f, m_binade, m_binade, maps, first,
                 seed, 0);
}

__attribute__((noinline)) static void encode_both(
        const float *restrict m, const float *restrict v, uint8_t *restrict mc,
        uint8_t *restrict vc, int count, float m_inverse, float v_inverse,
        const uint32_t *restrict m_binade, const uint32_t *restrict v_binade,
        const code_map_t *maps, uint32_t first, uint32_t seed) {
    encode_codes(m, v, mc, vc, count, m_inverse, v_inverse, m_binade, v_binade, maps, first,
                 seed, 1);
}

/* a block's scale from its largest magnitude top: top itself, but 2^-126 where it is nonzero and
 * smaller (a subnormal's reciprocal would overflow) */
static inline float block_scale_of(float top) {
    return top > 0.0f && top < 0x1p-126f ? 0x1p-126f : top;
}

/* what a block's elements are multiplied by to put their magnitudes in [0, 1]: 1/scale, one
 * fp32 step up where rounding to nearest left scale * 1/scale below 1 (so that the largest is
 * exactly the top code); 1 where the scale is not > 0 (zero, NaN). A multiplication in place
 * of each element's division, as _quantize.quantize does */
static inline float block_inverse(float scale) {
    if (!(scale > 0.0f)) return 1.0f;
    const float inverse = 1.0f / scale;
    return scale * inverse < 1.0f ? bits_float(float_bits(inverse) + 1u) : inverse;
}

/* a block's new scales (stored) and codes: the first moment, and the second where v */
static inline void encode_block(const float *m, const float *v, uint8_t *mc, uint8_t *vc,
                                float *m_scale, float *v_scale, int count,
                                const code_map_t *maps, uint32_t first, uint32_t seed) {
    *m_scale = block_scale_of(largest_magnitude(m, count));
    if (!v) {
        encode_first(m, mc, count, block_inverse(*m_scale), maps[0].binade, maps, first, seed);
        return;
    }
    *v_scale = block_scale_of(largest_magnitude(v, count));
    encode_both(m, v, mc, vc, count, block_inverse(*m_scale), block_inverse(*v_scale),
                maps[0].binade, maps[1].binade, maps, first, seed);
}

__attribute__((noinline)) static void decode_block(const uint8_t *restrict codes, float scale,
                                                   float *restrict x, int count,
                                                   const code_map_t *map) {
    const float *values = map->values;
    int k = 0;
#if defined(__AVX512BW__)
    /* the 256 values as bf16 in 8 registers: 4 word permutes of 64 values each, then a blend
     * by each of the code's top 2 bits, in place of a gather; 32 codes at a time */
    __m512i table[8];
    for (int q = 0; q < 8; q++) table[q] = _mm512_loadu_si512(map->bf16_values + 32 * q);
    const __m512 scales = _mm512_set1_ps(scale);
    for (; k + 32 <= count; k += 32) {
        const __m512i code =
            _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(codes + k)));
        __m512i part[4];
        for (int j = 0; j < 4; j++)
            part[j] = _mm512_permutex2var_epi16(table[2 * j], code, table[2 * j + 1]);
        const __mmask32 bit6 = _mm512_test_epi16_mask(code, _mm512_set1_epi16(1 << 6));
        const __mmask32 bit7 = _mm512_test_epi16_mask(code, _mm512_set1_epi16(1 << 7));
        const __m512i value = _mm512_mask_blend_epi16(
            bit7, _mm512_mask_blend_epi16(bit6, part[0], part[1]),
            _mm512_mask_blend_epi16(bit6, part[2], part[3]));
        for (int half = 0; half < 2; half++) { /* bf16 to fp32: the bits moved up by 16 */
            const __m256i words = half ? _mm512_extracti64x4_epi64(value, 1)
                                       : _mm512_castsi512_si256(value);
            const __m512 widened =
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(words), 16));
            _mm512_storeu_ps(x + k + 16 * half, _mm512_mul_ps(widened, scales));
        }
    }
#endif
    for (; k < count; k++) x[k] = values[codes[k]] * scale;
}

/* the moments of element i (k of the block): first_ and second_ are the span's tensors */
#if STATE == 0
typedef real state_t;
#define LOAD_FIRST(k, i) (first_[i])
#define LOAD_SECOND(k, i) (second_[i])
#define STORE_FIRST(k, i, x, r) (first_[i] = (x))
#define STORE_SECOND(k, i, x, r) (second_[i] = (x))
#elif STATE == 1
typedef uint16_t state_t;
#define LOAD_FIRST(k, i) ((real)bf16_to_float(first_[i]))
#define LOAD_SECOND(k, i) ((real)bf16_to_float(second_[i]))
#define STORE_FIRST(k, i, x, r) (first_[i] = float_to_bf16_stochastic((float)(x), (r)))
#define STORE_SECOND(k, i, x, r) (second_[i] = float_to_bf16_stochastic((float)(x), (r)))
#else /* decoded on the stage, encoded by stage_out with the element's random bits */
typedef uint8_t state_t;
#define LOAD_FIRST(k, i) ((real)stage->first[k])
#define LOAD_SECOND(k, i) ((real)stage->second[k])
#define STORE_FIRST(k, i, x, r) (stage->first[k] = (float)(x))
#define STORE_SECOND(k, i, x, r) (stage->second[k] = (float)(x))
#endif

#define NEEDS_RANDOM (STATE != 0 || MODE == 2 || MODE == 3)
#if (PARAM == 0) != (MODE == 0)
#error "MODE 0 is for REAL parameters, and bf16/fp16 parameters need a MODE"
#endif

/* sqrt in the compute type: for float, sqrtf equals sqrt in double rounded to float */
#define SQRT(x) _Generic((x), float: sqrtf, default: sqrt)(x)

/* torch's CPU lerp with a scalar weight (aten/src/ATen/native/Lerp.h): which form it takes is
 * known per chunk (LOW_WEIGHT: |weight| < 0.5), so the element loop has no branch */
#define LERP(self, end, weight, one_minus_weight, LOW_WEIGHT)                             \
    ((LOW_WEIGHT) ? (self) + (weight) * ((end) - (self))                                \
                  : (end) - ((end) - (self)) * (one_minus_weight))

/* ---- the parameter's working value, read and written as MODE says ------------------------ */

/* (element i of the tensor, k of the block: staged fp16 reads and writes the stage at k) */
#if STAGE_PARAM
#define LOAD_GRAD(k, i) (stage->grad[k])
#define LOAD_PARAM_VALUE(k, i) (stage->theta[k])
#define LOAD_COMPENSATION(k, i) (stage->compensation[k])
#define STORE_ROUNDED(k, i, x) (stage->out[k] = (x)) /* rounded by stage_out */
#else
#define LOAD_GRAD(k, i) LOAD_PARAM(grad, i)
#define LOAD_PARAM_VALUE(k, i) LOAD_PARAM(param, i)
#define LOAD_COMPENSATION(k, i) FROM_PARAM(compensation[i])
#define STORE_ROUNDED(k, i, x) STORE_NEAREST(param, i, x)
#endif

#if MODE == 0
#define LOAD_THETA(k, i) LOAD_PARAM(param, i)
#define STORE_THETA(k, i, x, r) (param[i] = (x))
#elif MODE == 1 /* master */
#define LOAD_THETA(k, i) (master[i])
#define STORE_THETA(k, i, x, r) (master[i] = (x), STORE_ROUNDED(k, i, x))
#elif MODE == 2 /* kahan: theta + c is exact in fp32; c keeps what rounding theta lost */
#define LOAD_THETA(k, i) (LOAD_PARAM_VALUE(k, i) + LOAD_COMPENSATION(k, i))
#if STAGE_PARAM /* rounded to nearest by stage_out, which then rounds the rest into c */
#define STORE_THETA(k, i, x, r) (stage->out[k] = (x), stage->bits[k] = (r))
#else
#define STORE_THETA(k, i, x, r)                                                        \
    do {                                                                               \
        const uint16_t nearest_ = TO_PARAM_NEAREST(x);                                 \
        param[i] = nearest_;                                                           \
        compensation[i] = TO_PARAM_STOCHASTIC((x) - FROM_PARAM(nearest_), (r) >> 16);  \
    } while (0)
#endif
#elif MODE == 3 /* stochastic */
#define LOAD_THETA(k, i) LOAD_PARAM_VALUE(k, i)
#define STORE_THETA(k, i, x, r) (param[i] = TO_PARAM_STOCHASTIC(x, (r) >> 16))
#else /* nearest */
#define LOAD_THETA(k, i) LOAD_PARAM_VALUE(k, i)
#define STORE_THETA(k, i, x, r) STORE_ROUNDED(k, i, x)
#endif

/* ---- the chunk table ---------------------------------------------------------------------- */

#define CHUNK 16384
/* fewer chunks run on the calling thread: waking the others costs more than they save (and
 * on a busy machine a thread can wait for a core for milliseconds) */
#define PARALLEL_CHUNKS 4

typedef struct {
    int tensor;
    int64_t start, stop, offset; /* offset: the tensor's first element over the whole call */
} chunk_t;

static chunk_t *make_chunks(int n, const int64_t *sizes, int64_t *count) {
    int64_t total = 0;
    for (int t = 0; t < n; t++) total += (sizes[t] + CHUNK - 1) / CHUNK;
    chunk_t *chunks = malloc(sizeof(chunk_t) * (total > 0 ? total : 1));
    int64_t k = 0, offset = 0;
    for (int t = 0; t < n; t++) {
        for (int64_t s = 0; s < sizes[t]; s += CHUNK) {
            chunks[k].tensor = t;
            chunks[k].start = s;
            chunks[k].stop = s + CHUNK < sizes[t] ? s + CHUNK : sizes[t];
            chunks[k].offset = offset;
            k++;
        }
        offset += sizes[t];
    }
    *count = k;
    return chunks;
}

/* what the element loops of a chunk read: its tensor's pointers and where it lies */
typedef struct {
    param_t *param;
    const param_t *grad;
    state_t *first, *second; /* QHAdam's moments, or QHM's buffer (second unused) */
    float *first_scales, *second_scales; /* STATE 2: the moments' block scales */
    float *master;           /* MODE 1 */
    uint16_t *compensation;  /* MODE 2 */
    int64_t start, stop, offset;
} span_t;

/* the arrays of data pointers of a call's tensors by role (NULL: a role the call lacks) */
typedef struct {
    void **params, **grads, **firsts, **seconds, **first_scales, **second_scales, **extras;
} tensors_t;

static inline void *entry(void **pointers, int t) { return pointers ? pointers[t] : NULL; }

static inline span_t span_of(const chunk_t *chunk, const tensors_t *tensors) {
    const int t = chunk->tensor;
    span_t span = {tensors->params[t], tensors->grads[t], tensors->firsts[t],
                   entry(tensors->seconds, t), entry(tensors->first_scales, t),
                   entry(tensors->second_scales, t), tensors->extras[t], tensors->extras[t],
                   chunk->start, chunk->stop, chunk->offset};
    return span;
}

/* The random bits of element i of a span (its index over the whole call): 32 from RANDOM,
 * one 16-bit draw per half; a third rounding of the element (QHAdam's parameter after both
 * moments) takes the upper half of MORE_RANDOM, from the other 32 bits of the step's seeds.
 * Unbiased rounding needs each draw uniform over the seeds for every element, and the draws
 * of one element independent: any bijection of (index ^ seed) gives that, and the halves of
 * one uniform 32-bit value, or values of independent seeds, are independent. The hash only
 * spreads neighbouring elements apart: a multiply by the golden ratio (a Weyl sequence,
 * evenly spread in the upper bits) with the upper half folded into the lower. */
#define RANDOM(element) (NEEDS_RANDOM ? weyl_hash((element) ^ seed) : 0u)
#define MORE_RANDOM(element) (((element) ^ seed2) * 0x9E3779B1u)

/* The element loops are straight loops the compiler vectorizes: a flag that picks between
 * two results is a select (both computed; -fno-trapping-math lets the compiler do that with
 * a division), and the flags whose cost counts are constants in inlined copies (the lerp's
 * form, ν2 = 1, and the decay kind in the usual case). */
enum { NO_DECAY, COUPLED_DECAY, DECOUPLED_DECAY };
enum { FIRST_TERM = 1, GRAD_TERM = 2 }; /* which of the update's two terms are nonzero */

/* the span's parameter, gradient and MODE's extra tensor, under the names LOAD_THETA and
 * STORE_THETA use */
#define SPAN_TENSORS(span)                                                                \
    param_t *param = (span).param;                                                        \
    const param_t *grad = (span).grad;                                                    \
    float *master = (span).master;                                                        \
    uint16_t *compensation = (span).compensation;                                         \
    (void)param, (void)grad, (void)master, (void)compensation

/* the start of every element's update (both optimizers), element k of the block: its index i
 * in the tensor and over the call (element), its random bits r, the working value theta
 * (decayed first when the decay is decoupled) and the step's gradient d (scaled, the coupled
 * decay added) */
#define BEGIN_ELEMENT(k)                                                                  \
    const int64_t i = lo + (k);                                                           \
    const uint32_t element = first + (uint32_t)(k);                                       \
    const uint32_t r = RANDOM(element);                                                   \
    (void)r; /* unused where nothing is rounded stochastically */                         \
    real theta = LOAD_THETA((k), i);                                                      \
    if (decay_kind == DECOUPLED_DECAY) theta = theta * decay;                             \
    real d = (real)LOAD_GRAD((k), i) * factor;                                            \
    if (decay_kind == COUPLED_DECAY) d = d + coupled * theta

/* A span's elements block by block: each block staged in and out where STAGED (one block,
 * the whole span, with nothing staged otherwise). `elements` is the element loop's call with
 * (span, lo, count, &stage) first; `maps` the 8-bit code maps (signed, non-negative) and
 * `seed` the step's seed, for stage_out. A span starts on a block: chunks and 8-bit blocks
 * both start at multiples of 256 of their tensor. */
#define BY_BLOCK(span, maps, seed, elements, ...)                                         \
    do {                                                                                  \
        stage_t stage_;                                                                   \
        for (int64_t lo_ = (span).start; lo_ < (span).stop; lo_ += BLOCK) {               \
            const int count_ = (int)((span).stop - lo_ < BLOCK ? (span).stop - lo_ : BLOCK); \
            stage_in(&(span), lo_, count_, &stage_, (maps));                              \
            elements((span), lo_, count_, &stage_, __VA_ARGS__);                          \
            stage_out(&(span), lo_, count_, &stage_, (maps), (seed));                     \
        }                                                                                 \
    } while (0)

#if STAGED
static inline void stage_in(const span_t *span, int64_t lo, int count, stage_t *stage,
                            const code_map_t *maps) {
    (void)maps;
#if STAGE_PARAM
    halves_to_floats(span->grad + lo, stage->grad, count);
    if (MODE != 1) halves_to_floats(span->param + lo, stage->theta, count);
    if (MODE == 2) halves_to_floats(span->compensation + lo, stage->compensation, count);
#endif
#if STAGE_STATE
    decode_block(span->first + lo, span->first_scales[lo / BLOCK], stage->first, count, &maps[0]);
    if (span->second)
        decode_block(span->second + lo, span->second_scales[lo / BLOCK], stage->second, count,
                     &maps[1]);
#endif
}

static inline void stage_out(const span_t *span, int64_t lo, int count, stage_t *stage,
                             const code_map_t *maps, uint32_t seed) {
    (void)maps, (void)seed;
#if STAGE_STATE /* the moments with the element's random bits (RANDOM: 16 each) */
    encode_block(stage->first, span->second ? stage->second : NULL, span->first + lo,
                 span->second ? span->second + lo : NULL, &span->first_scales[lo / BLOCK],
                 span->second ? &span->second_scales[lo / BLOCK] : NULL, count, maps,
                 (uint32_t)(span->offset + lo), seed);
#endif
#if STAGE_PARAM
    if (MODE == 3) return; /* written by the loop, rounded at random */
    if (MODE != 2) {
        floats_to_halves(stage->out, span->param + lo, count);
        return;
    }
    /* kahan: c = what rounding theta to nearest lost, itself rounded at random */
    floats_to_halves_and_residuals(stage->out, span->param + lo, count);
    uint16_t *compensation = span->compensation + lo;
    for (int k = 0; k < count; k++)
        compensation[k] = TO_PARAM_STOCHASTIC(stage->out[k], stage->bits[k] >> 16);
#endif
}
#else
#define stage_in(span, lo, count, stage, maps) ((void)0)
#define stage_out(span, lo, count, stage, maps, seed) ((void)0)
#endif

/* ---- QHAdam ------------------------------------------------------------------------------- */

typedef struct {
    real f1, one_minus_f1, f2, keep2;                         /* per tensor */
    real decay, coupled, factor, nu2, one_minus_nu2, m_scale, d_scale, eps; /* per call */
} qhadam_scalars;

INLINE void qhadam_elements(span_t span, int64_t lo, int count, stage_t *stage,
                            const qhadam_scalars *s, uint32_t seed, uint32_t seed2,
                            const int decay_kind, const int terms, const int nu2_is_one,
                            const int low_weight) {
    SPAN_TENSORS(span);
    state_t *first_ = span.first, *second_ = span.second;
    (void)first_, (void)second_;
    const real f1 = s->f1, one_minus_f1 = s->one_minus_f1, f2 = s->f2, keep2 = s->keep2;
    const real decay = s->decay, coupled = s->coupled, factor = s->factor, nu2 = s->nu2;
    const real one_minus_nu2 = s->one_minus_nu2, m_scale = s->m_scale, d_scale = s->d_scale;
    const real eps = s->eps;
    const uint32_t first = (uint32_t)(span.offset + lo); /* the block's first, over the call */
    (void)stage;
    for (int k = 0; k < count; k++) {
        BEGIN_ELEMENT(k);
        const real m0 = LOAD_FIRST(k, i);
        const real m = LERP(m0, d, f1, one_minus_f1, low_weight);
        const real v = LOAD_SECOND(k, i) * keep2 + f2 * d * d;
        real den = nu2_is_one ? v : v * nu2 + one_minus_nu2 * d * d;
        den = SQRT(den) + eps;
        /* one division: (m_scale*m + d_scale*d)/den, a term whose ν drops it left out */
        real step = (terms & FIRST_TERM) ? m_scale * m : d_scale * d;
        if (terms == (FIRST_TERM | GRAD_TERM)) step = step + d_scale * d;
        theta = theta + step / den;
        STORE_FIRST(k, i, m, r);
        STORE_SECOND(k, i, v, r >> 16);
        STORE_THETA(k, i, theta, STATE != 0 ? MORE_RANDOM(element) : r);
    }
}

/* Advances both normalizers of every tensor (w <- 1 + beta*w) and updates every element:
 *   d = g*grad_factor (+ wd*theta if coupled);  theta *= 1 - lr*wd first if decoupled
 *   m = lerp(m, d, 1/w1);  v = v*(1 - 1/w2) + (1/w2)*d*d
 *   theta += ((-lr*nu1)*m + (-lr*(1 - nu1))*d)/den,  den = sqrt(nu2*v + (1 - nu2)*d*d) + eps
 * extras[t]: the fp32 master (MODE 1) or the bf16 compensation (MODE 2), else unused;
 * exp_avg_scales/exp_avg_sq_scales and maps (signed, non-negative): STATE 2, else NULL. */
void qhadam_step(int n, const int64_t *sizes, void **params, void **grads, void **exp_avgs,
                 void **exp_avg_sqs, void **exp_avg_scales, void **exp_avg_sq_scales,
                 void **extras, void **beta1_weights, void **beta2_weights,
                 const code_map_t *maps, double beta1, double beta2, double lr, double nu1, double nu2, double eps,
                 double weight_decay, int decoupled, double grad_factor, uint64_t seeds,
                 int threads) {
    double *fractions = malloc(sizeof(double) * 2 * (n > 0 ? n : 1));
    for (int t = 0; t < n; t++) {
        COUNTER *w1 = beta1_weights[t], *w2 = beta2_weights[t];
        *w1 = *w1 * (COUNTER)beta1;
        *w1 = *w1 + (COUNTER)1;
        *w2 = *w2 * (COUNTER)beta2;
        *w2 = *w2 + (COUNTER)1;
        fractions[2 * t] = 1.0 / (double)*w1;
        fractions[2 * t + 1] = 1.0 / (double)*w2;
    }
    const tensors_t tensors = {params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales,
                               exp_avg_sq_scales, extras};
    int64_t count;
    chunk_t *chunks = make_chunks(n, sizes, &count);
    const int decay_kind = weight_decay == 0.0 ? NO_DECAY
                           : decoupled         ? DECOUPLED_DECAY
                                               : COUPLED_DECAY;
    const int terms = (nu1 != 0.0 ? FIRST_TERM : 0) | (nu1 != 1.0 ? GRAD_TERM : 0);
    const int nu2_is_one = nu2 == 1.0;
    const uint32_t seed = (uint32_t)seeds, seed2 = (uint32_t)(seeds >> 32);
    qhadam_scalars call = {0, 0, 0, 0, (real)(1.0 - lr * weight_decay), (real)weight_decay,
                           (real)grad_factor, (real)nu2, (real)(1.0 - nu2), (real)(-lr * nu1),
                           (real)(-lr * (1.0 - nu1)), (real)eps};
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (count >= PARALLEL_CHUNKS)
    for (int64_t k = 0; k < count; k++) {
        const span_t span = span_of(&chunks[k], &tensors);
        qhadam_scalars s = call;
        const int t = chunks[k].tensor;
        s.f1 = (real)fractions[2 * t];
        s.one_minus_f1 = (real)1 - s.f1;
        s.f2 = (real)fractions[2 * t + 1];
        s.keep2 = (real)(1.0 - fractions[2 * t + 1]);
        const int low_weight = fabs((double)s.f1) < 0.5;
        /* the usual case (ν2 = 1, after the first step) with its decay a constant */
        if (nu2_is_one && low_weight && decay_kind == NO_DECAY)
            BY_BLOCK(span, maps, seed, qhadam_elements, &s, seed, seed2, NO_DECAY, terms, 1, 1);
        else if (nu2_is_one && low_weight && decay_kind == DECOUPLED_DECAY)
            BY_BLOCK(span, maps, seed, qhadam_elements, &s, seed, seed2, DECOUPLED_DECAY, terms, 1, 1);
        else if (nu2_is_one && low_weight)
            BY_BLOCK(span, maps, seed, qhadam_elements, &s, seed, seed2, COUPLED_DECAY, terms, 1, 1);
        else if (nu2_is_one) BY_BLOCK(span, maps, seed, qhadam_elements, &s, seed, seed2, decay_kind, terms, 1, 0);
        else if (low_weight) BY_BLOCK(span, maps, seed, qhadam_elements, &s, seed, seed2, decay_kind, terms, 0, 1);
        else BY_BLOCK(span, maps, seed, qhadam_elements, &s, seed, seed2, decay_kind, terms, 0, 0);
    }
    free(chunks);
    free(fractions);
}

/* ---- QHM ---------------------------------------------------------------------------------- */

typedef struct {
    real decay, coupled, factor, weight, one_minus_weight, b_scale, d_scale;
} qhm_scalars;

INLINE void qhm_elements(span_t span, int64_t lo, int count, stage_t *stage,
                         const qhm_scalars *s, uint32_t seed, const int decay_kind,
                         const int terms, const int low_weight) {
    SPAN_TENSORS(span);
    state_t *first_ = span.first, *second_ = NULL;
    (void)first_, (void)second_;
    const real decay = s->decay, coupled = s->coupled, factor = s->factor, weight = s->weight;
    const real one_minus_weight = s->one_minus_weight, b_scale = s->b_scale;
    const real d_scale = s->d_scale;
    const uint32_t first = (uint32_t)(span.offset + lo); /* the block's first, over the call */
    (void)stage;
    for (int k = 0; k < count; k++) {
        BEGIN_ELEMENT(k);
        const real b0 = LOAD_FIRST(k, i);
        const real b = LERP(b0, d, weight, one_minus_weight, low_weight);
        if (terms & FIRST_TERM) theta = theta + b_scale * b;
        if (terms & GRAD_TERM) theta = theta + d_scale * d;
        STORE_FIRST(k, i, b, r);
        STORE_THETA(k, i, theta, r);
    }
}

/*   d = g*grad_factor (+ wd*theta for "grad" decay);  theta *= 1 - lr*wd first for "direct"
 *   buf = lerp(buf, d, 1 - momentum);  theta += (-lr*nu)*buf + (-lr*(1 - nu))*d
 * buffer_scales and maps: STATE 2, else NULL (as qhadam_step's). */
void qhm_step(int n, const int64_t *sizes, void **params, void **grads, void **buffers,
              void **buffer_scales, void **extras, const code_map_t *maps, double lr, double momentum, double nu, double weight_decay,
              int direct, double grad_factor, uint64_t seeds, int threads) {
    const uint32_t seed = (uint32_t)seeds;
    const tensors_t tensors = {params, grads, buffers, NULL, buffer_scales, NULL, extras};
    int64_t count;
    chunk_t *chunks = make_chunks(n, sizes, &count);
    const int decay_kind = weight_decay == 0.0 ? NO_DECAY
                           : direct            ? DECOUPLED_DECAY
                                               : COUPLED_DECAY;
    const int terms = (nu != 0.0 ? FIRST_TERM : 0) | (nu != 1.0 ? GRAD_TERM : 0);
    const real weight = (real)(1.0 - momentum);
    const int low_weight = fabs((double)weight) < 0.5;
    const qhm_scalars s = {(real)(1.0 - lr * weight_decay), (real)weight_decay,
                           (real)grad_factor, weight, (real)1 - weight, (real)(-lr * nu),
                           (real)(-lr * (1.0 - nu))};
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (count >= PARALLEL_CHUNKS)
    for (int64_t k = 0; k < count; k++) {
        const span_t span = span_of(&chunks[k], &tensors);
        if (decay_kind == NO_DECAY && terms == (FIRST_TERM | GRAD_TERM) && low_weight)
            BY_BLOCK(span, maps, seed, qhm_elements, &s, seed, NO_DECAY, FIRST_TERM | GRAD_TERM, 1);
        else if (low_weight) BY_BLOCK(span, maps, seed, qhm_elements, &s, seed, decay_kind, terms, 1);
        else BY_BLOCK(span, maps, seed, qhm_elements, &s, seed, decay_kind, terms, 0);
    }
    free(chunks);
}
