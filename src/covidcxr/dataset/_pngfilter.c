/*
 * Undo PNG's per-row filters (PNG specification, section 9).
 *
 * covidcxr's training loader inflates a PNG's IDAT stream with libdeflate (through
 * imagecodecs) and calls unfilter() here on the result: a colour PNG then loads in
 * about half the CPU it takes through libpng, whose zlib inflate and scalar Paeth filter
 * are most of its load time, and a lung mask in about a quarter (benchmarks/decode.py).
 * Only 8-bit, non-interlaced images come here (dataset/loading.py checks that and
 * leaves everything else to libpng and Pillow), so a pixel is a whole number of bytes:
 * bpp (1 to 8) bytes per pixel.
 *
 * The four filters whose value depends on the reconstructed pixel to the left (Sub,
 * Average, Paeth) are sequential along a row. For 3 and 4 bytes per pixel (RGB, RGBA:
 * the large images of the collection) Average and Paeth reconstruct a whole pixel at a
 * time in SSE2's 16-bit lanes, and two consecutive Paeth rows go together (one row a
 * pixel behind the other) so that one chain of dependencies does the work of two: 29%
 * less CPU on the collection's PNGs than one row at a time. Every other case is plain
 * C, which is also the reference the tests compare the SSE2 path with. The GIL is released while the rows are
 * reconstructed, so DataLoader's decode threads run in parallel.
 *
 * The loader only needs grey levels: with grey=True each reconstructed row is turned
 * into grey at once (Pillow's arithmetic, to the bit), so a colour image is never held
 * whole and Pillow's own copy and conversion of it are not needed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define HAVE_SSE2 1
#else
#define HAVE_SSE2 0
#endif

#if defined(_MSC_VER)
#define ALWAYS_INLINE __forceinline
#else
#define ALWAYS_INLINE inline __attribute__((always_inline))
#endif

enum { FILTER_NONE, FILTER_SUB, FILTER_UP, FILTER_AVERAGE, FILTER_PAETH, FILTER_COUNT };

/* The Paeth predictor without branches: the choice depends on the pixels, so branches
   would be mispredicted about half the time. */
static inline uint8_t paeth_predictor(int a, int b, int c) {
    int pa = abs(b - c);
    int pb = abs(a - c);
    int pc = abs(a + b - 2 * c);
    int b_or_c = pb <= pc ? b : c;
    return (uint8_t)(pa <= pb && pa <= pc ? a : b_or_c);
}

/* One row in plain C. prior is the previous reconstructed row (all zeros for the first).
   Always inlined with a constant bpp, so that the compiler unrolls the pixel. */
static ALWAYS_INLINE void
unfilter_row_scalar(int filter, const uint8_t *in, uint8_t *out, const uint8_t *prior,
                    size_t rowbytes, size_t bpp) {
    size_t i;
    size_t first = bpp < rowbytes ? bpp : rowbytes;
    switch (filter) {
    case FILTER_NONE:
        memcpy(out, in, rowbytes);
        break;
    case FILTER_SUB:
        for (i = 0; i < first; i++) out[i] = in[i];
        for (; i < rowbytes; i++) out[i] = (uint8_t)(in[i] + out[i - bpp]);
        break;
    case FILTER_UP:
        for (i = 0; i < rowbytes; i++) out[i] = (uint8_t)(in[i] + prior[i]);
        break;
    case FILTER_AVERAGE:
        for (i = 0; i < first; i++) out[i] = (uint8_t)(in[i] + (prior[i] >> 1));
        for (; i < rowbytes; i++) {
            out[i] = (uint8_t)(in[i] + ((out[i - bpp] + prior[i]) >> 1));
        }
        break;
    case FILTER_PAETH:
        /* With no pixel to the left, a = c = 0 and the predictor is b (prior). */
        for (i = 0; i < first; i++) out[i] = (uint8_t)(in[i] + prior[i]);
        for (; i < rowbytes; i++) {
            out[i] = (uint8_t)(in[i] + paeth_predictor(out[i - bpp], prior[i], prior[i - bpp]));
        }
        break;
    }
}

