/* The RWKV World tokenizer in C: greedy longest match over UTF-8 bytes (see data_prep/tokenizer.py).
 *
 * The vocabulary is compiled into a double-array trie whose slots are 8 bytes:
 *
 *     struct { uint32 base; uint16 id; uint16 label; }
 *
 * The child of node s along byte c is slot t = base[s] + c, and it exists when label[t] == c (free slots carry
 * label 0x100, which no byte equals). Checking the label instead of the parent is enough because no two nodes
 * share a base: a slot with label c can only be reached from the one node whose base is t - c. Nodes without
 * children get a base whose 256 following slots are all free. id[t] is the vocabulary id of the byte string
 * that ends at t, 0 when that prefix is not an entry itself.
 *
 * Encoding walks the trie from each position, remembering the last id seen (the longest entry), and emits it.
 * Every single byte is an entry, so each step consumes at least one byte. One step costs one 8-byte load from
 * the slot array (~1 MB for rwkv_vocab_v20230424), and the base of the next step is in the same load.
 *
 * Text comes straight from the str object: ASCII strings are their own UTF-8 bytes; others are encoded into a
 * scratch buffer, and a lone surrogate (no UTF-8 form) is reported with its character index. The GIL is released
 * while encoding a batch (and a long single text): the Encoder is read-only once built, so calls may overlap.
 *
 * Python interface (wrapped by data_prep.tokenizer.NativeTokenizer):
 *
 *     Encoder(tokens)                   tokens[i] is the bytes of id i; tokens[0] (end of document) is ignored
 *     Encoder.encode(text) -> list[int] raises UnicodeEncodeError (start = character index) on a lone surrogate
 *     Encoder.encode_batch(texts, eod=-1) -> (ids, offsets, errors, text_bytes)
 *         ids: bytearray of native uint16, every text's ids, each text followed by `eod` when eod >= 0;
 *         offsets: bytearray of native int64, len(texts) + 1 entries, text i is ids[offsets[i]:offsets[i+1]];
 *         errors: [(index, character position)] of texts with a lone surrogate (they contribute nothing);
 *         text_bytes: UTF-8 bytes of the texts encoded.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FREE_LABEL 0x100u
#define NO_CHILD UINT32_MAX
#define MAX_IDS 65536
#define STACK_TEXT 4096          /* UTF-8 bytes encoded on the stack by encode() */
#define RELEASE_GIL_BYTES 16384  /* encode() of a text this long runs without the GIL */

typedef struct {
    uint32_t base;
    uint16_t id;
    uint16_t label;
} Slot;

/* ------------------------------------------------------------------------------------------------------------ */
/* Building the double array                                                                                     */

typedef struct {
    const uint8_t *bytes;
    uint32_t len;
    uint32_t id;
} Key;

typedef struct {
    Slot *slots;
    uint32_t *search;  /* union-find "next slot worth trying as a first child at or after i" */
    uint8_t *fails;    /* times a slot failed as a first-child position; retired from the search after FAIL_LIMIT */
    uint8_t *base_taken;
    size_t cap;
} Builder;

#define FAIL_LIMIT 32

static int key_cmp(const void *a, const void *b)
{
    const Key *x = a, *y = b;
    uint32_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->bytes, y->bytes, n);
    if (c)
        return c;
    if (x->len != y->len)
        return x->len < y->len ? -1 : 1;
    return x->id < y->id ? -1 : (x->id > y->id);
}

