/*
 * The training loader's one resize of an 8-bit grey image: Pillow's Image.reduce (a box
 * average by whole factors) and Image.resize with the BILINEAR filter and a source box,
 * giving the same pixels to the bit, in a fraction of the CPU.
 *
 * Pillow's arithmetic is kept exactly (the tests compare with Pillow on every factor,
 * crop and size they draw):
 *
 * - reduce: each output pixel is the sum of its n source pixels (n smaller in the last
 *   column and row where the box does not divide), then ((sum + n / 2) * m) >> 24 in 32-bit
 *   unsigned arithmetic, with m = (uint32)(2^32 / (256 * n)) computed in float.
 * - resize: the filter weights are computed in double from the box as float, exactly as
 *   Pillow's precompute_coeffs does, normalised to sum 1, then made integers with 22
 *   fraction bits (rounding half away from zero). A horizontal pass (only over the rows
 *   the vertical pass reads) rounds each pixel to 8 bits, then a vertical pass does.
 *   Each sum starts at 1 << 21 and the result is the sum >> 22, clamped to 0..255.
 *
 * What differs is only the order of the work: integer sums do not depend on it, so the
 * loops run along rows, where the compiler vectorises them, instead of one output pixel
 * at a time. The GIL is released while the pixels are computed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The weights must be computed with the rounding of each separate double operation, as
   Pillow's are: no fused multiply-add (where the target has one). */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define HAVE_SSE2 1
#else
#define HAVE_SSE2 0
#endif

#define PRECISION_BITS 22
/* SSE2 multiplies 16-bit numbers only (pmaddwd: two products summed into 32 bits), so
   each weight w (0 to 2^22 for BILINEAR) is split into w >> 11 and w & 2047, both
   products of a pixel fit 16 x 16 bits, and sum(p * w) = (sum(p * hi) << 11) +
   sum(p * lo) exactly. */
#define SPLIT_BITS 11

/* Pillow's reduce multiplier for a block of n pixels: 2^32 / (256 * n), in float. */
static uint32_t reduce_multiplier(uint32_t n) {
    float max_int = 4294967296.0f;
    return (uint32_t)(max_int / (float)(256u * n));
}

static inline uint8_t reduce_pixel(uint32_t sum, uint32_t n, uint32_t multiplier) {
    return (uint8_t)(((sum + n / 2) * multiplier) >> 24);
}

#if defined(_MSC_VER)
#define ALWAYS_INLINE __forceinline
#else
#define ALWAYS_INLINE inline __attribute__((always_inline))
#endif

/* Whole blocks of one output row from the column sums of its rows. */
static ALWAYS_INLINE void group_columns(const uint32_t *sums, size_t blocks, size_t xscale,
                                        uint32_t n, uint32_t multiplier, uint8_t *target) {
    for (size_t ox = 0; ox < blocks; ox++, sums += xscale) {
        uint32_t sum = 0;
        for (size_t c = 0; c < xscale; c++) {
            sum += sums[c];
        }
        target[ox] = reduce_pixel(sum, n, multiplier);
    }
}

/* Box average of the region (x0, y0, width, height) of src by xscale x yscale blocks. */
static void reduce_region(const uint8_t *src, size_t src_stride, size_t x0, size_t y0,
                          size_t width, size_t height, size_t xscale, size_t yscale,
                          uint8_t *out, uint32_t *column_sums) {
    size_t out_width = (width + xscale - 1) / xscale;
    size_t out_height = (height + yscale - 1) / yscale;
    for (size_t oy = 0; oy < out_height; oy++) {
        size_t first_row = y0 + oy * yscale;
        size_t rows = height - oy * yscale < yscale ? height - oy * yscale : yscale;
        const uint8_t *line = src + first_row * src_stride + x0;
        for (size_t x = 0; x < width; x++) {
            column_sums[x] = line[x];
        }
        for (size_t r = 1; r < rows; r++) {
            line += src_stride;
            for (size_t x = 0; x < width; x++) {
                column_sums[x] += line[x];
            }
        }
        uint32_t full_n = (uint32_t)(rows * xscale);
        uint32_t full_multiplier = reduce_multiplier(full_n);
        uint8_t *target = out + oy * out_width;
        size_t whole = width / xscale;
        /* A constant factor lets the compiler unroll the sum of a block's columns. */
        switch (xscale) {
        case 1: group_columns(column_sums, whole, 1, full_n, full_multiplier, target); break;
        case 2: group_columns(column_sums, whole, 2, full_n, full_multiplier, target); break;
        case 3: group_columns(column_sums, whole, 3, full_n, full_multiplier, target); break;
        case 4: group_columns(column_sums, whole, 4, full_n, full_multiplier, target); break;
        case 5: group_columns(column_sums, whole, 5, full_n, full_multiplier, target); break;
        case 6: group_columns(column_sums, whole, 6, full_n, full_multiplier, target); break;
        default:
            group_columns(column_sums, whole, xscale, full_n, full_multiplier, target);
        }
        if (whole < out_width) { /* the last, narrower block */
            size_t columns = width - whole * xscale;
            uint32_t sum = 0;
            for (size_t c = 0; c < columns; c++) {
                sum += column_sums[whole * xscale + c];
            }
            uint32_t n = (uint32_t)(rows * columns);
            target[whole] = reduce_pixel(sum, n, reduce_multiplier(n));
        }
    }
}