#if HAVE_SSE2
/* A 3- or 4-byte pixel as the low 16-bit lanes. `wide` allows a 4-byte load of a
   3-byte pixel (the byte after it is in the buffer). */
static ALWAYS_INLINE __m128i
load_pixel(const uint8_t *p, size_t bpp, int wide) {
    uint32_t v = 0;
    if (bpp == 4 || wide) {
        memcpy(&v, p, 4);
    } else {
        memcpy(&v, p, 3);
    }
    return _mm_unpacklo_epi8(_mm_cvtsi32_si128((int)v), _mm_setzero_si128());
}

static ALWAYS_INLINE void
store_pixel(uint8_t *p, __m128i v, size_t bpp, int wide) {
    uint32_t packed = (uint32_t)_mm_cvtsi128_si32(_mm_packus_epi16(v, v));
    if (bpp == 4 || wide) {
        memcpy(p, &packed, 4);
    } else {
        memcpy(p, &packed, 3);
    }
}

static inline __m128i abs_epi16(__m128i x) {
    return _mm_max_epi16(x, _mm_sub_epi16(_mm_setzero_si128(), x));
}

/* One Paeth pixel in 16-bit lanes (no overflow of a + b - 2c). What does not depend on
   a, the pixel just reconstructed, is computed first, off the critical path. */
static ALWAYS_INLINE __m128i
paeth_pixel(__m128i a, __m128i b, __m128i c, __m128i x) {
    __m128i b_minus_c = _mm_sub_epi16(b, c);
    __m128i pa = abs_epi16(b_minus_c);
    __m128i b_xor_c = _mm_xor_si128(b, c);
    __m128i a_minus_c = _mm_sub_epi16(a, c);
    __m128i pb = abs_epi16(a_minus_c);
    __m128i pc = abs_epi16(_mm_add_epi16(a_minus_c, b_minus_c));
    /* Ties favour a over b over c, as the specification's order of tests does. */
    __m128i not_a = _mm_cmpgt_epi16(pa, _mm_min_epi16(pb, pc));
    __m128i c_not_b = _mm_cmpgt_epi16(pb, pc);
    __m128i b_or_c = _mm_xor_si128(b, _mm_and_si128(b_xor_c, c_not_b));
    __m128i predictor = _mm_or_si128(_mm_and_si128(not_a, b_or_c), _mm_andnot_si128(not_a, a));
    /* Both lanes' high bytes are zero, so a byte add is the sum modulo 256. */
    return _mm_add_epi8(x, predictor);
}

static ALWAYS_INLINE void
paeth_row_sse2(const uint8_t *in, uint8_t *out, const uint8_t *prior, size_t rowbytes,
               size_t bpp) {
    __m128i a = _mm_setzero_si128();
    __m128i c = _mm_setzero_si128();
    size_t i = 0;
    /* All pixels but the last: a 3-byte pixel is moved with 4-byte loads and stores
       (the extra byte read belongs to the next pixel, and the one written is
       overwritten by it). */
    for (; i + bpp < rowbytes; i += bpp) {
        __m128i b = load_pixel(prior + i, bpp, 1);
        a = paeth_pixel(a, b, c, load_pixel(in + i, bpp, 1));
        store_pixel(out + i, a, bpp, 1);
        c = b;
    }
    if (i + bpp == rowbytes) {
        __m128i b = load_pixel(prior + i, bpp, 0);
        a = paeth_pixel(a, b, c, load_pixel(in + i, bpp, 0));
        store_pixel(out + i, a, bpp, 0);
    }
}

/* One step of paeth_two_rows_sse2: the top row's pixel k and the bottom row's pixel
   k - 1 (1 <= k < width), from `previous` (the last step's result); updates c. */
