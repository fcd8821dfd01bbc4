/* CPython binding for the parley resampler core: hw._resample.Resampler. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "resample.h"

/* Inputs at least this big are processed with the GIL released. */
#define GIL_RELEASE_BYTES 1024

typedef struct {
    PyObject_HEAD
    rs_state *st;
    int busy;
} ResamplerObject;

static int parse_format(const char *s, rs_format *f) {
    if (!strcmp(s, "S16_LE")) *f = RS_S16_LE;
    else if (!strcmp(s, "S24_3LE")) *f = RS_S24_3LE;
    else if (!strcmp(s, "S32_LE")) *f = RS_S32_LE;
    else return -1;
    return 0;
}

static const char *format_name(rs_format f) {
    return f == RS_S16_LE ? "S16_LE" : f == RS_S24_3LE ? "S24_3LE" : "S32_LE";
}

static const char *channel_name(rs_channel c) {
    return c == RS_LEFT ? "left" : c == RS_RIGHT ? "right" : "mix";
}

static int Resampler_init(ResamplerObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"in_rate", "out_rate", "in_format", "in_channels", "channel",
                             "out_channels", "dc_remove", "gain_db", NULL};
    PyObject *in_rate_o, *out_rate_o;
    const char *fmt = "S16_LE", *chan = "left";
    int in_channels = 1, out_channels = 1, dc_remove = 0;
    double gain_db = 0.0;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Resampler is in use by another thread");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|$sisipd:Resampler", kwlist, &in_rate_o,
                                     &out_rate_o, &fmt, &in_channels, &chan, &out_channels,
                                     &dc_remove, &gain_db))
        return -1;
    if (!PyLong_Check(in_rate_o) || PyBool_Check(in_rate_o) || !PyLong_Check(out_rate_o) ||
        PyBool_Check(out_rate_o)) {
        PyErr_SetString(PyExc_TypeError, "in_rate and out_rate must be int (Hz)");
        return -1;
    }
    long in_rate = PyLong_AsLong(in_rate_o), out_rate = PyLong_AsLong(out_rate_o);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "sample rate out of range");
        return -1;
    }
    rs_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.in_rate = in_rate;
    cfg.out_rate = out_rate;
    if (parse_format(fmt, &cfg.in_format)) {
        PyErr_Format(PyExc_ValueError,
                     "unsupported in_format '%s': expected 'S16_LE', 'S24_3LE' or 'S32_LE'", fmt);
        return -1;
    }
    if (!strcmp(chan, "left")) cfg.channel = RS_LEFT;
    else if (!strcmp(chan, "right")) cfg.channel = RS_RIGHT;
    else if (!strcmp(chan, "mix")) cfg.channel = RS_MIX;
    else {
        PyErr_Format(PyExc_ValueError, "unsupported channel '%s': expected 'left', 'right' or 'mix'",
                     chan);
        return -1;
    }
    cfg.in_channels = in_channels;
    cfg.out_channels = out_channels;
    cfg.dc_remove = dc_remove;
    cfg.gain_db = gain_db;
    char err[320];
    rs_state *st = rs_create(&cfg, err, sizeof err);
    if (!st) {
        PyErr_SetString(PyExc_ValueError, err);
        return -1;
    }
    rs_destroy(self->st);
    self->st = st;
    return 0;
}

static void Resampler_dealloc(ResamplerObject *self) {
    rs_destroy(self->st);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check_ready(ResamplerObject *self) {
    if (!self->st) {
        PyErr_SetString(PyExc_RuntimeError, "Resampler not initialised");
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Resampler is in use by another thread");
        return -1;
    }
    return 0;
}

static size_t run(ResamplerObject *self, const uint8_t *in, size_t n, uint8_t *out) {
    size_t w;
    if (n >= GIL_RELEASE_BYTES) {
        self->busy = 1;
        Py_BEGIN_ALLOW_THREADS
        w = rs_process(self->st, in, n, out);
        Py_END_ALLOW_THREADS
        self->busy = 0;
    } else {
        w = rs_process(self->st, in, n, out);
    }
    return w;
}

static PyObject *Resampler_process(ResamplerObject *self, PyObject *data) {
    if (check_ready(self)) return NULL;
    Py_buffer in;
    if (PyObject_GetBuffer(data, &in, PyBUF_SIMPLE)) return NULL;
    size_t need = rs_output_bytes(self->st, (size_t)in.len);
    PyObject *res = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)need);
    if (!res) {
        PyBuffer_Release(&in);
        return NULL;
    }
    size_t w = run(self, (const uint8_t *)in.buf, (size_t)in.len,
                   (uint8_t *)PyBytes_AS_STRING(res));
    PyBuffer_Release(&in);
    if (w != need) { /* cannot happen; guard against silent corruption */
        Py_DECREF(res);
        PyErr_SetString(PyExc_SystemError, "resampler output size mismatch");
        return NULL;
    }
    return res;
}