typedef struct {
    int ksize;
    int *bounds;   /* per output pixel: first source pixel, number of source pixels */
    int32_t *kk;   /* per output pixel: ksize weights with 22 fraction bits */
} Coefficients;

static double bilinear(double x) {
    if (x < 0.0) {
        x = -x;
    }
    if (x < 1.0) {
        return 1.0 - x;
    }
    return 0.0;
}

/* Pillow's precompute_coeffs for the BILINEAR filter (support 1), then its
   normalize_coeffs_8bpc. Returns 0 when out of memory. */
static int precompute(int in_size, float in0, float in1, int out_size, Coefficients *c) {
    double support, scale, filterscale;
    filterscale = scale = (double)(in1 - in0) / out_size;
    if (filterscale < 1.0) {
        filterscale = 1.0;
    }
    support = 1.0 * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    double *weights = malloc((size_t)ksize * sizeof(double));
    c->kk = malloc((size_t)out_size * (size_t)ksize * sizeof(int32_t));
    c->bounds = malloc((size_t)out_size * 2 * sizeof(int));
    if (weights == NULL || c->kk == NULL || c->bounds == NULL) {
        free(weights);
        free(c->kk);
        free(c->bounds);
        c->kk = NULL;
        c->bounds = NULL;
        return 0;
    }
    c->ksize = ksize;
    for (int xx = 0; xx < out_size; xx++) {
        double center = in0 + (xx + 0.5) * scale;
        double ww = 0.0;
        double ss = 1.0 / filterscale;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) {
            xmin = 0;
        }
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size) {
            xmax = in_size;
        }
        xmax -= xmin;
        int x;
        for (x = 0; x < xmax; x++) {
            double w = bilinear((x + xmin - center + 0.5) * ss);
            weights[x] = w;
            ww += w;
        }
        for (x = 0; x < xmax; x++) {
            if (ww != 0.0) {
                weights[x] /= ww;
            }
        }
        for (; x < ksize; x++) {
            weights[x] = 0;
        }
        int32_t *k = c->kk + (size_t)xx * (size_t)ksize;
        for (x = 0; x < ksize; x++) {
            double scaled = weights[x] * (1 << PRECISION_BITS);
            k[x] = weights[x] < 0 ? (int32_t)(-0.5 + scaled) : (int32_t)(0.5 + scaled);
        }
        c->bounds[xx * 2 + 0] = xmin;
        c->bounds[xx * 2 + 1] = xmax;
    }
    free(weights);
    return 1;
}

static inline uint8_t clip8(int32_t sum) {
    int32_t value = sum >> PRECISION_BITS;
    return (uint8_t)(value < 0 ? 0 : value > 255 ? 255 : value);
}

