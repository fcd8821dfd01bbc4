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
#define RS_STOP_DB 96.0     /* Kaiser design target; >= 90 dB is the requirement */
#define RS_REMEZ_STOP_DB 96.0 /* equiripple stopband target (exact on a dense grid) */
#define RS_REMEZ_PASS 0.0046  /* equiripple passband ripple: +/-0.04 dB */
#define RS_REMEZ_MAX_N 801u   /* longer prototypes use the Kaiser design */
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
    size_t (*emit)(struct rs_state *, uint8_t *, size_t);
    const char *kernel;
};

typedef size_t (*rs_emit_fn)(rs_state *, uint8_t *, size_t);
static rs_emit_fn pick_emit(const char **name);

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


/* ---- equiripple (Parks-McClellan / Remez exchange) low-pass design ---------------------- */

/* Remez step: the interpolant through the r+1 extremal grid points ext.  Writes their
 * abscissae xe, barycentric weights b (scaled in the log domain against overflow), the
 * levelled values c, and the ripple delta; scratch holds r+1 doubles.  Returns -1 when two
 * extremals coincide (the design has failed), else 0. */
static int remez_fit(int r, const int *ext, const double *gx, const double *gd,
                     const double *gw, double *xe, double *b, double *c, double *scratch,
                     double *delta) {
    double lmax = -1e300;
    for (int k = 0; k <= r; k++) xe[k] = gx[ext[k]];
    for (int k = 0; k <= r; k++) {
        double lg = 0.0;
        int neg = 0;
        for (int i = 0; i <= r; i++) {
            if (i == k) continue;
            double d = xe[k] - xe[i];
            if (d == 0.0) return -1;
            if (d < 0) neg ^= 1;
            lg -= log(fabs(d));
        }
        c[k] = neg ? -1.0 : 1.0;
        scratch[k] = lg;
        if (lg > lmax) lmax = lg;
    }
    for (int k = 0; k <= r; k++) b[k] = c[k] * exp(scratch[k] - lmax);
    double num = 0.0, den = 0.0;
    for (int k = 0; k <= r; k++) {
        num += b[k] * gd[ext[k]];
        den += b[k] * ((k & 1) ? -1.0 : 1.0) / gw[ext[k]];
    }
    *delta = num / den;
    for (int k = 0; k <= r; k++)
        c[k] = gd[ext[k]] - ((k & 1) ? -1.0 : 1.0) * *delta / gw[ext[k]];
    return 0;
}

/* The fitted interpolant at x (barycentric form; exact at the extremals). */
static double remez_eval(int r, double x, const double *xe, const double *b, const double *c) {
    double sn = 0.0, sd = 0.0;
    for (int k = 0; k <= r; k++) {
        double d = x - xe[k];
        if (d == 0.0) return c[k];
        double t = b[k] / d;
        sn += t * c[k];
        sd += t;
    }
    return sn / sd;
}

/* Type I (N odd) linear-phase low-pass: passband [0, fp], stopband [fs, 0.5] (cycles per
 * sample), weights wp, ws. Writes h[0..N), returns the weighted ripple |delta| (passband
 * ripple delta/wp, stopband delta/ws) or a negative value on failure. */
