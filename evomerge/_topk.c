/* The TIES trim's top-k, kept exactly as mergekit keeps it, in O(n).

mergekit keeps the first k of torch.argsort(|x|, descending=True): on CPU an unstable std::sort (libstdc++
introsort) of (value, index) pairs. Where |x| ties at the cut (common in fp16/bf16 task vectors) which of
the tied entries come first depends on that sort's partitions, so this follows the very same partitions
(median of three moved to the front, Hoare scan, small ranges left to a stable insertion sort), but only
into the one range that holds position k: about three passes over the data instead of a full sort.

Python checks the result against torch.argsort once per process (evomerge.methods) and falls back to the
sort where a build of torch sorts differently. Entries are packed as (|x| bits << 32 | index): non-negative
floats order as their bits, and a swap moves one word. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

#define SMALL 16 /* libstdc++'s _S_threshold: ranges this small are left to the final insertion sort */

static inline int before(uint64_t a, uint64_t b) { return (a >> 32) > (b >> 32); } /* descending */

static inline void swap(uint64_t *a, uint64_t *b) {
    uint64_t t = *a;
    *a = *b;
    *b = t;
}

/* std::__move_median_to_first(result, a, b, c) */
static void median_to_first(uint64_t *result, uint64_t *a, uint64_t *b, uint64_t *c) {
    if (before(*a, *b)) {
        if (before(*b, *c)) swap(result, b);
        else if (before(*a, *c)) swap(result, c);
        else swap(result, a);
    } else if (before(*a, *c)) swap(result, a);
    else if (before(*b, *c)) swap(result, c);
    else swap(result, b);
}

/* std::__unguarded_partition_pivot: the cut; [first, cut) holds entries >= the pivot, the rest <= it. */
static uint64_t *partition(uint64_t *first, uint64_t *last) {
    median_to_first(first, first + 1, first + (last - first) / 2, last - 1);
    const uint64_t pivot = *first;
    uint64_t *lo = first + 1, *hi = last;
    for (;;) {
        while (before(*lo, pivot)) ++lo;
        --hi;
        while (before(pivot, *hi)) --hi;
        if (!(lo < hi)) return lo;
        swap(lo, hi);
        ++lo;
    }
}

/* Stable insertion sort, as std::__final_insertion_sort leaves a small range. */
static void insertion_sort(uint64_t *first, uint64_t *last) {
    for (uint64_t *i = first + 1; i < last; ++i) {
        uint64_t v = *i, *j = i;
        while (j > first && before(v, j[-1])) {
            *j = j[-1];
            --j;
        }
        *j = v;
    }
}

static int floor_log2(size_t n) {
    int k = 0;
    while (n >>= 1) ++k;
    return k;
}

/* Rearrange keys[0, n) so that its first k entries are the first k of std::sort's result.
   0 when done; 1 when the sort would have switched to heapsort on this path (the caller sorts instead). */
static int select_prefix(uint64_t *keys, size_t n, size_t k) {
    uint64_t *first = keys, *last = keys + n, *cut_at = keys + k;
    int depth = 2 * floor_log2(n);
    while (last - first > SMALL) {
        if (depth == 0) return 1;
        --depth;
        uint64_t *cut = partition(first, last);
        if (cut == cut_at) return 0;
        if (cut < cut_at) first = cut; /* the sort recurses into [cut, last) */
        else last = cut;               /* ... and loops on [first, cut) */
    }
    insertion_sort(first, last);
    return 0;
}

/* top_k_mask(values, mask, k) -> status: mask[i] = 1 for the k entries of largest |values[i]| (float32),
   0 elsewhere. Status 0 done, 1 the sort would have used heapsort, 2 a NaN among the values, 3 too many
   entries; the mask is then unspecified. Runs without the GIL. */
static PyObject *top_k_mask(PyObject *self, PyObject *args) {
    Py_buffer values, mask;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "y*w*n", &values, &mask, &k)) return NULL;
    size_t n = (size_t)values.len / sizeof(float);
    int status = 0;
    if (values.len % sizeof(float) || (size_t)mask.len != n || k < 0 || (size_t)k > n) {
        PyBuffer_Release(&values);
        PyBuffer_Release(&mask);
        PyErr_SetString(PyExc_ValueError, "top_k_mask: values must be float32, mask one byte each, 0 <= k <= n");
        return NULL;
    }
    uint64_t *keys = NULL;
    if (n > UINT32_MAX) status = 3;
    else if (n > 0 && !(keys = malloc(n * sizeof(uint64_t)))) {
        PyBuffer_Release(&values);
        PyBuffer_Release(&mask);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    const uint32_t *bits = (const uint32_t *)values.buf;
    uint8_t *out = (uint8_t *)mask.buf;
    for (size_t i = 0; keys && i < n; ++i) {
        uint32_t magnitude = bits[i] & 0x7FFFFFFFu;
        if (magnitude > 0x7F800000u) {
            status = 2;
            break;
        }
        keys[i] = ((uint64_t)magnitude << 32) | i;
    }
    if (keys && status == 0 && (size_t)k < n && k > 0) status = select_prefix(keys, n, (size_t)k);
    if (keys && status == 0) {
        for (size_t i = 0; i < (size_t)k; ++i) out[(uint32_t)keys[i]] = 1;
        for (size_t i = (size_t)k; i < n; ++i) out[(uint32_t)keys[i]] = 0;
    }
    Py_END_ALLOW_THREADS
    free(keys);
    PyBuffer_Release(&values);
    PyBuffer_Release(&mask);
    return PyLong_FromLong(status);
}

static PyMethodDef methods[] = {
    {"top_k_mask", top_k_mask, METH_VARARGS, "mask of the k largest |values|, in std::sort's tie order"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_topk", NULL, -1, methods};

PyMODINIT_FUNC PyInit__topk(void) { return PyModule_Create(&module); }