static PyObject *Resampler_process_into(ResamplerObject *self, PyObject *const *args,
                                        Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "process_into(data, out) takes 2 arguments");
        return NULL;
    }
    if (check_ready(self)) return NULL;
    Py_buffer in, out;
    if (PyObject_GetBuffer(args[0], &in, PyBUF_SIMPLE)) return NULL;
    if (PyObject_GetBuffer(args[1], &out, PyBUF_WRITABLE)) {
        if (PyErr_ExceptionMatches(PyExc_BufferError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "process_into() out must be a writable contiguous buffer, not %.100s",
                         Py_TYPE(args[1])->tp_name);
        }
        PyBuffer_Release(&in);
        return NULL;
    }
    size_t need = rs_output_bytes(self->st, (size_t)in.len);
    if ((size_t)out.len < need) {
        PyErr_Format(PyExc_ValueError,
                     "output buffer too small: %zd bytes, this call writes %zu "
                     "(size it with max_output_bytes(len(data)))",
                     out.len, need);
        PyBuffer_Release(&in);
        PyBuffer_Release(&out);
        return NULL;
    }
    size_t w = run(self, (const uint8_t *)in.buf, (size_t)in.len, (uint8_t *)out.buf);
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return PyLong_FromSize_t(w);
}

static PyObject *Resampler_max_output_bytes(ResamplerObject *self, PyObject *arg) {
    if (!self->st) return check_ready(self), NULL;
    Py_ssize_t n = PyNumber_AsSsize_t(arg, PyExc_OverflowError);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "in_bytes must be >= 0");
        return NULL;
    }
    return PyLong_FromSize_t(rs_max_output_bytes(self->st, (size_t)n));
}

static PyObject *Resampler_flush(ResamplerObject *self, PyObject *Py_UNUSED(ignored)) {
    if (check_ready(self)) return NULL;
    size_t need = rs_flush_bytes(self->st);
    PyObject *res = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)need);
    if (!res) return NULL;
    size_t w = rs_flush(self->st, (uint8_t *)PyBytes_AS_STRING(res));
    if (w != need) {
        Py_DECREF(res);
        PyErr_SetString(PyExc_SystemError, "resampler flush size mismatch");
        return NULL;
    }
    return res;
}

static PyObject *Resampler_reset(ResamplerObject *self, PyObject *Py_UNUSED(ignored)) {
    if (check_ready(self)) return NULL;
    rs_reset(self->st);
    Py_RETURN_NONE;
}

static PyObject *Resampler_prototype(ResamplerObject *self, PyObject *Py_UNUSED(ignored)) {
    if (check_ready(self)) return NULL;
    unsigned n = rs_prototype(self->st, NULL);
    PyObject *res = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n * (Py_ssize_t)sizeof(double));
    if (!res) return NULL;
    rs_prototype(self->st, (double *)PyBytes_AS_STRING(res));
    return res;
}

#define ST_OR_ERR                                                                          \
    if (!self->st) {                                                                       \
        PyErr_SetString(PyExc_RuntimeError, "Resampler not initialised");                 \
        return NULL;                                                                       \
    }

static PyObject *get_delay(ResamplerObject *self, void *c) {
    (void)c;
    ST_OR_ERR
    return PyFloat_FromDouble(rs_delay_frames(self->st));
}
#define CFG (rs_config_of(self->st))
static PyObject *get_in_rate(ResamplerObject *self, void *c) {
    (void)c;
    ST_OR_ERR
    return PyLong_FromLong(CFG->in_rate);
}
static PyObject *get_out_rate(ResamplerObject *self, void *c) {
    (void)c;
    ST_OR_ERR
    return PyLong_FromLong(CFG->out_rate);
}
static PyObject *get_in_format(ResamplerObject *self, void *c) {
    (void)c;
    ST_OR_ERR
    return PyUnicode_FromString(format_name(CFG->in_format));
}
static PyObject *get_channel(ResamplerObject *self, void *c) {
    (void)c;
    ST_OR_ERR
    return PyUnicode_FromString(channel_name(CFG->channel));
}
static PyObject *get_in_channels(ResamplerObject *self, void *c) {
    (void)c;
    ST_OR_ERR
    return PyLong_FromLong(CFG->in_channels);
}
static PyObject *get_out_channels(ResamplerObject *self, void *c) {
    (void)c;
    ST_OR_ERR
    return PyLong_FromLong(CFG->out_channels);
}
static PyObject *get_dc_remove(ResamplerObject *self, void *c) {
    (void)c;
    ST_OR_ERR
    return PyBool_FromLong(CFG->dc_remove);
}
static PyObject *get_gain_db(ResamplerObject *self, void *c) {
    (void)c;
    ST_OR_ERR
    return PyFloat_FromDouble(CFG->gain_db);
}
static PyObject *get_phases(ResamplerObject *self, void *c) {
    (void)c;
    ST_OR_ERR
    return PyLong_FromUnsignedLong(rs_phases(self->st));
}
static PyObject *get_decimation(ResamplerObject *self, void *c) {
    (void)c;
    ST_OR_ERR
    return PyLong_FromUnsignedLong(rs_decimation(self->st));
}
static PyObject *get_taps_per_phase(ResamplerObject *self, void *c) {
    (void)c;
    ST_OR_ERR
    return PyLong_FromUnsignedLong(rs_taps_per_phase(self->st));
}
static PyObject *get_filter_length(ResamplerObject *self, void *c) {
    (void)c;
    ST_OR_ERR
    return PyLong_FromUnsignedLong(rs_filter_length(self->st));
}
static PyObject *get_design(ResamplerObject *self, void *c) {
    (void)c;
    ST_OR_ERR
    int k = rs_design_kind(self->st);
    return PyUnicode_FromString(k == 0 ? "passthrough" : k == 1 ? "kaiser" : "remez");
}
static PyObject *get_in_frame_bytes(ResamplerObject *self, void *c) {
    (void)c;
    ST_OR_ERR
    return PyLong_FromSize_t(rs_in_frame_bytes(self->st));
}
static PyObject *get_out_frame_bytes(ResamplerObject *self, void *c) {
    (void)c;
    ST_OR_ERR
    return PyLong_FromSize_t(rs_out_frame_bytes(self->st));
}