static double remez_lowpass(double *h, unsigned N, double fp, double fs, double wp, double ws) {
    const int r = (int)(N + 1) / 2; /* cosine terms; the alternation needs r+1 extrema */
    const int density = 20;
    double total = fp + (0.5 - fs);
    int np = (int)ceil(density * r * fp / total) + 2;
    int ns = (int)ceil(density * r * (0.5 - fs) / total) + 2;
    int ng = np + ns;
    double result = -1.0;
    double *gx = malloc(sizeof(double) * ng), *gd = malloc(sizeof(double) * ng);
    double *gw = malloc(sizeof(double) * ng), *ge = malloc(sizeof(double) * ng);
    double *xe = malloc(sizeof(double) * (r + 1)), *b = malloc(sizeof(double) * (r + 1));
    double *c = malloc(sizeof(double) * (r + 1)), *a = malloc(sizeof(double) * r);
    int *ext = malloc(sizeof(int) * (r + 1)), *cand = malloc(sizeof(int) * ng);
    if (!gx || !gd || !gw || !ge || !xe || !b || !c || !a || !ext || !cand) goto done;
    for (int i = 0; i < np; i++) {
        double f = fp * i / (np - 1);
        gx[i] = cos(2.0 * M_PI * f);
        gd[i] = 1.0;
        gw[i] = wp;
    }
    for (int i = 0; i < ns; i++) {
        double f = fs + (0.5 - fs) * i / (ns - 1);
        gx[np + i] = cos(2.0 * M_PI * f);
        gd[np + i] = 0.0;
        gw[np + i] = ws;
    }
    for (int i = 0; i <= r; i++) ext[i] = (int)((long)i * (ng - 1) / r);
    double delta = 0.0;
    for (int iter = 0; iter < 200; iter++) {
        if (remez_fit(r, ext, gx, gd, gw, xe, b, c, ge, &delta) != 0) goto done;
        /* error on the grid */
        for (int g = 0; g < ng; g++) {
            ge[g] = gw[g] * (gd[g] - remez_eval(r, gx[g], xe, b, c));
        }
        /* local extrema of the error (band edges count), signs alternating */
        int nc = 0;
        for (int g = 0; g < ng; g++) {
            int lo = (g == 0 || g == np) ? g : g - 1;
            int hi = (g == ng - 1 || g == np - 1) ? g : g + 1;
            double e = ge[g];
            int is_max = e >= ge[lo] && e >= ge[hi] && e > 0;
            int is_min = e <= ge[lo] && e <= ge[hi] && e < 0;
            if (!(is_max || is_min)) continue;
            if (nc > 0 && ((ge[cand[nc - 1]] > 0) == (e > 0))) {
                if (fabs(e) > fabs(ge[cand[nc - 1]])) cand[nc - 1] = g;
                continue;
            }
            cand[nc++] = g;
        }
        while (nc > r + 1) { /* drop the smaller end extremum: alternation is kept */
            if (fabs(ge[cand[0]]) < fabs(ge[cand[nc - 1]])) {
                nc--;
                memmove(cand, cand + 1, sizeof(int) * (size_t)nc);
            } else {
                nc--;
            }
        }
        if (nc < r + 1) goto done;
        double emax = 0.0, emin = 1e300;
        int same = 1;
        for (int k = 0; k <= r; k++) {
            double e = fabs(ge[cand[k]]);
            if (e > emax) emax = e;
            if (e < emin) emin = e;
            if (cand[k] != ext[k]) same = 0;
            ext[k] = cand[k];
        }
        if (same || (emax - emin) <= 1e-7 * emax) break;
    }
    /* recompute the interpolant on the final extremals and sample it at 2*pi*j/N */
    {
        if (remez_fit(r, ext, gx, gd, gw, xe, b, c, ge, &delta) != 0) goto done;
        for (int j = 0; j < r; j++) a[j] = remez_eval(r, cos(2.0 * M_PI * j / N), xe, b, c);
        double cc = (N - 1) / 2.0;
        for (unsigned n = 0; n < N; n++) {
            double s = a[0];
            for (int j = 1; j < r; j++) s += 2.0 * a[j] * cos(2.0 * M_PI * j * (n - cc) / N);
            h[n] = s / N;
        }
        result = fabs(delta);
    }
done:
    free(gx);
    free(gd);
    free(gw);
    free(ge);
    free(xe);
    free(b);
    free(c);
    free(a);
    free(ext);
    free(cand);
    return result;
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
    double *proto = NULL;
    const double fc = 0.5 / maxlm;                              /* cycles/prototype sample */
    const double df = (RS_STOP_EDGE - RS_PASS_EDGE) * fc;      /* transition width */
    if (L == 1 && M == 1) {
        N = 1;
        kind = 0;
        proto = malloc(sizeof(double));
        if (proto) proto[0] = 1.0;
    } else {
        /* Equiripple first: ~40 % shorter than Kaiser for the same stopband, since the
         * passband may ripple by 0.04 dB instead of Kaiser's 0.0003 dB. */
        const double ds = pow(10.0, -RS_REMEZ_STOP_DB / 20.0), dp = RS_REMEZ_PASS;
        double est = (-10.0 * log10(dp * ds) - 13.0) / (14.6 * df);
        N = 0;
        kind = 2;
        if (est < RS_REMEZ_MAX_N) {
            /* shortest odd length meeting the spec: start at the estimate, walk down while
             * it holds, else up until it holds */
            proto = malloc(sizeof(double) * (RS_REMEZ_MAX_N + 64));
            unsigned n = est < 8 ? 7u : ((unsigned)est | 1u);
            int dir = 0;
            for (int tries = 0; proto && tries < 40 && n >= 3 && n <= RS_REMEZ_MAX_N + 60;
                 tries++) {
                double d = remez_lowpass(proto, n, RS_PASS_EDGE * fc, RS_STOP_EDGE * fc, 1.0,
                                         dp / ds);
                if (d < 0) {
                    N = 0;
                    break;
                }
                int ok = d <= dp * 1.0000001;
                if (ok) N = n;
                if (dir == 0) dir = ok ? -1 : 1;
                if ((dir < 0 && !ok) || (dir > 0 && ok)) break;
                n = dir < 0 ? n - 2 : n + 2;
            }
            if (N && N != n) /* the last design tried was one too short: redo the winner */
                remez_lowpass(proto, N, RS_PASS_EDGE * fc, RS_STOP_EDGE * fc, 1.0, dp / ds);
        }
        if (N == 0) { /* Kaiser-windowed sinc */
            free(proto);
            double n = (RS_STOP_DB - 7.95) / (2.285 * 2.0 * M_PI * df);
            N = ((unsigned)ceil(n) + 1) | 1u; /* odd: integer centre */
            kind = 1;
            proto = malloc(sizeof(double) * N);
            if (proto) design_kaiser(proto, N, fc, 0.1102 * (RS_STOP_DB - 8.7));
        }
    }
    if (!proto) {
        set_err(err, errlen, "out of memory");
        return NULL;
    }
    unsigned K = (N + (unsigned)L - 1) / (unsigned)L;
    K = (K + RS_LANES - 1) / RS_LANES * RS_LANES;
    if (K > RS_MAX_TAPS_PER_PHASE) {
        free(proto);
        snprintf(msg, sizeof msg,
                 "unsupported rate ratio %ld -> %ld Hz: the filter would need %u taps per "
                 "output (limit %u)",
                 cfg->in_rate, cfg->out_rate, K, RS_MAX_TAPS_PER_PHASE);
        set_err(err, errlen, msg);
        return NULL;
    }

    rs_state *st = calloc(1, sizeof *st);
    if (!st) {
        free(proto);
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
    st->proto = proto;
    st->taps = calloc((size_t)L * K, sizeof(float));
    st->buf = calloc(st->cap, sizeof(float));
    if (!st->proto || !st->taps || !st->buf) {
        rs_destroy(st);
        set_err(err, errlen, "out of memory");
        return NULL;
    }
    /* Gain L (each branch ~1), times the user gain. The Kaiser design is normalised to
     * exactly L at DC; the equiripple one is left centred in its passband ripple. */
    double sum = 0.0;
    for (unsigned k = 0; k < N; k++) sum += st->proto[k];
    double scale = (double)L * pow(10.0, cfg->gain_db / 20.0) / (kind == 2 ? 1.0 : sum);
    for (unsigned k = 0; k < N; k++) st->proto[k] *= scale;
    for (unsigned p = 0; p < (unsigned)L; p++)
        for (unsigned m = 0; m < K; m++) {
            size_t idx = p + (size_t)(K - 1 - m) * (size_t)L;
            st->taps[(size_t)p * K + m] = idx < N ? (float)st->proto[idx] : 0.0f;
        }
    st->emit = pick_emit(&st->kernel);
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
/*
 * Every output is an 8-lane dot product over K (a multiple of 8) taps: lane l accumulates
 * c[j+l]*x[j+l] for j = 0, 8, 16, ... in order, then the lanes are summed as
 * ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)). Each kernel computes four outputs at a time (four
 * independent dependency chains) and the tail reuses the same kernel, so a given output
 * sample gets the same bits wherever it falls in a call: chunking never changes the result.
 * The kernel (portable / AVX2+FMA / NEON) is chosen once per machine.
 */

typedef struct {
    const float *c[4];
    const float *x[4];
} rs_job4;

static inline void put4_portable(uint8_t *o, const float y[4], int och) {
    for (int k = 0; k < 4; k++) {
        float v = y[k];
        if (v > 32767.0f) v = 32767.0f;
        if (v < -32768.0f) v = -32768.0f;
        uint16_t u = (uint16_t)(int16_t)lrintf(v);
        uint8_t lo = (uint8_t)(u & 0xff), hi = (uint8_t)(u >> 8);
        if (och == 2) {
            o[4 * k] = lo;
            o[4 * k + 1] = hi;
            o[4 * k + 2] = lo;
            o[4 * k + 3] = hi;
        } else {
            o[2 * k] = lo;
            o[2 * k + 1] = hi;
        }
    }
}

static inline void dot4_portable(const rs_job4 *jb, unsigned K, float y[4]) {
    for (int k = 0; k < 4; k++) {
        const float *restrict c = jb->c[k], *restrict x = jb->x[k];
        float a[RS_LANES] = {0};
        for (unsigned j = 0; j < K; j += RS_LANES)
            for (unsigned l = 0; l < RS_LANES; l++) a[l] += c[j + l] * x[j + l];
        y[k] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    }
}

#define RS_ALWAYS_INLINE static inline __attribute__((always_inline))

/* The emit loop, instantiated per instruction set: DOT4(job, K, y) and PUT4(o, y, och)
 * (PUT4 writes 4 outputs; for a partial group only the first n are copied out). */
#define RS_DEFINE_EMIT(NAME, ATTR, DOT4, PUT4)                                               \
    ATTR static size_t NAME(rs_state *st, uint8_t *out, size_t max_out) {                  \
        const unsigned K = st->K, L = st->L, mdiv = st->mdiv, mmod = st->mmod;             \
        const float *taps = st->taps, *buf = st->buf;                                      \
        const size_t avail = st->avail, ofb = st->out_fb;                                  \
        const int och = st->cfg.out_channels;                                              \
        size_t i0 = st->i0, n = 0;                                                         \
        unsigned ph = st->phase;                                                           \
        rs_job4 jb;                                                                        \
        float y[4];                                                                        \
        while (i0 < avail && n < max_out) {                                                \
            size_t i = i0;                                                                 \
            unsigned p = ph;                                                               \
            int cnt = 0;                                                                   \
            for (int k = 0; k < 4; k++) {                                                  \
                if (i < avail && n + (size_t)k < max_out) {                                \
                    cnt = k + 1;                                                           \
                    i0 = i;                                                                \
                    ph = p;                                                                \
                }                                                                          \
                size_t ii = i < avail ? i : i0; /* pad the group with a valid output */    \
                unsigned pp = i < avail ? p : ph;                                          \
                jb.c[k] = taps + (size_t)pp * K;                                           \
                jb.x[k] = buf + ii + 1 - K;                                                \
                p += mmod;                                                                 \
                i += mdiv;                                                                 \
                if (p >= L) {                                                              \
                    p -= L;                                                                \
                    i++;                                                                   \
                }                                                                          \
            }                                                                              \
            DOT4(&jb, K, y);                                                               \
            if (cnt == 4) {                                                                \
                PUT4(out, y, och);                                                         \
            } else {                                                                       \
                uint8_t tmp[16];                                                           \
                PUT4(tmp, y, och);                                                         \
                memcpy(out, tmp, (size_t)cnt * ofb);                                       \
            }                                                                              \
            out += (size_t)cnt * ofb;                                                      \
            n += (size_t)cnt;                                                              \
            /* advance past the last emitted output */                                     \
            ph += mmod;                                                                    \
            i0 += mdiv;                                                                    \
            if (ph >= L) {                                                                 \
                ph -= L;                                                                   \
                i0++;                                                                      \
            }                                                                              \
        }                                                                                  \
        st->i0 = i0;                                                                       \
        st->phase = ph;                                                                    \
        st->total_out += n;                                                                \
        return n;                                                                          \
    }

RS_DEFINE_EMIT(emit_portable, , dot4_portable, put4_portable)

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RS_HAVE_AVX2 1
#define RS_AVX2 __attribute__((target("avx2,fma")))

RS_AVX2 RS_ALWAYS_INLINE void dot4_avx2(const rs_job4 *jb, unsigned K, float y[4]) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const float *c0 = jb->c[0], *c1 = jb->c[1], *c2 = jb->c[2], *c3 = jb->c[3];
    const float *x0 = jb->x[0], *x1 = jb->x[1], *x2 = jb->x[2], *x3 = jb->x[3];
    for (unsigned j = 0; j < K; j += 8) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(c0 + j), _mm256_loadu_ps(x0 + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(c1 + j), _mm256_loadu_ps(x1 + j), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(c2 + j), _mm256_loadu_ps(x2 + j), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(c3 + j), _mm256_loadu_ps(x3 + j), a3);
    }
    /* per output: ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)) */
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(y, r);
}

