/* parley streaming resampler - C core. See resample.h for the design notes. */
#include "resample.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && (__BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__)
#error "parley resampler assumes a little-endian host"
#endif

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

/* Design targets (see resample.h). */
#define RS_PASS_EDGE 0.9    /* x lower Nyquist */
#define RS_STOP_EDGE 1.1    /* x lower Nyquist */
#define RS_STOP_DB 95.0     /* design target; >= 90 dB is the requirement */
#define RS_BLOCK 2048u      /* input frames converted per inner iteration */
#define RS_LANES 8u         /* K is a multiple of this */

struct rs_state {
    rs_config cfg;
    unsigned L, M, K, N;
    unsigned mdiv, mmod;
    int kind;
    size_t in_fb, out_fb, sample_bytes;
    float *taps;   /* L*K, branch-major, oldest sample first */
    double *proto; /* N */
    float *buf;    /* cap floats */
    size_t cap, avail, i0;
    unsigned phase;
    uint8_t carry[128];
    size_t carry_len;
    double dc_r, dc_g, dc_x1, dc_y1;
    uint64_t total_in, total_out;
};

static long gcd_l(long a, long b) {
    while (b) {
        long t = a % b;
        a = b;
        b = t;
    }
    return a;
}

static double bessel_i0(double x) {
    double s = 1.0, t = 1.0, q = x * x / 4.0;
    for (int k = 1; k < 500; k++) {
        t *= q / ((double)k * (double)k);
        s += t;
        if (t < 1e-17 * s) break;
    }
    return s;
}

/* Kaiser-windowed sinc, cutoff fc in cycles per prototype sample. */
static void design_kaiser(double *h, unsigned N, double fc, double beta) {
    double c = (N - 1) / 2.0, i0b = bessel_i0(beta);
    for (unsigned k = 0; k < N; k++) {
        double t = k - c;
        double s = (t == 0.0) ? 2.0 * fc : sin(2.0 * M_PI * fc * t) / (M_PI * t);
        double r = (c > 0) ? t / c : 0.0;
        double w = bessel_i0(beta * sqrt(fmax(0.0, 1.0 - r * r))) / i0b;
        h[k] = s * w;
    }
}

static void set_err(char *err, size_t errlen, const char *msg) {
    if (err && errlen) snprintf(err, errlen, "%s", msg);
}