static PyObject *get_kernel(ResamplerObject *self, void *c) {
    (void)c;
    ST_OR_ERR
    return PyUnicode_FromString(rs_kernel_name(self->st));
}

static PyGetSetDef Resampler_getset[] = {
    {"kernel", (getter)get_kernel, NULL, "inner loop in use: 'avx2', 'neon' or 'portable'", NULL},
    {"delay_frames", (getter)get_delay, NULL, "group delay in output frames (float)", NULL},
    {"in_rate", (getter)get_in_rate, NULL, "input sample rate (Hz)", NULL},
    {"out_rate", (getter)get_out_rate, NULL, "output sample rate (Hz)", NULL},
    {"in_format", (getter)get_in_format, NULL, "input sample format", NULL},
    {"in_channels", (getter)get_in_channels, NULL, "input channels per frame", NULL},
    {"channel", (getter)get_channel, NULL, "'left', 'right' or 'mix'", NULL},
    {"out_channels", (getter)get_out_channels, NULL, "output channels (mono duplicated)", NULL},
    {"dc_remove", (getter)get_dc_remove, NULL, "DC-removal high-pass enabled", NULL},
    {"gain_db", (getter)get_gain_db, NULL, "gain in dB", NULL},
    {"phases", (getter)get_phases, NULL, "L: polyphase branches (reduced out/in numerator)", NULL},
    {"decimation", (getter)get_decimation, NULL, "M: reduced out/in denominator", NULL},
    {"taps_per_phase", (getter)get_taps_per_phase, NULL, "K: taps per output (padded)", NULL},
    {"filter_length", (getter)get_filter_length, NULL, "N: prototype filter length", NULL},
    {"design", (getter)get_design, NULL, "'passthrough', 'kaiser' or 'remez'", NULL},
    {"in_frame_bytes", (getter)get_in_frame_bytes, NULL, "bytes per input frame", NULL},
    {"out_frame_bytes", (getter)get_out_frame_bytes, NULL, "bytes per output frame", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Resampler_methods[] = {
    {"process", (PyCFunction)Resampler_process, METH_O,
     "process(data) -> bytes: resample a bytes-like chunk (any chunking)"},
    {"process_into", (PyCFunction)(void (*)(void))Resampler_process_into, METH_FASTCALL,
     "process_into(data, out) -> int: resample into a writable buffer, return bytes written"},
    {"max_output_bytes", (PyCFunction)Resampler_max_output_bytes, METH_O,
     "max_output_bytes(in_bytes) -> int: output bound for in_bytes of input"},
    {"flush", (PyCFunction)Resampler_flush, METH_NOARGS,
     "flush() -> bytes: the filter tail at end of stream, then reset"},
    {"reset", (PyCFunction)Resampler_reset, METH_NOARGS, "reset() -> None"},
    {"prototype", (PyCFunction)Resampler_prototype, METH_NOARGS,
     "prototype() -> bytes: the prototype filter as float64 (native), DC gain = phases"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ResamplerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hw._resample.Resampler",
    .tp_basicsize = sizeof(ResamplerObject),
    .tp_dealloc = (destructor)Resampler_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Streaming polyphase resampler to S16_LE (see hw.resample).",
    .tp_methods = Resampler_methods,
    .tp_getset = Resampler_getset,
    .tp_init = (initproc)Resampler_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef resample_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "hw._resample",
    .m_doc = "C-accelerated streaming resampler (parley).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__resample(void) {
    if (PyType_Ready(&ResamplerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&resample_module);
    if (!m) return NULL;
    Py_INCREF(&ResamplerType);
    if (PyModule_AddObject(m, "Resampler", (PyObject *)&ResamplerType) < 0) {
        Py_DECREF(&ResamplerType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "PASS_EDGE_PERMILLE", 900);
    PyModule_AddIntConstant(m, "STOP_EDGE_PERMILLE", 1100);
    return m;
}