RS_AVX2 RS_ALWAYS_INLINE void put4_avx2(uint8_t *o, const float y[4], int och) {
    __m128i v = _mm_cvtps_epi32(_mm_loadu_ps(y)); /* round to nearest even */
    __m128i p = _mm_packs_epi32(v, v);            /* saturate to int16 */
    if (och == 2) _mm_storeu_si128((__m128i *)(void *)o, _mm_unpacklo_epi16(p, p));
    else _mm_storel_epi64((__m128i *)(void *)o, p);
}

RS_DEFINE_EMIT(emit_avx2, RS_AVX2, dot4_avx2, put4_avx2)
#endif

#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define RS_HAVE_NEON 1

RS_ALWAYS_INLINE void dot4_neon(const rs_job4 *jb, unsigned K, float y[4]) {
    float32x4_t a[4][2];
    for (int k = 0; k < 4; k++) a[k][0] = a[k][1] = vdupq_n_f32(0.0f);
    const float *c0 = jb->c[0], *c1 = jb->c[1], *c2 = jb->c[2], *c3 = jb->c[3];
    const float *x0 = jb->x[0], *x1 = jb->x[1], *x2 = jb->x[2], *x3 = jb->x[3];
    for (unsigned j = 0; j < K; j += 8) {
        a[0][0] = vfmaq_f32(a[0][0], vld1q_f32(c0 + j), vld1q_f32(x0 + j));
        a[0][1] = vfmaq_f32(a[0][1], vld1q_f32(c0 + j + 4), vld1q_f32(x0 + j + 4));
        a[1][0] = vfmaq_f32(a[1][0], vld1q_f32(c1 + j), vld1q_f32(x1 + j));
        a[1][1] = vfmaq_f32(a[1][1], vld1q_f32(c1 + j + 4), vld1q_f32(x1 + j + 4));
        a[2][0] = vfmaq_f32(a[2][0], vld1q_f32(c2 + j), vld1q_f32(x2 + j));
        a[2][1] = vfmaq_f32(a[2][1], vld1q_f32(c2 + j + 4), vld1q_f32(x2 + j + 4));
        a[3][0] = vfmaq_f32(a[3][0], vld1q_f32(c3 + j), vld1q_f32(x3 + j));
        a[3][1] = vfmaq_f32(a[3][1], vld1q_f32(c3 + j + 4), vld1q_f32(x3 + j + 4));
    }
    /* per output: ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)) */
    float32x4_t s0 = vpaddq_f32(a[0][0], a[0][1]), s1 = vpaddq_f32(a[1][0], a[1][1]);
    float32x4_t s2 = vpaddq_f32(a[2][0], a[2][1]), s3 = vpaddq_f32(a[3][0], a[3][1]);
    float32x4_t t01 = vpaddq_f32(s0, s1), t23 = vpaddq_f32(s2, s3);
    /* t01 = [s0(l0..3), s0(l4..7), s1(l0..3), s1(l4..7)] */
    vst1q_f32(y, vpaddq_f32(t01, t23));
}