rs_state *rs_create(const rs_config *cfg, char *err, size_t errlen) {
    char msg[256];
    if (cfg->in_rate < 1 || cfg->in_rate > RS_MAX_RATE || cfg->out_rate < 1 ||
        cfg->out_rate > RS_MAX_RATE) {
        snprintf(msg, sizeof msg, "sample rates must be 1..%ld Hz, got in_rate=%ld out_rate=%ld",
                 RS_MAX_RATE, cfg->in_rate, cfg->out_rate);
        set_err(err, errlen, msg);
        return NULL;
    }
    if (cfg->in_format != RS_S16_LE && cfg->in_format != RS_S24_3LE &&
        cfg->in_format != RS_S32_LE) {
        set_err(err, errlen, "in_format must be S16_LE, S24_3LE or S32_LE");
        return NULL;
    }
    if (cfg->in_channels < 1 || cfg->in_channels > 32) {
        snprintf(msg, sizeof msg, "in_channels must be 1..32, got %d", cfg->in_channels);
        set_err(err, errlen, msg);
        return NULL;
    }
    if (cfg->channel != RS_LEFT && cfg->channel != RS_RIGHT && cfg->channel != RS_MIX) {
        set_err(err, errlen, "channel must be 'left', 'right' or 'mix'");
        return NULL;
    }
    if (cfg->channel == RS_RIGHT && cfg->in_channels < 2) {
        set_err(err, errlen, "channel='right' needs in_channels >= 2");
        return NULL;
    }
    if (cfg->out_channels != 1 && cfg->out_channels != 2) {
        snprintf(msg, sizeof msg, "out_channels must be 1 or 2, got %d", cfg->out_channels);
        set_err(err, errlen, msg);
        return NULL;
    }
    if (!(cfg->gain_db >= -120.0 && cfg->gain_db <= 60.0)) {
        set_err(err, errlen, "gain_db must be a number in -120..60");
        return NULL;
    }
    long g = gcd_l(cfg->in_rate, cfg->out_rate);
    long L = cfg->out_rate / g, M = cfg->in_rate / g;
    if ((unsigned long)L > RS_MAX_PHASES) {
        snprintf(msg, sizeof msg,
                 "unsupported rate ratio %ld -> %ld Hz: reduced ratio %ld/%ld needs %ld "
                 "polyphase branches (limit %u)",
                 cfg->in_rate, cfg->out_rate, L, M, L, RS_MAX_PHASES);
        set_err(err, errlen, msg);
        return NULL;
    }
    unsigned maxlm = (unsigned)(L > M ? L : M);
    unsigned N;
    int kind;
    if (L == 1 && M == 1) {
        N = 1;
        kind = 0;
    } else {
        double df = (RS_STOP_EDGE - RS_PASS_EDGE) * 0.5 / maxlm; /* cycles/prototype sample */
        double n = (RS_STOP_DB - 7.95) / (2.285 * 2.0 * M_PI * df);
        N = (unsigned)ceil(n) + 1;
        N |= 1u; /* odd: integer centre */
        kind = 1;
    }
    unsigned K = (N + (unsigned)L - 1) / (unsigned)L;
    K = (K + RS_LANES - 1) / RS_LANES * RS_LANES;
    if (K > RS_MAX_TAPS_PER_PHASE) {
        snprintf(msg, sizeof msg,
                 "unsupported rate ratio %ld -> %ld Hz: the filter would need %u taps per "
                 "output (limit %u)",
                 cfg->in_rate, cfg->out_rate, K, RS_MAX_TAPS_PER_PHASE);
        set_err(err, errlen, msg);
        return NULL;
    }

    rs_state *st = calloc(1, sizeof *st);
    if (!st) {
        set_err(err, errlen, "out of memory");
        return NULL;
    }
    st->cfg = *cfg;
    st->L = (unsigned)L;
    st->M = (unsigned)M;
    st->K = K;
    st->N = N;
    st->kind = kind;
    st->mdiv = (unsigned)(M / L);
    st->mmod = (unsigned)(M % L);
    st->sample_bytes = cfg->in_format == RS_S16_LE ? 2 : cfg->in_format == RS_S24_3LE ? 3 : 4;
    st->in_fb = st->sample_bytes * (size_t)cfg->in_channels;
    st->out_fb = 2 * (size_t)cfg->out_channels;
    st->cap = K + st->mdiv + 2 + RS_BLOCK;
    st->proto = malloc(sizeof(double) * N);
    st->taps = calloc((size_t)L * K, sizeof(float));
    st->buf = calloc(st->cap, sizeof(float));
    if (!st->proto || !st->taps || !st->buf) {
        rs_destroy(st);
        set_err(err, errlen, "out of memory");
        return NULL;
    }
    if (kind == 0) {
        st->proto[0] = 1.0;
    } else {
        double fc = 0.5 / maxlm; /* lower Nyquist, cycles per prototype sample */
        design_kaiser(st->proto, N, fc, 0.1102 * (RS_STOP_DB - 8.7));
    }
    /* DC gain L (each branch ~1), times the user gain. */
    double sum = 0.0;
    for (unsigned k = 0; k < N; k++) sum += st->proto[k];
    double scale = (double)L / sum * pow(10.0, cfg->gain_db / 20.0);
    for (unsigned k = 0; k < N; k++) st->proto[k] *= scale;
    for (unsigned p = 0; p < (unsigned)L; p++)
        for (unsigned m = 0; m < K; m++) {
            size_t idx = p + (size_t)(K - 1 - m) * (size_t)L;
            st->taps[(size_t)p * K + m] = idx < N ? (float)st->proto[idx] : 0.0f;
        }
    st->dc_r = exp(-2.0 * M_PI * RS_DC_CORNER_HZ / (double)cfg->in_rate);
    st->dc_g = (1.0 + st->dc_r) / 2.0;
    rs_reset(st);
    return st;
}

void rs_destroy(rs_state *st) {
    if (!st) return;
    free(st->proto);
    free(st->taps);
    free(st->buf);
    free(st);
}

void rs_reset(rs_state *st) {
    memset(st->buf, 0, st->cap * sizeof(float));
    st->avail = st->K - 1;
    st->i0 = st->K - 1;
    st->phase = 0;
    st->carry_len = 0;
    st->dc_x1 = st->dc_y1 = 0.0;
    st->total_in = st->total_out = 0;
}