/* Rows first_row .. first_row + rows - 1 of src, resampled along x into out. */
static void horizontal_pass(const uint8_t *src, size_t src_stride, int first_row, int rows,
                            const Coefficients *c, int out_width, uint8_t *out) {
    int ksize = c->ksize;
    for (int yy = 0; yy < rows; yy++) {
        const uint8_t *line = src + (size_t)(yy + first_row) * src_stride;
        uint8_t *target = out + (size_t)yy * (size_t)out_width;
        for (int xx = 0; xx < out_width; xx++) {
            int xmin = c->bounds[xx * 2 + 0];
            int xmax = c->bounds[xx * 2 + 1];
            const int32_t *k = c->kk + (size_t)xx * (size_t)ksize;
            const uint8_t *pixels = line + xmin;
            int32_t sum = 1 << (PRECISION_BITS - 1);
            for (int x = 0; x < xmax; x++) {
                sum += pixels[x] * k[x];
            }
            target[xx] = clip8(sum);
        }
    }
}

/* src (width wide, stride src_stride) resampled along y into out_height rows. */
static void vertical_pass(const uint8_t *src, size_t src_stride, int width,
                          const Coefficients *c, int out_height, uint8_t *out,
                          int32_t *sums) {
    int ksize = c->ksize;
    for (int yy = 0; yy < out_height; yy++) {
        int ymin = c->bounds[yy * 2 + 0];
        int ymax = c->bounds[yy * 2 + 1];
        const int32_t *k = c->kk + (size_t)yy * (size_t)ksize;
        for (int x = 0; x < width; x++) {
            sums[x] = 1 << (PRECISION_BITS - 1);
        }
        for (int y = 0; y < ymax; y++) {
            const uint8_t *line = src + (size_t)(ymin + y) * src_stride;
            int32_t weight = k[y];
            for (int x = 0; x < width; x++) {
                sums[x] += line[x] * weight;
            }
        }
        uint8_t *target = out + (size_t)yy * (size_t)width;
        for (int x = 0; x < width; x++) {
            target[x] = clip8(sums[x]);
        }
    }
}

#if HAVE_SSE2
/* Two taps' weight halves packed for pmaddwd: (first, second) as 16-bit lanes. */
static inline int32_t pair_hi(int32_t first, int32_t second) {
    return (int32_t)((uint32_t)(first >> SPLIT_BITS) | ((uint32_t)(second >> SPLIT_BITS) << 16));
}

static inline int32_t pair_lo(int32_t first, int32_t second) {
    int32_t mask = (1 << SPLIT_BITS) - 1;
    return (int32_t)((uint32_t)(first & mask) | ((uint32_t)(second & mask) << 16));
}

/* 1 << 21 + (hi << 11) + lo, >> 22: four 32-bit sums of pixels times whole weights. */
static inline __m128i finish_sums(__m128i hi, __m128i lo) {
    __m128i sum = _mm_add_epi32(_mm_slli_epi32(hi, SPLIT_BITS), lo);
    sum = _mm_add_epi32(sum, _mm_set1_epi32(1 << (PRECISION_BITS - 1)));
    return _mm_srai_epi32(sum, PRECISION_BITS);
}

/* vertical_pass, 16 output pixels of a row at a time: the two taps of a pair are
   interleaved byte by byte, so that one pmaddwd gives pixel * weight for both. */
static void vertical_pass_sse2(const uint8_t *src, size_t src_stride, int width,
                               const Coefficients *c, int out_height, uint8_t *out) {
    const __m128i zero = _mm_setzero_si128();
    int ksize = c->ksize;
    for (int yy = 0; yy < out_height; yy++) {
        int ymin = c->bounds[yy * 2 + 0];
        int ymax = c->bounds[yy * 2 + 1];
        const int32_t *k = c->kk + (size_t)yy * (size_t)ksize;
        uint8_t *target = out + (size_t)yy * (size_t)width;
        int x = 0;
        for (; x + 16 <= width; x += 16) {
            __m128i hi[4] = {zero, zero, zero, zero};
            __m128i lo[4] = {zero, zero, zero, zero};
            for (int y = 0; y < ymax; y += 2) {
                const uint8_t *line = src + (size_t)(ymin + y) * src_stride + x;
                __m128i first = _mm_loadu_si128((const __m128i *)line);
                __m128i second = zero;
                int32_t next = 0;
                if (y + 1 < ymax) {
                    second = _mm_loadu_si128((const __m128i *)(line + src_stride));
                    next = k[y + 1];
                }
                __m128i weights_hi = _mm_set1_epi32(pair_hi(k[y], next));
                __m128i weights_lo = _mm_set1_epi32(pair_lo(k[y], next));
                __m128i low = _mm_unpacklo_epi8(first, second);
                __m128i high = _mm_unpackhi_epi8(first, second);
                __m128i pixels[4] = {
                    _mm_unpacklo_epi8(low, zero), _mm_unpackhi_epi8(low, zero),
                    _mm_unpacklo_epi8(high, zero), _mm_unpackhi_epi8(high, zero)};
                for (int i = 0; i < 4; i++) {
                    hi[i] = _mm_add_epi32(hi[i], _mm_madd_epi16(pixels[i], weights_hi));
                    lo[i] = _mm_add_epi32(lo[i], _mm_madd_epi16(pixels[i], weights_lo));
                }
            }
            __m128i left = _mm_packs_epi32(finish_sums(hi[0], lo[0]), finish_sums(hi[1], lo[1]));
            __m128i right = _mm_packs_epi32(finish_sums(hi[2], lo[2]), finish_sums(hi[3], lo[3]));
            _mm_storeu_si128((__m128i *)(target + x), _mm_packus_epi16(left, right));
        }
        for (; x < width; x++) {
            int32_t sum = 1 << (PRECISION_BITS - 1);
            for (int y = 0; y < ymax; y++) {
                sum += src[(size_t)(ymin + y) * src_stride + (size_t)x] * k[y];
            }
            target[x] = clip8(sum);
        }
    }
}