static int builder_reserve(Builder *b, size_t need)
{
    if (need <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 1 << 16;
    while (cap < need)
        cap *= 2;
    Slot *slots = realloc(b->slots, cap * sizeof(Slot));
    if (!slots)
        return -1;
    b->slots = slots;
    uint32_t *search = realloc(b->search, cap * sizeof(uint32_t));
    if (!search)
        return -1;
    b->search = search;
    uint8_t *fails = realloc(b->fails, cap);
    if (!fails)
        return -1;
    b->fails = fails;
    uint8_t *taken = realloc(b->base_taken, cap);
    if (!taken)
        return -1;
    b->base_taken = taken;
    for (size_t i = b->cap; i < cap; i++) {
        slots[i].base = NO_CHILD;
        slots[i].id = 0;
        slots[i].label = FREE_LABEL;
        search[i] = (uint32_t)i;
        fails[i] = 0;
        taken[i] = 0;
    }
    b->cap = cap;
    return 0;
}

/* The first slot at or after i still worth trying; slots below cap - 512 never point past cap. */
static uint32_t search_find(uint32_t *search, uint32_t i)
{
    uint32_t root = i;
    while (search[root] != root)
        root = search[root];
    while (search[i] != root) {
        uint32_t next = search[i];
        search[i] = root;
        i = next;
    }
    return root;
}

static int occupy(Builder *b, uint32_t t, uint8_t label, uint32_t id)
{
    if (builder_reserve(b, (size_t)t + 512) < 0)
        return -1;
    b->slots[t].label = label;
    b->slots[t].id = (uint16_t)id;
    b->slots[t].base = NO_CHILD;
    b->search[t] = t + 1;
    return 0;
}

/* A base b >= 1, used by no other node, with b + labels[j] free for every j. */
static int64_t find_base(Builder *b, const uint8_t *labels, int n)
{
    uint32_t f = search_find(b->search, (uint32_t)labels[0] + 1);
    for (;;) {
        uint32_t base = f - labels[0];
        if (builder_reserve(b, (size_t)base + 256 + 512) < 0)
            return -1;
        int ok = !b->base_taken[base];
        for (int j = 1; ok && j < n; j++)
            ok = b->slots[base + labels[j]].label == FREE_LABEL;
        if (ok)
            return base;
        if (++b->fails[f] >= FAIL_LIMIT)
            b->search[f] = f + 1;  /* still free; only no longer tried as a first child */
        f = search_find(b->search, f + 1);
    }
}

/* Give node s the children of keys[lo:hi), which all share their first `depth` bytes (s's path). */
static int place(Builder *b, uint32_t s, const Key *keys, size_t lo, size_t hi, uint32_t depth)
{
    if (lo < hi && keys[lo].len == depth)
        lo++;  /* the entry that ends at s: its id was stored when s was occupied */
    if (lo == hi)
        return 0;
    uint8_t labels[256];
    int n = 1;
    labels[0] = keys[lo].bytes[depth];
    for (size_t k = lo + 1; k < hi; k++) {
        uint8_t c = keys[k].bytes[depth];
        if (labels[n - 1] != c)
            labels[n++] = c;
    }
    int64_t base = find_base(b, labels, n);
    if (base < 0)
        return -1;
    b->slots[s].base = (uint32_t)base;
    b->base_taken[base] = 1;
    /* Occupy every child first, so that the subtrees placed next cannot take their slots. */
    for (size_t k = lo; k < hi;) {
        uint8_t c = keys[k].bytes[depth];
        uint32_t id = keys[k].len == depth + 1 ? keys[k].id : 0;
        if (occupy(b, (uint32_t)base + c, c, id) < 0)
            return -1;
        while (k < hi && keys[k].bytes[depth] == c)
            k++;
    }
    for (size_t k = lo; k < hi;) {
        uint8_t c = keys[k].bytes[depth];
        size_t end = k;
        while (end < hi && keys[end].bytes[depth] == c)
            end++;
        if (place(b, (uint32_t)base + c, keys, k, end, depth + 1) < 0)
            return -1;
        k = end;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Encoding                                                                                                      */

/* Greedy longest match of data[0:n]; writes the ids to out (at most n of them) and returns how many. */
static Py_ssize_t encode_bytes(const Slot *restrict slots, uint32_t root_base, const uint8_t *restrict data,
                               Py_ssize_t n, uint16_t *restrict out)
{
    Py_ssize_t i = 0, k = 0;
    while (i < n) {
        uint32_t s = root_base + data[i];
        uint32_t best = slots[s].id; /* every single byte is an entry */
        Py_ssize_t best_end = i + 1, j = i + 1;
        while (j < n) {
            uint32_t c = data[j];
            uint32_t t = slots[s].base + c;
            if (slots[t].label != c)
                break;
            j++;
            uint32_t id = slots[t].id;
            if (id) {
                best = id;
                best_end = j;
            }
            s = t;
        }
        out[k++] = (uint16_t)best;
        i = best_end;
    }
    return k;
}

typedef struct {
    const void *data;
    Py_ssize_t len;
    int kind;
    int ascii;
} TextRef;

static int text_ref(PyObject *obj, TextRef *ref)
{
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "expected str, got %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(obj) < 0)
        return -1;
#endif
    ref->data = PyUnicode_DATA(obj);
    ref->len = PyUnicode_GET_LENGTH(obj);
    ref->kind = PyUnicode_KIND(obj);
    ref->ascii = PyUnicode_IS_ASCII(obj);
    return 0;
}

/* Most UTF-8 bytes the text can need. */
static Py_ssize_t utf8_bound(const TextRef *ref)
{
    if (ref->ascii)
        return ref->len;
    return ref->len * (ref->kind == PyUnicode_1BYTE_KIND ? 2 : ref->kind == PyUnicode_2BYTE_KIND ? 3 : 4);
}

/* UTF-8 of a non-ASCII text into out (utf8_bound bytes); -1 with *bad = character index at a surrogate. */
static Py_ssize_t to_utf8(const TextRef *ref, uint8_t *restrict out, Py_ssize_t *bad)
{
    Py_ssize_t n = ref->len, k = 0;
    int kind = ref->kind;
    const void *data = ref->data;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 ch = PyUnicode_READ(kind, data, i);
        if (ch < 0x80) {
            out[k++] = (uint8_t)ch;
        } else if (ch < 0x800) {
            out[k++] = (uint8_t)(0xC0 | (ch >> 6));
            out[k++] = (uint8_t)(0x80 | (ch & 0x3F));
        } else if (ch < 0x10000) {
            if (ch >= 0xD800 && ch <= 0xDFFF) {
                *bad = i;
                return -1;
            }
            out[k++] = (uint8_t)(0xE0 | (ch >> 12));
            out[k++] = (uint8_t)(0x80 | ((ch >> 6) & 0x3F));
            out[k++] = (uint8_t)(0x80 | (ch & 0x3F));
        } else {
            out[k++] = (uint8_t)(0xF0 | (ch >> 18));
            out[k++] = (uint8_t)(0x80 | ((ch >> 12) & 0x3F));
            out[k++] = (uint8_t)(0x80 | ((ch >> 6) & 0x3F));
            out[k++] = (uint8_t)(0x80 | (ch & 0x3F));
        }
    }
    return k;
}

/* The UnicodeEncodeError that str.encode("utf-8") would raise: start..end is the run of surrogates. */
static void raise_surrogate(PyObject *text, const TextRef *ref, Py_ssize_t start)
{
    Py_ssize_t end = start + 1;
    while (end < ref->len) {
        Py_UCS4 ch = PyUnicode_READ(ref->kind, ref->data, end);
        if (ch < 0xD800 || ch > 0xDFFF)
            break;
        end++;
    }
    PyObject *exc = PyObject_CallFunction(PyExc_UnicodeEncodeError, "sOnns", "utf-8", text, start, end,
                                          "surrogates not allowed");
    if (exc) {
        PyErr_SetObject(PyExc_UnicodeEncodeError, exc);
        Py_DECREF(exc);
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* The Encoder type                                                                                              */

typedef struct {
    PyObject_HEAD
    Slot *slots;
    uint32_t n_slots;
    uint32_t root_base;
    uint32_t n_ids;
} Encoder;

static void Encoder_dealloc(Encoder *self)
{
    free(self->slots);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Encoder_init(Encoder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tokens", NULL};
    PyObject *tokens;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Encoder", kwlist, &tokens))
        return -1;
    PyObject *seq = PySequence_Fast(tokens, "tokens must be a sequence of bytes");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Key *keys = NULL;
    Builder b = {0};
    int rc = -1;
    if (n < 2 || n > MAX_IDS) {
        PyErr_Format(PyExc_ValueError, "tokens must hold 2..%d entries (id 0 first), got %zd", MAX_IDS, n);
        goto done;
    }
    keys = malloc((size_t)(n - 1) * sizeof(Key));
    if (!keys) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 1; i < n; i++) {
        if (!PyBytes_Check(items[i]) || PyBytes_GET_SIZE(items[i]) < 1) {
            PyErr_Format(PyExc_ValueError, "tokens[%zd] must be non-empty bytes", i);
            goto done;
        }
        /* The bytes objects stay alive (seq holds them) until the trie is built. */
        keys[i - 1].bytes = (const uint8_t *)PyBytes_AS_STRING(items[i]);
        keys[i - 1].len = (uint32_t)PyBytes_GET_SIZE(items[i]);
        keys[i - 1].id = (uint32_t)i;
    }
    size_t n_keys = (size_t)(n - 1);
    qsort(keys, n_keys, sizeof(Key), key_cmp);
    /* The same bytes under two ids: the higher id wins, as in the reference tokenizer's trie. */
    size_t m = 0;
    for (size_t i = 0; i < n_keys; i++) {
        if (m > 0 && keys[m - 1].len == keys[i].len && !memcmp(keys[m - 1].bytes, keys[i].bytes, keys[i].len))
            keys[m - 1] = keys[i];
        else
            keys[m++] = keys[i];
    }
    if (builder_reserve(&b, 1 << 16) < 0 || occupy(&b, 0, 0, 0) < 0 || place(&b, 0, keys, 0, m, 0) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    /* Leaves get a base past every used slot and every other base, whose 256 children are all free. */
    uint32_t top = 0;
    for (size_t i = 0; i < b.cap; i++) {
        if (b.slots[i].label != FREE_LABEL && i + 1 > top)
            top = (uint32_t)i + 1;
        if (b.base_taken[i] && i + 1 > top)
            top = (uint32_t)i + 1;
    }
    if (builder_reserve(&b, (size_t)top + 256) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t i = 0; i < b.cap; i++)
        if (b.slots[i].base == NO_CHILD)
            b.slots[i].base = top;
    uint32_t root_base = b.slots[0].base;
    for (uint32_t c = 0; c < 256; c++) {
        const Slot *t = &b.slots[root_base + c];
        if (root_base == top || t->label != c || t->id == 0) {
            char hex[8];
            snprintf(hex, sizeof hex, "0x%02X", c);
            PyErr_Format(PyExc_ValueError, "the vocabulary has no entry for the single byte %s", hex);
            goto done;
        }
    }
    Slot *slots = realloc(b.slots, ((size_t)top + 256) * sizeof(Slot));
    if (!slots) {
        PyErr_NoMemory();
        goto done;
    }
    b.slots = NULL;
    free(self->slots);
    self->slots = slots;
    self->n_slots = top + 256;
    self->root_base = root_base;
    self->n_ids = (uint32_t)n;
    rc = 0;
done:
    free(b.slots);
    free(b.search);
    free(b.fails);
    free(b.base_taken);
    free(keys);
    Py_DECREF(seq);
    return rc;
}

static int check_ready(Encoder *self)
{
    if (!self->slots) {
        PyErr_SetString(PyExc_RuntimeError, "Encoder was not initialised");
        return -1;
    }
    return 0;
}

static PyObject *Encoder_encode(Encoder *self, PyObject *text)
{
    TextRef ref;
    if (check_ready(self) < 0 || text_ref(text, &ref) < 0)
        return NULL;
    uint8_t stack_text[STACK_TEXT];
    uint16_t stack_ids[STACK_TEXT];
    uint8_t *heap_text = NULL;
    uint16_t *ids = stack_ids, *heap_ids = NULL;
    const uint8_t *bytes = ref.data;
    Py_ssize_t n = ref.len, k;
    PyObject *out = NULL;
    if (!ref.ascii) {
        Py_ssize_t bound = utf8_bound(&ref), bad = -1;
        uint8_t *buf = stack_text;
        if (bound > STACK_TEXT && !(buf = heap_text = malloc((size_t)bound)))
            return PyErr_NoMemory();
        n = to_utf8(&ref, buf, &bad);
        if (n < 0) {
            raise_surrogate(text, &ref, bad);
            goto done;
        }
        bytes = buf;
    }
    if (n > STACK_TEXT && !(ids = heap_ids = malloc((size_t)n * sizeof(uint16_t)))) {
        PyErr_NoMemory();
        goto done;
    }
    if (n >= RELEASE_GIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        k = encode_bytes(self->slots, self->root_base, bytes, n, ids);
        Py_END_ALLOW_THREADS
    } else {
        k = encode_bytes(self->slots, self->root_base, bytes, n, ids);
    }
    out = PyList_New(k);
    if (!out)
        goto done;
    for (Py_ssize_t j = 0; j < k; j++) {
        PyObject *v = PyLong_FromLong(ids[j]);
        if (!v) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, j, v);
    }
done:
    free(heap_text);
    free(heap_ids);
    return out;
}

typedef struct {
    Py_ssize_t index, position;
} BadText;

static PyObject *Encoder_encode_batch(Encoder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"texts", "eod", NULL};
    PyObject *texts;
    int eod = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|i:encode_batch", kwlist, &texts, &eod))
        return NULL;
    if (check_ready(self) < 0)
        return NULL;
    if (eod >= MAX_IDS) {
        PyErr_Format(PyExc_ValueError, "eod must be below %d, got %d", MAX_IDS, eod);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(texts, "texts must be a sequence of str");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **objs = NULL;
    TextRef *refs = NULL;
    int64_t *offsets = NULL;
    uint16_t *ids = NULL;
    uint8_t *scratch = NULL;
    BadText *bad = NULL;
    Py_ssize_t n_objs = 0, n_bad = 0, total = 0, scratch_cap = 0;
    int oom = 0;
    PyObject *result = NULL;

    /* The texts are referenced here, so the encoding below (without the GIL) sees them whatever the caller's
     * list becomes meanwhile. */
    objs = malloc((size_t)(n ? n : 1) * sizeof(PyObject *));
    refs = malloc((size_t)(n ? n : 1) * sizeof(TextRef));
    offsets = malloc((size_t)(n + 1) * sizeof(int64_t));
    if (!objs || !refs || !offsets) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t cap = (eod >= 0 ? n : 0) + 1, max_bound = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *obj = PySequence_Fast_GET_ITEM(seq, i);
        if (text_ref(obj, &refs[i]) < 0) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_TypeError, "texts[%zd] must be str, got %.100s", i, Py_TYPE(obj)->tp_name);
            }
            goto done;
        }
        Py_INCREF(obj);
        objs[n_objs++] = obj;
        Py_ssize_t bound = utf8_bound(&refs[i]);
        cap += bound;  /* at most one id per byte */
        if (!refs[i].ascii && bound > max_bound)
            max_bound = bound;
    }
    ids = malloc((size_t)cap * sizeof(uint16_t));
    if (!ids) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t text_bytes = 0;
    Py_BEGIN_ALLOW_THREADS
    offsets[0] = 0;
    if (max_bound && !(scratch = malloc((size_t)max_bound)))
        oom = 1;
    scratch_cap = max_bound;
    for (Py_ssize_t i = 0; i < n && !oom; i++) {
        const TextRef *ref = &refs[i];
        const uint8_t *bytes = ref->data;
        Py_ssize_t len = ref->len;
        if (!ref->ascii) {
            Py_ssize_t where = -1;
            len = to_utf8(ref, scratch, &where);
            if (len < 0) {
                if (n_bad % 64 == 0) {
                    BadText *grown = realloc(bad, (size_t)(n_bad + 64) * sizeof(BadText));
                    if (!grown) {
                        oom = 1;
                        break;
                    }
                    bad = grown;
                }
                bad[n_bad].index = i;
                bad[n_bad].position = where;
                n_bad++;
                offsets[i + 1] = total;
                continue;
            }
            bytes = scratch;
        }
        total += encode_bytes(self->slots, self->root_base, bytes, len, ids + total);
        if (eod >= 0)
            ids[total++] = (uint16_t)eod;
        text_bytes += len;
        offsets[i + 1] = total;
    }
    Py_END_ALLOW_THREADS
    (void)scratch_cap;
    if (oom) {
        PyErr_NoMemory();
        goto done;
    }
    PyObject *ids_obj = PyByteArray_FromStringAndSize((const char *)ids, total * (Py_ssize_t)sizeof(uint16_t));
    PyObject *off_obj = PyByteArray_FromStringAndSize((const char *)offsets, (n + 1) * (Py_ssize_t)sizeof(int64_t));
    PyObject *errors = PyList_New(n_bad);
    PyObject *nbytes = PyLong_FromSsize_t(text_bytes);
    if (ids_obj && off_obj && errors && nbytes) {
        int ok = 1;
        for (Py_ssize_t j = 0; j < n_bad && ok; j++) {
            PyObject *pair = Py_BuildValue("(nn)", bad[j].index, bad[j].position);
            if (!pair)
                ok = 0;
            else
                PyList_SET_ITEM(errors, j, pair);
        }
        if (ok)
            result = PyTuple_Pack(4, ids_obj, off_obj, errors, nbytes);
    }
    Py_XDECREF(ids_obj);
    Py_XDECREF(off_obj);
    Py_XDECREF(errors);
    Py_XDECREF(nbytes);
done:
    for (Py_ssize_t i = 0; i < n_objs; i++)
        Py_DECREF(objs[i]);
    free(objs);
    free(refs);
    free(offsets);
    free(ids);
    free(scratch);
    free(bad);
    Py_DECREF(seq);
    return result;
}