/* Number of outputs available once the buffer holds `avail` samples. */
static uint64_t outputs_for(const rs_state *st, uint64_t avail) {
    if (st->i0 >= avail) return 0;
    uint64_t d = avail - 1 - st->i0;
    return (d * st->L + st->L - 1 - st->phase) / st->M + 1;
}

size_t rs_output_bytes(const rs_state *st, size_t in_bytes) {
    uint64_t frames = (st->carry_len + (uint64_t)in_bytes) / st->in_fb;
    return (size_t)outputs_for(st, st->avail + frames) * st->out_fb;
}

size_t rs_max_output_bytes(const rs_state *st, size_t in_bytes) {
    uint64_t frames = ((uint64_t)in_bytes + st->in_fb - 1) / st->in_fb;
    return (size_t)((frames * st->L) / st->M + 1) * st->out_fb;
}

/* ---- inner loops ---------------------------------------------------------------------- */

static inline float dot(const float *restrict c, const float *restrict x, unsigned K) {
    float a[RS_LANES] = {0};
    for (unsigned j = 0; j < K; j += RS_LANES)
        for (unsigned l = 0; l < RS_LANES; l++) a[l] += c[j + l] * x[j + l];
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

static inline void put_s16(uint8_t *o, float y, int och) {
    if (y > 32767.0f) y = 32767.0f;
    if (y < -32768.0f) y = -32768.0f;
    int16_t v = (int16_t)lrintf(y);
    uint16_t u = (uint16_t)v;
    o[0] = (uint8_t)(u & 0xff);
    o[1] = (uint8_t)(u >> 8);
    if (och == 2) {
        o[2] = o[0];
        o[3] = o[1];
    }
}

/* Emits up to max_out outputs from the buffer; returns the count. */
static size_t emit(rs_state *st, uint8_t *out, size_t max_out) {
    const unsigned K = st->K, L = st->L, mdiv = st->mdiv, mmod = st->mmod;
    const float *taps = st->taps, *buf = st->buf;
    const size_t avail = st->avail, ofb = st->out_fb;
    const int och = st->cfg.out_channels;
    size_t i0 = st->i0, n = 0;
    unsigned ph = st->phase;
    while (i0 < avail && n < max_out) {
        float y = dot(taps + (size_t)ph * K, buf + i0 + 1 - K, K);
        put_s16(out, y, och);
        out += ofb;
        n++;
        ph += mmod;
        i0 += mdiv;
        if (ph >= L) {
            ph -= L;
            i0++;
        }
    }
    st->i0 = i0;
    st->phase = ph;
    st->total_out += n;
    return n;
}

/* Makes room in the buffer by dropping samples no future output needs. */
static void compact(rs_state *st) {
    size_t keep_from = st->i0 + 1 - st->K;
    size_t d = keep_from < st->avail ? keep_from : st->avail;
    if (d == 0) return;
    memmove(st->buf, st->buf + d, (st->avail - d) * sizeof(float));
    st->avail -= d;
    st->i0 -= d;
}

static inline float rd_sample(const uint8_t *p, rs_format f) {
    switch (f) {
    case RS_S16_LE:
        return (float)(int16_t)(uint16_t)(p[0] | (p[1] << 8));
    case RS_S24_3LE: {
        int32_t v = (int32_t)((uint32_t)p[0] << 8 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 24);
        return (float)(v >> 8) * (1.0f / 256.0f);
    }
    default: {
        int32_t v = (int32_t)((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                              (uint32_t)p[3] << 24);
        return (float)(v >> 8) * (1.0f / 256.0f);
    }
    }
}

static inline void convert_impl(rs_state *st, const uint8_t *in, size_t n, rs_format f,
                                int mix, int dc) {
    float *dst = st->buf + st->avail;
    const size_t fb = st->in_fb, sb = st->sample_bytes;
    const size_t off = st->cfg.channel == RS_RIGHT ? sb : 0;
    if (mix && st->cfg.in_channels < 2) mix = 0;
    double x1 = st->dc_x1, y1 = st->dc_y1;
    const double r = st->dc_r, g = st->dc_g;
    for (size_t i = 0; i < n; i++, in += fb) {
        float x;
        if (mix)
            x = (rd_sample(in, f) + rd_sample(in + sb, f)) * 0.5f;
        else
            x = rd_sample(in + off, f);
        if (dc) {
            double y = g * ((double)x - x1) + r * y1;
            x1 = x;
            y1 = y;
            x = (float)y;
        }
        dst[i] = x;
    }
    st->dc_x1 = x1;
    st->dc_y1 = y1;
    st->avail += n;
}

static void convert(rs_state *st, const uint8_t *in, size_t n) {
    const int mix = st->cfg.channel == RS_MIX, dc = st->cfg.dc_remove != 0;
    switch (st->cfg.in_format) {
    case RS_S16_LE:
        if (dc) convert_impl(st, in, n, RS_S16_LE, mix, 1);
        else convert_impl(st, in, n, RS_S16_LE, mix, 0);
        break;
    case RS_S24_3LE:
        if (dc) convert_impl(st, in, n, RS_S24_3LE, mix, 1);
        else convert_impl(st, in, n, RS_S24_3LE, mix, 0);
        break;
    default:
        if (dc) convert_impl(st, in, n, RS_S32_LE, mix, 1);
        else convert_impl(st, in, n, RS_S32_LE, mix, 0);
        break;
    }
    st->total_in += n;
}

size_t rs_process(rs_state *st, const uint8_t *in, size_t in_bytes, uint8_t *out) {
    uint8_t *o = out;
    const size_t fb = st->in_fb;
    if (st->carry_len) {
        size_t take = fb - st->carry_len;
        if (take > in_bytes) take = in_bytes;
        memcpy(st->carry + st->carry_len, in, take);
        st->carry_len += take;
        in += take;
        in_bytes -= take;
        if (st->carry_len < fb) return 0;
        if (st->avail == st->cap) compact(st);
        convert(st, st->carry, 1);
        st->carry_len = 0;
        o += emit(st, o, SIZE_MAX) * st->out_fb;
    }
    size_t frames = in_bytes / fb;
    while (frames) {
        if (st->avail == st->cap) compact(st);
        size_t n = st->cap - st->avail;
        if (n > frames) n = frames;
        convert(st, in, n);
        in += n * fb;
        frames -= n;
        o += emit(st, o, SIZE_MAX) * st->out_fb;
    }
    size_t rest = in_bytes % fb;
    memcpy(st->carry, in, rest);
    st->carry_len = rest;
    return (size_t)(o - out);
}

static uint64_t flush_target(const rs_state *st) {
    if (st->total_in == 0) return 0;
    /* outputs representing input time < total_in: n*M/L - (N-1)/(2L) < total_in */
    uint64_t num = 2 * st->total_in * st->L + st->N - 1, den = 2 * (uint64_t)st->M;
    return (num + den - 1) / den;
}

size_t rs_flush_bytes(const rs_state *st) {
    uint64_t t = flush_target(st);
    return t > st->total_out ? (size_t)(t - st->total_out) * st->out_fb : 0;
}

size_t rs_flush(rs_state *st, uint8_t *out) {
    uint64_t target = flush_target(st);
    uint8_t *o = out;
    while (st->total_out < target) {
        if (st->avail == st->cap) compact(st);
        size_t n = st->cap - st->avail;
        if (n > RS_LANES) n = RS_LANES;
        memset(st->buf + st->avail, 0, n * sizeof(float));
        st->avail += n;
        o += emit(st, o, (size_t)(target - st->total_out)) * st->out_fb;
    }
    rs_reset(st);
    return (size_t)(o - out);
}

double rs_delay_frames(const rs_state *st) { return (st->N - 1) / (2.0 * st->M); }
unsigned rs_phases(const rs_state *st) { return st->L; }
unsigned rs_decimation(const rs_state *st) { return st->M; }
unsigned rs_taps_per_phase(const rs_state *st) { return st->K; }
unsigned rs_filter_length(const rs_state *st) { return st->N; }
int rs_design_kind(const rs_state *st) { return st->kind; }
size_t rs_in_frame_bytes(const rs_state *st) { return st->in_fb; }
size_t rs_out_frame_bytes(const rs_state *st) { return st->out_fb; }
unsigned rs_prototype(const rs_state *st, double *out) {
    if (out) memcpy(out, st->proto, st->N * sizeof(double));
    return st->N;
}
const rs_config *rs_config_of(const rs_state *st) { return &st->cfg; }