/* Columns first .. first + columns - 1 of 8 rows into strip, column by column: strip[8 *
   i + r] is row r's pixel first + i. Then 8 zero columns, so that a pair of taps may
   read one column past the last. */
static void transpose_strip(const uint8_t *rows, size_t stride, size_t first, size_t columns,
                            uint8_t *strip) {
    size_t i = 0;
    for (; i + 8 <= columns; i += 8) {
        const uint8_t *p = rows + first + i;
        __m128i r0 = _mm_loadl_epi64((const __m128i *)(p + 0 * stride));
        __m128i r1 = _mm_loadl_epi64((const __m128i *)(p + 1 * stride));
        __m128i r2 = _mm_loadl_epi64((const __m128i *)(p + 2 * stride));
        __m128i r3 = _mm_loadl_epi64((const __m128i *)(p + 3 * stride));
        __m128i r4 = _mm_loadl_epi64((const __m128i *)(p + 4 * stride));
        __m128i r5 = _mm_loadl_epi64((const __m128i *)(p + 5 * stride));
        __m128i r6 = _mm_loadl_epi64((const __m128i *)(p + 6 * stride));
        __m128i r7 = _mm_loadl_epi64((const __m128i *)(p + 7 * stride));
        __m128i a = _mm_unpacklo_epi8(r0, r1);
        __m128i b = _mm_unpacklo_epi8(r2, r3);
        __m128i c = _mm_unpacklo_epi8(r4, r5);
        __m128i d = _mm_unpacklo_epi8(r6, r7);
        __m128i e = _mm_unpacklo_epi16(a, b);
        __m128i f = _mm_unpackhi_epi16(a, b);
        __m128i g = _mm_unpacklo_epi16(c, d);
        __m128i h = _mm_unpackhi_epi16(c, d);
        uint8_t *target = strip + 8 * i;
        _mm_storeu_si128((__m128i *)(target + 0), _mm_unpacklo_epi32(e, g));
        _mm_storeu_si128((__m128i *)(target + 16), _mm_unpackhi_epi32(e, g));
        _mm_storeu_si128((__m128i *)(target + 32), _mm_unpacklo_epi32(f, h));
        _mm_storeu_si128((__m128i *)(target + 48), _mm_unpackhi_epi32(f, h));
    }
    for (; i < columns; i++) {
        for (size_t r = 0; r < 8; r++) {
            strip[8 * i + r] = rows[r * stride + first + i];
        }
    }
    memset(strip + 8 * columns, 0, 64);
}

/* horizontal_pass, 8 rows at a time: the rows are transposed into a strip, so that one
   16-byte load holds two neighbouring columns of all 8 rows, and two pmaddwd per half
   give the 8 rows' sums for a pair of taps. pairs holds each output pixel's weights as
   pair_hi and pair_lo words, (ksize + 1) / 2 of each. Rows left over (fewer than 8) go
   through the plain C pass. */