static PyObject *Encoder_get_slots(Encoder *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLong(self->n_slots);
}

static PyObject *Encoder_get_ids(Encoder *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLong(self->n_ids);
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)Encoder_encode, METH_O,
     "encode(text) -> list[int]: token ids of text (UnicodeEncodeError at a lone surrogate)."},
    {"encode_batch", (PyCFunction)(void (*)(void))Encoder_encode_batch, METH_VARARGS | METH_KEYWORDS,
     "encode_batch(texts, eod=-1) -> (ids, offsets, errors, text_bytes); see the module's docstring."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Encoder_getset[] = {
    {"slots", (getter)Encoder_get_slots, NULL, "slots of the double array (8 bytes each)", NULL},
    {"n_ids", (getter)Encoder_get_ids, NULL, "len(tokens) given to the constructor", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "data_prep._world_tokenizer.Encoder",
    .tp_doc = "Encoder(tokens): greedy longest-match encoder over the vocabulary tokens[1:] (bytes; index = id).",
    .tp_basicsize = sizeof(Encoder),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Encoder_init,
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_methods = Encoder_methods,
    .tp_getset = Encoder_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "data_prep._world_tokenizer",
    .m_doc = "The RWKV World tokenizer's encoder (greedy longest match over a double-array trie), in C.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__world_tokenizer(void)
{
    if (PyType_Ready(&EncoderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&EncoderType);
    if (PyModule_AddObject(m, "Encoder", (PyObject *)&EncoderType) < 0) {
        Py_DECREF(&EncoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