static ALWAYS_INLINE __m128i
paeth_pair_step(const uint8_t *in_top, const uint8_t *in_bottom, uint8_t *out_top,
                uint8_t *out_bottom, const uint8_t *prior, size_t k, size_t bpp, int wide_top,
                __m128i previous, __m128i *c) {
    __m128i b = _mm_unpacklo_epi64(load_pixel(prior + k * bpp, bpp, wide_top), previous);
    __m128i x = _mm_unpacklo_epi64(load_pixel(in_top + k * bpp, bpp, wide_top),
                                   load_pixel(in_bottom + (k - 1) * bpp, bpp, 1));
    previous = paeth_pixel(previous, b, *c, x);
    store_pixel(out_top + k * bpp, previous, bpp, wide_top);
    store_pixel(out_bottom + (k - 1) * bpp, _mm_unpackhi_epi64(previous, previous), bpp, 1);
    *c = b;
    return previous;
}

/* Two consecutive Paeth rows at once. Paeth's chain of dependencies (each pixel needs
   the one just reconstructed to its left) leaves most of the CPU idle on one row, but
   the row below only needs the row above up to one pixel to its left: so the low half
   of each vector is the top row at pixel k and the high half the bottom row at pixel
   k - 1, and one chain does the work of two. What the bottom row needs of the top row
   (b: top[k - 1], c: top[k - 2]) is the low half of the previous step's result and the
   previous step's b. `prior` is the row above the top row; every row is its own. */
static ALWAYS_INLINE void
paeth_two_rows_sse2(const uint8_t *in_top, const uint8_t *in_bottom, uint8_t *out_top,
                    uint8_t *out_bottom, const uint8_t *prior, size_t rowbytes, size_t bpp) {
    const __m128i zero = _mm_setzero_si128();
    const size_t width = rowbytes / bpp; /* at least 1 */
    /* Step 0: the top row's first pixel (a = c = 0); the bottom half stays zero. */
    __m128i b = load_pixel(prior, bpp, 0);
    __m128i previous = paeth_pixel(zero, b, zero, load_pixel(in_top, bpp, 0));
    store_pixel(out_top, previous, bpp, 0);
    __m128i c = b;
    size_t k = 1;
    /* Whole 4-byte loads and stores (see paeth_row_sse2) except at a row's last pixel. */
    for (; k + 1 < width; k++) {
        previous = paeth_pair_step(in_top, in_bottom, out_top, out_bottom, prior, k, bpp, 1,
                                   previous, &c);
    }
    if (k < width) { /* the top row's last pixel */
        previous = paeth_pair_step(in_top, in_bottom, out_top, out_bottom, prior, k, bpp, 0,
                                   previous, &c);
    }
    /* The bottom row's last pixel (the low half computes nothing that is kept). */
    b = _mm_unpacklo_epi64(zero, previous);
    __m128i x = _mm_unpacklo_epi64(zero, load_pixel(in_bottom + (width - 1) * bpp, bpp, 0));
    previous = paeth_pixel(previous, b, c, x);
    store_pixel(out_bottom + (width - 1) * bpp, _mm_unpackhi_epi64(previous, previous), bpp, 0);
}

static ALWAYS_INLINE __m128i
average_pixel(__m128i a, __m128i b, __m128i x) {
    return _mm_add_epi8(x, _mm_srli_epi16(_mm_add_epi16(a, b), 1));
}

static ALWAYS_INLINE void
average_row_sse2(const uint8_t *in, uint8_t *out, const uint8_t *prior, size_t rowbytes,
                 size_t bpp) {
    __m128i a = _mm_setzero_si128();
    size_t i = 0;
    for (; i + bpp < rowbytes; i += bpp) {
        a = average_pixel(a, load_pixel(prior + i, bpp, 1), load_pixel(in + i, bpp, 1));
        store_pixel(out + i, a, bpp, 1);
    }
    if (i + bpp == rowbytes) {
        a = average_pixel(a, load_pixel(prior + i, bpp, 0), load_pixel(in + i, bpp, 0));
        store_pixel(out + i, a, bpp, 0);
    }
}
#endif

static ALWAYS_INLINE void
unfilter_row_bpp(int filter, const uint8_t *in, uint8_t *out, const uint8_t *prior,
                 size_t rowbytes, size_t bpp, int use_simd) {
#if HAVE_SSE2
    if (use_simd && (bpp == 3 || bpp == 4) && rowbytes % bpp == 0) {
        if (filter == FILTER_PAETH) {
            paeth_row_sse2(in, out, prior, rowbytes, bpp);
            return;
        }
        if (filter == FILTER_AVERAGE) {
            average_row_sse2(in, out, prior, rowbytes, bpp);
            return;
        }
    }
#else
    (void)use_simd;
#endif
    unfilter_row_scalar(filter, in, out, prior, rowbytes, bpp);
}