static void horizontal_pass_sse2(const uint8_t *src, size_t src_stride, int first_row,
                                 int rows, const Coefficients *c, int out_width,
                                 uint8_t *out, const int32_t *pairs, uint8_t *strip) {
    const __m128i zero = _mm_setzero_si128();
    int npairs = (c->ksize + 1) / 2;
    int first_column = c->bounds[0];
    int end_column = c->bounds[(out_width - 1) * 2] + c->bounds[(out_width - 1) * 2 + 1];
    int yy = 0;
    for (; yy + 8 <= rows; yy += 8) {
        const uint8_t *block = src + (size_t)(yy + first_row) * src_stride;
        transpose_strip(block, src_stride, (size_t)first_column,
                        (size_t)(end_column - first_column), strip);
        uint8_t *target = out + (size_t)yy * (size_t)out_width;
        for (int xx = 0; xx < out_width; xx++) {
            int xmin = c->bounds[xx * 2 + 0] - first_column;
            int xmax = c->bounds[xx * 2 + 1];
            const int32_t *weights = pairs + (size_t)xx * (size_t)npairs * 2;
            __m128i hi0 = zero, hi1 = zero, lo0 = zero, lo1 = zero;
            for (int x = 0, j = 0; x < xmax; x += 2, j++) {
                __m128i two = _mm_loadu_si128((const __m128i *)(strip + 8 * (size_t)(xmin + x)));
                __m128i both = _mm_unpacklo_epi8(two, _mm_srli_si128(two, 8));
                __m128i top = _mm_unpacklo_epi8(both, zero);     /* rows 0-3 */
                __m128i bottom = _mm_unpackhi_epi8(both, zero);  /* rows 4-7 */
                __m128i weights_hi = _mm_set1_epi32(weights[2 * j]);
                __m128i weights_lo = _mm_set1_epi32(weights[2 * j + 1]);
                hi0 = _mm_add_epi32(hi0, _mm_madd_epi16(top, weights_hi));
                hi1 = _mm_add_epi32(hi1, _mm_madd_epi16(bottom, weights_hi));
                lo0 = _mm_add_epi32(lo0, _mm_madd_epi16(top, weights_lo));
                lo1 = _mm_add_epi32(lo1, _mm_madd_epi16(bottom, weights_lo));
            }
            __m128i packed = _mm_packs_epi32(finish_sums(hi0, lo0), finish_sums(hi1, lo1));
            uint8_t column[16];
            _mm_storeu_si128((__m128i *)column, _mm_packus_epi16(packed, packed));
            for (int r = 0; r < 8; r++) {
                target[(size_t)r * (size_t)out_width + (size_t)xx] = column[r];
            }
        }
    }
    if (yy < rows) {
        horizontal_pass(src, src_stride, first_row + yy, rows - yy, c, out_width,
                        out + (size_t)yy * (size_t)out_width);
    }
}
#endif