RS_ALWAYS_INLINE void put4_neon(uint8_t *o, const float y[4], int och) {
    int16x4_t p = vqmovn_s32(vcvtnq_s32_f32(vld1q_f32(y)));
    if (och == 2) vst1q_s16((int16_t *)(void *)o, vcombine_s16(vzip1_s16(p, p), vzip2_s16(p, p)));
    else vst1_s16((int16_t *)(void *)o, p);
}

RS_DEFINE_EMIT(emit_neon, , dot4_neon, put4_neon)
#endif

static rs_emit_fn pick_emit(const char **name) {
    const char *force = getenv("PARLEY_RESAMPLE_KERNEL"); /* testing: "portable" */
    int portable = force && !strcmp(force, "portable");
#ifdef RS_HAVE_AVX2
    __builtin_cpu_init();
    if (!portable && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        *name = "avx2";
        return emit_avx2;
    }
#endif
#ifdef RS_HAVE_NEON
    if (!portable) {
        *name = "neon";
        return emit_neon;
    }
#endif
    (void)portable;
    *name = "portable";
    return emit_portable;
}

static size_t emit(rs_state *st, uint8_t *out, size_t max_out) {
    return st->emit(st, out, max_out);
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
const char *rs_kernel_name(const rs_state *st) { return st->kernel; }