/* A reconstructed row as grey levels, exactly as Pillow's convert("L") makes them from
   RGB and RGBA (ITU-R 601-2 luma in 16-bit fixed point, rounded; alpha ignored), and
   as getchannel("L") from grey+alpha. */
static ALWAYS_INLINE void
grey_row_bpp(const uint8_t *in, uint8_t *out, size_t width, size_t bpp) {
    size_t x;
    if (bpp == 2) {
        for (x = 0; x < width; x++) out[x] = in[2 * x];
        return;
    }
    for (x = 0; x < width; x++) {
        const uint8_t *p = in + x * bpp;
        uint32_t luma = (uint32_t)p[0] * 19595u + (uint32_t)p[1] * 38470u +
                        (uint32_t)p[2] * 7471u + 0x8000u;
        out[x] = (uint8_t)(luma >> 16);
    }
}

static void grey_row(const uint8_t *in, uint8_t *out, size_t width, size_t bpp) {
    switch (bpp) {
    case 2: grey_row_bpp(in, out, width, 2); break;
    case 3: grey_row_bpp(in, out, width, 3); break;
    case 4: grey_row_bpp(in, out, width, 4); break;
    default: memcpy(out, in, width); break; /* 1: already grey */
    }
}

/* A copy of the row loop for each bpp, so that bpp is a constant in each. */
static void unfilter_row(int filter, const uint8_t *in, uint8_t *out, const uint8_t *prior,
                         size_t rowbytes, size_t bpp, int use_simd) {
    switch (bpp) {
    case 1: unfilter_row_bpp(filter, in, out, prior, rowbytes, 1, use_simd); break;
    case 2: unfilter_row_bpp(filter, in, out, prior, rowbytes, 2, use_simd); break;
    case 3: unfilter_row_bpp(filter, in, out, prior, rowbytes, 3, use_simd); break;
    case 4: unfilter_row_bpp(filter, in, out, prior, rowbytes, 4, use_simd); break;
    case 6: unfilter_row_bpp(filter, in, out, prior, rowbytes, 6, use_simd); break;
    case 8: unfilter_row_bpp(filter, in, out, prior, rowbytes, 8, use_simd); break;
    default: unfilter_row_scalar(filter, in, out, prior, rowbytes, bpp); break;
    }
}

PyDoc_STRVAR(unfilter_doc,
"unfilter(filtered, out, height, rowbytes, bpp, simd=True, grey=False)\n"
"--\n\n"
"Reconstruct PNG scanlines.\n\n"
"filtered: the inflated IDAT data, height rows of a filter-type byte and rowbytes\n"
"bytes. out: a writable C-contiguous buffer of height * rowbytes bytes. bpp: bytes\n"
"per pixel (1 to 8). simd=False forces the plain C path (for tests).\n\n"
"grey=True (bpp 1 to 4, rowbytes a multiple of bpp) writes each reconstructed row's\n"
"grey levels instead, as Pillow's convert(\"L\") makes them from RGB and RGBA and\n"
"getchannel(\"L\") from grey+alpha: out then holds height * rowbytes / bpp bytes,\n"
"and the colour image is never held whole.\n\n"
"Raises ValueError for a wrong length or a filter type above 4, naming the row; out\n"
"is then partly written.");