static int check_size(const char *function, const char *name, Py_buffer *buffer,
                      Py_ssize_t width, Py_ssize_t height) {
    if (width < 1 || height < 1) {
        PyErr_Format(PyExc_ValueError, "%s: %s is %zd x %zd pixels; both must be >= 1",
                     function, name, width, height);
        return 0;
    }
    if (height > PY_SSIZE_T_MAX / width) {
        PyErr_Format(PyExc_ValueError, "%s: %s's size overflows", function, name);
        return 0;
    }
    if (buffer->len != width * height) {
        PyErr_Format(PyExc_ValueError, "%s: %s holds %zd bytes, expected %zd x %zd = %zd",
                     function, name, buffer->len, width, height, width * height);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(reduce_doc,
"reduce(src, width, height, out, box, xscale, yscale)\n"
"--\n\n"
"Pillow's Image.reduce((xscale, yscale), box) of an 8-bit grey image.\n\n"
"src: width * height bytes, row by row. box: (left, top, right, bottom), whole pixels\n"
"inside the image. out: writable, ceil((right - left) / xscale) *\n"
"ceil((bottom - top) / yscale) bytes. Raises ValueError for sizes or a box that do not\n"
"fit, before writing anything.");

static PyObject *reduce(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"src", "width", "height", "out", "box", "xscale", "yscale",
                               NULL};
    Py_buffer src, out;
    Py_ssize_t width, height, left, top, right, bottom, xscale, yscale;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*nnw*(nnnn)nn", keywords, &src, &width,
                                     &height, &out, &left, &top, &right, &bottom, &xscale,
                                     &yscale)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (!check_size("reduce", "src", &src, width, height)) {
        goto done;
    }
    if (xscale < 1 || yscale < 1) {
        PyErr_Format(PyExc_ValueError, "reduce: factors %zd x %zd; both must be >= 1", xscale,
                     yscale);
        goto done;
    }
    if (left < 0 || top < 0 || right > width || bottom > height || right <= left ||
        bottom <= top) {
        PyErr_Format(PyExc_ValueError,
                     "reduce: box (%zd, %zd, %zd, %zd) is empty or outside the %zd x %zd image",
                     left, top, right, bottom, width, height);
        goto done;
    }
    Py_ssize_t box_width = right - left;
    Py_ssize_t box_height = bottom - top;
    Py_ssize_t out_width = (box_width + xscale - 1) / xscale;
    Py_ssize_t out_height = (box_height + yscale - 1) / yscale;
    if (!check_size("reduce", "out", &out, out_width, out_height)) {
        goto done;
    }
    uint32_t *column_sums = malloc((size_t)box_width * sizeof(uint32_t));
    if (column_sums == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    reduce_region((const uint8_t *)src.buf, (size_t)width, (size_t)left, (size_t)top,
                  (size_t)box_width, (size_t)box_height, (size_t)xscale, (size_t)yscale,
                  (uint8_t *)out.buf, column_sums);
    Py_END_ALLOW_THREADS
    free(column_sums);
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(resize_bilinear_doc,
"resize_bilinear(src, width, height, out, out_width, out_height, box, simd=True)\n"
"--\n\n"
"Pillow's Image.resize((out_width, out_height), BILINEAR, box) of an 8-bit grey image\n"
"(without reducing_gap: the caller reduces first, as Pillow does).\n\n"
"src: width * height bytes, row by row. box: (left, top, right, bottom) in source\n"
"pixels, taken as float as Pillow does. out: writable, out_width * out_height bytes.\n"
"simd=False forces the plain C passes (for tests).\n"
"Raises ValueError (sizes, a box outside the image or empty) or MemoryError before\n"
"writing anything.");

static PyObject *resize_bilinear(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"src",        "width", "height", "out", "out_width",
                               "out_height", "box",   "simd",   NULL};
    Py_buffer src, out;
    Py_ssize_t width, height, out_width, out_height;
    float box[4];
    int simd = 1;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*nnw*nn(ffff)|p", keywords, &src, &width,
                                     &height, &out, &out_width, &out_height, &box[0], &box[1],
                                     &box[2], &box[3], &simd)) {
        return NULL;
    }
    PyObject *result = NULL;
    Coefficients horizontal = {0, NULL, NULL};
    Coefficients vertical = {0, NULL, NULL};
    uint8_t *temporary = NULL;
    int32_t *sums = NULL;
    int32_t *pairs = NULL;
    uint8_t *strip = NULL;
    if (!check_size("resize_bilinear", "src", &src, width, height) ||
        !check_size("resize_bilinear", "out", &out, out_width, out_height)) {
        goto done;
    }
    if (width > INT_MAX || height > INT_MAX || out_width > INT_MAX || out_height > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "resize_bilinear: an image side is over INT_MAX");
        goto done;
    }
    /* Pillow's checks, in its words' order. */
    if (box[0] < 0 || box[1] < 0 || box[2] > width || box[3] > height ||
        box[2] - box[0] < 0 || box[3] - box[1] < 0) {
        PyErr_Format(PyExc_ValueError,
                     "resize_bilinear: box (%g, %g, %g, %g) is outside the %zd x %zd image "
                     "or reversed",
                     (double)box[0], (double)box[1], (double)box[2], (double)box[3], width,
                     height);
        goto done;
    }
    const uint8_t *pixels = (const uint8_t *)src.buf;
    uint8_t *target = (uint8_t *)out.buf;
    if (width == out_width && height == out_height && box[0] == 0 && box[1] == 0 &&
        box[2] == out_width && box[3] == out_height) {
        memcpy(target, pixels, (size_t)(width * height));  /* Pillow copies */
        result = Py_NewRef(Py_None);
        goto done;
    }
    /* Pillow's tests, box[2] against the output width included. */
    int need_horizontal = out_width != width || box[0] != 0 || box[2] != out_width;
    int need_vertical = out_height != height || box[1] != 0 || box[3] != out_height;
    if (!precompute((int)height, box[1], box[3], (int)out_height, &vertical) ||
        (need_horizontal &&
         !precompute((int)width, box[0], box[2], (int)out_width, &horizontal))) {
        PyErr_NoMemory();
        goto done;
    }
    int first_row = vertical.bounds[0];
    int last_row = vertical.bounds[out_height * 2 - 2] + vertical.bounds[out_height * 2 - 1];
    int temporary_rows = last_row - first_row;
    if (need_horizontal) {
        temporary = malloc((size_t)out_width * (size_t)(temporary_rows > 0 ? temporary_rows : 1));
        if (temporary == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    /* BILINEAR's weights are 0 to 1, so 0 to 2^22 as integers: both halves of each fit
       pmaddwd's 16 bits (SPLIT_BITS). */
    int vertical_simd = HAVE_SSE2 && simd;
    int horizontal_simd = HAVE_SSE2 && simd && need_horizontal;
    Py_ssize_t row_width = need_horizontal ? out_width : width;  /* what the vertical pass reads */
    if (need_vertical && !vertical_simd) {
        sums = malloc((size_t)row_width * sizeof(int32_t));
        if (sums == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
#if HAVE_SSE2
    if (horizontal_simd) {
        int npairs = (horizontal.ksize + 1) / 2;
        int first_column = horizontal.bounds[0];
        int end_column = horizontal.bounds[(out_width - 1) * 2] +
                         horizontal.bounds[(out_width - 1) * 2 + 1];
        int columns = end_column > first_column ? end_column - first_column : 0;
        pairs = malloc((size_t)out_width * (size_t)npairs * 2 * sizeof(int32_t));
        strip = malloc(((size_t)columns + 8) * 8);
        if (pairs == NULL || strip == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t xx = 0; xx < out_width; xx++) {
            const int32_t *k = horizontal.kk + (size_t)xx * (size_t)horizontal.ksize;
            int32_t *pair = pairs + (size_t)xx * (size_t)npairs * 2;
            for (int j = 0; j < npairs; j++) {
                int32_t second = 2 * j + 1 < horizontal.ksize ? k[2 * j + 1] : 0;
                pair[2 * j] = pair_hi(k[2 * j], second);
                pair[2 * j + 1] = pair_lo(k[2 * j], second);
            }
        }
    }
#endif
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *source = pixels;
    size_t source_stride = (size_t)width;
    if (need_horizontal) {
        for (Py_ssize_t i = 0; i < out_height; i++) {
            vertical.bounds[i * 2] -= first_row;
        }
#if HAVE_SSE2
        if (horizontal_simd) {
            horizontal_pass_sse2(pixels, (size_t)width, first_row, temporary_rows, &horizontal,
                                 (int)out_width, temporary, pairs, strip);
        } else
#endif
        {
            horizontal_pass(pixels, (size_t)width, first_row, temporary_rows, &horizontal,
                            (int)out_width, temporary);
        }
        source = temporary;
        source_stride = (size_t)out_width;
    }
    if (need_vertical) {
#if HAVE_SSE2
        if (vertical_simd) {
            vertical_pass_sse2(source, source_stride, (int)row_width, &vertical,
                               (int)out_height, target);
        } else
#endif
        {
            vertical_pass(source, source_stride, (int)row_width, &vertical, (int)out_height,
                          target, sums);
        }
    } else {
        /* Only the horizontal pass: its rows are the output (first_row is 0 here). */
        memcpy(target, source, (size_t)(out_width * out_height));
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    free(horizontal.bounds);
    free(horizontal.kk);
    free(vertical.bounds);
    free(vertical.kk);
    free(temporary);
    free(sums);
    free(pairs);
    free(strip);
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"reduce", (PyCFunction)(void (*)(void))reduce, METH_VARARGS | METH_KEYWORDS, reduce_doc},
    {"resize_bilinear", (PyCFunction)(void (*)(void))resize_bilinear,
     METH_VARARGS | METH_KEYWORDS, resize_bilinear_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_resize",
    .m_doc = "Pillow's reduce and BILINEAR resize of 8-bit grey images, to the bit, faster.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__resize(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "SIMD", HAVE_SSE2) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