static PyObject *unfilter(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"filtered", "out",  "height", "rowbytes",
                               "bpp",      "simd", "grey",   NULL};
    Py_buffer filtered, out;
    Py_ssize_t height, rowbytes, bpp;
    int simd = 1;
    int grey = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*w*nnn|pp", keywords, &filtered, &out,
                                     &height, &rowbytes, &bpp, &simd, &grey)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (height < 0 || rowbytes < 0 || bpp < 1 || bpp > 8) {
        PyErr_Format(PyExc_ValueError,
                     "unfilter: height %zd, rowbytes %zd and bpp %zd are not valid",
                     height, rowbytes, bpp);
        goto done;
    }
    if (rowbytes > 0 && height > (PY_SSIZE_T_MAX / (rowbytes + 1))) {
        PyErr_SetString(PyExc_ValueError, "unfilter: height * rowbytes overflows");
        goto done;
    }
    if (filtered.len != height * (rowbytes + 1)) {
        PyErr_Format(PyExc_ValueError,
                     "unfilter: %zd filtered bytes, expected %zd rows of 1 + %zd bytes",
                     filtered.len, height, rowbytes);
        goto done;
    }
    if (grey && (bpp > 4 || rowbytes % bpp != 0)) {
        PyErr_Format(PyExc_ValueError,
                     "unfilter: grey needs 1 to 4 bytes per pixel and whole pixels in a row, "
                     "got bpp %zd and rowbytes %zd",
                     bpp, rowbytes);
        goto done;
    }
    Py_ssize_t width = rowbytes / bpp;
    Py_ssize_t out_row = grey ? width : rowbytes;
    if (out.len != height * out_row) {
        PyErr_Format(PyExc_ValueError, "unfilter: out holds %zd bytes, expected %zd",
                     out.len, height * out_row);
        goto done;
    }
    const uint8_t *in = (const uint8_t *)filtered.buf;
    uint8_t *dst = (uint8_t *)out.buf;
    Py_ssize_t bad_row = -1;
    int bad_filter = 0;
    /* A row of zeros (the prior of the first row) and, for grey, three rows that take
       turns holding the row before and the one or two being reconstructed. */
    size_t stride = (size_t)rowbytes + 1;
    size_t scratch_rows = grey ? 4 : 1;
    uint8_t *zeros = calloc(scratch_rows * stride, 1);
    if (zeros == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *prior = zeros;
    for (Py_ssize_t row = 0; row < height;) {
        const uint8_t *source = in + (size_t)row * stride;
        uint8_t *target = grey ? zeros + (size_t)(1 + row % 3) * stride : dst + row * rowbytes;
        int filter = source[0];
        if (filter >= FILTER_COUNT) {
            bad_row = row;
            bad_filter = filter;
            break;
        }
        Py_ssize_t rows = 1;
#if HAVE_SSE2
        if (simd && filter == FILTER_PAETH && row + 1 < height && source[stride] == FILTER_PAETH &&
            (bpp == 3 || bpp == 4) && rowbytes >= bpp && rowbytes % bpp == 0) {
            uint8_t *below = grey ? zeros + (size_t)(1 + (row + 1) % 3) * stride
                                  : target + rowbytes;
            if (bpp == 3) {
                paeth_two_rows_sse2(source + 1, source + stride + 1, target, below, prior,
                                    (size_t)rowbytes, 3);
            } else {
                paeth_two_rows_sse2(source + 1, source + stride + 1, target, below, prior,
                                    (size_t)rowbytes, 4);
            }
            rows = 2;
        }
#endif
        if (rows == 1) {
            unfilter_row(filter, source + 1, target, prior, (size_t)rowbytes, (size_t)bpp, simd);
        }
        for (Py_ssize_t r = 0; r < rows; r++) {
            const uint8_t *done_row = grey ? zeros + (size_t)(1 + (row + r) % 3) * stride
                                           : dst + (row + r) * rowbytes;
            if (grey) {
                grey_row(done_row, dst + (row + r) * width, (size_t)width, (size_t)bpp);
            }
            prior = done_row;
        }
        row += rows;
    }
    Py_END_ALLOW_THREADS
    free(zeros);
    if (bad_row >= 0) {
        PyErr_Format(PyExc_ValueError, "unfilter: row %zd has filter type %d (0 to 4 exist)",
                     bad_row, bad_filter);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&filtered);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"unfilter", (PyCFunction)(void (*)(void))unfilter, METH_VARARGS | METH_KEYWORDS,
     unfilter_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_pngfilter",
    .m_doc = "PNG scanline reconstruction for covidcxr's training loader.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__pngfilter(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "SIMD", HAVE_SSE2) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
