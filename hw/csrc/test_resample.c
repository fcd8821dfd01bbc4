/* C-level tests of the resampler core, run natively and (on x86-64) for aarch64 under qemu
 * to check the NEON path: bit-exact chunked == one-shot, sine level, alias/image rejection,
 * saturation, and vector kernel vs portable kernel agreement. Exits non-zero on failure. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "resample.h"

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

static int failures = 0;
#define CHECK(cond, ...)                                                                   \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            failures++;                                                                    \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                    \
            printf(__VA_ARGS__);                                                           \
            printf("\n");                                                                  \
        }                                                                                  \
    } while (0)

static uint32_t rng_state = 12345u;
static uint32_t rnd(void) {
    rng_state = rng_state * 1664525u + 1013904223u;
    return rng_state >> 8;
}

static rs_state *make(long in, long out, rs_format f, int ch, rs_channel c, double gain) {
    rs_config cfg = {in, out, f, ch, c, 1, 0, gain};
    char err[256];
    rs_state *st = rs_create(&cfg, err, sizeof err);
    if (!st) {
        printf("FAIL create %ld->%ld: %s\n", in, out, err);
        exit(2);
    }
    return st;
}

/* Runs in through st (chunk sizes from rnd() % maxchunk + 1, or all at once if 0), then
 * flushes; returns the number of output samples written to out. */
static size_t run(rs_state *st, const uint8_t *in, size_t n, int16_t *out, size_t maxchunk) {
    uint8_t *o = (uint8_t *)out;
    size_t i = 0;
    while (i < n) {
        size_t c = maxchunk ? rnd() % maxchunk + 1 : n;
        if (c > n - i) c = n - i;
        size_t need = rs_output_bytes(st, c);
        size_t w = rs_process(st, in + i, c, o);
        CHECK(w == need, "output size %zu != predicted %zu", w, need);
        CHECK(w <= rs_max_output_bytes(st, c), "output above max_output_bytes");
        o += w;
        i += c;
    }
    size_t fb = rs_flush_bytes(st);
    size_t w = rs_flush(st, o);
    CHECK(w == fb, "flush size");
    o += w;
    return (size_t)(o - (uint8_t *)out) / 2;
}

static double bessel_i0(double x) {
    double s = 1, t = 1;
    for (int k = 1; k < 300; k++) {
        t *= x * x / (4.0 * k * k);
        s += t;
        if (t < 1e-17 * s) break;
    }
    return s;
}

/* Amplitude of the component at freq (Kaiser beta=20 window). */
static double amp_at(const int16_t *y, size_t n, double rate, double freq) {
    double re = 0, im = 0, ws = 0, i0b = bessel_i0(20.0);
    for (size_t k = 0; k < n; k++) {
        double r = 2.0 * k / (n - 1) - 1.0;
        double w = bessel_i0(20.0 * sqrt(fmax(0.0, 1 - r * r))) / i0b;
        double ph = 2 * M_PI * freq * (double)k / rate;
        re += w * y[k] * cos(ph);
        im -= w * y[k] * sin(ph);
        ws += w;
    }
    return 2 * sqrt(re * re + im * im) / ws;
}

static double fold(double f, double rate) {
    f = fmod(f, rate);
    if (f < 0) f += rate;
    return f > rate / 2 ? rate - f : f;
}

static int16_t *tone16(long rate, double f, size_t n, double amp) {
    int16_t *x = malloc(n * sizeof(int16_t));
    for (size_t k = 0; k < n; k++) x[k] = (int16_t)lrint(amp * sin(2 * M_PI * f * k / rate));
    return x;
}

static void test_chunking(long in, long out, rs_format f, int ch, rs_channel c) {
    size_t sb = f == RS_S16_LE ? 2 : f == RS_S24_3LE ? 3 : 4;
    size_t n = (size_t)in / 5 * sb * (size_t)ch; /* 0.2 s */
    uint8_t *raw = malloc(n);
    for (size_t k = 0; k < n; k++) raw[k] = (uint8_t)rnd();
    size_t cap = (size_t)(n / sb / ch * out / in + 4096);
    int16_t *a = malloc(cap * 2), *b = malloc(cap * 2);
    rs_state *st = make(in, out, f, ch, c, 0.0);
    size_t na = run(st, raw, n, a, 0);
    static const size_t chunks[] = {1, 2, 5, 7, 64, 1000, 4801};
    for (size_t i = 0; i < sizeof chunks / sizeof *chunks; i++) {
        size_t nb = run(st, raw, chunks[i] == 1 ? n / 4 : n, b, chunks[i]);
        if (chunks[i] == 1) { /* shorter input: compare with its own one-shot */
            int16_t *a2 = malloc(cap * 2);
            size_t na2 = run(st, raw, n / 4, a2, 0);
            CHECK(na2 == nb && !memcmp(a2, b, nb * 2), "%ld->%ld fmt %d: 1-byte chunks differ",
                  in, out, (int)f);
            free(a2);
        } else {
            CHECK(na == nb && !memcmp(a, b, na * 2), "%ld->%ld fmt %d: chunks<=%zu differ", in,
                  out, (int)f, chunks[i]);
        }
    }
    rs_destroy(st);
    free(raw);
    free(a);
    free(b);
}

/* Level of a 1 kHz tone, and the worst alias/image of tones that must be rejected. */
static void test_quality(long in, long out) {
    double nl = (in < out ? in : out) / 2.0;
    const size_t nout = 8192;
    size_t nin = (size_t)((nout + 2000) * (double)in / out) + 16;
    int16_t *y = malloc((nin * out / in + 4096) * 2);
    rs_state *st = make(in, out, RS_S16_LE, 1, RS_LEFT, 0.0);

    int16_t *x = tone16(in, 1000.0, nin, 16000.0);
    run(st, (uint8_t *)x, nin * 2, y, 0);
    double lv = 20 * log10(amp_at(y + 1000, nout, (double)out, 1000.0) / 16000.0);
    CHECK(fabs(lv) < 0.1, "%ld->%ld: 1 kHz level %.3f dB", in, out, lv);
    free(x);

    /* Tones in the passband (0.1..0.9 Nl) and, when the input has any, in the stopband
     * (1.1 Nl .. in/2). Every component at g = k*in +/- f with g >= 1.1 Nl must come out
     * >= 90 dB down; it is observed at fold(g, out), unless that coincides with the tone. */
    double worst = -300;
    double tones[12];
    int nt = 0;
    for (int i = 1; i <= 5; i++) tones[nt++] = 0.9 * nl * i / 5.0 + 0.1234567;
    if (1.1 * nl < 0.995 * in / 2)
        for (int i = 0; i < 5; i++)
            tones[nt++] = 1.1 * nl + (0.995 * in / 2 - 1.1 * nl) * i / 4.0 + 0.1234567;
    for (int t = 0; t < nt; t++) {
        double f = tones[t], keep = f < nl ? fold(f, (double)out) : -1e9;
        x = tone16(in, f, nin, 30000.0);
        run(st, (uint8_t *)x, nin * 2, y, 0);
        for (int k = 0; k <= 4; k++)
            for (int sgn = -1; sgn <= 1; sgn += 2) {
                double g = fabs(k * (double)in + sgn * f);
                if (g < 1.1 * nl) continue;
                double at = fold(g, (double)out);
                if (fabs(at - keep) < 50.0) continue;
                double a = 20 * log10(amp_at(y + 1000, nout, (double)out, at) / 30000.0 + 1e-30);
                if (a > worst) worst = a;
            }
        free(x);
    }
    CHECK(worst <= -90.0, "%ld->%ld: rejection only %.1f dB", in, out, -worst);
    printf("  %ld->%ld: 1 kHz level %+.4f dB, rejection %.1f dB, delay %.3f ms\n", in, out, lv,
           -worst, rs_delay_frames(st) / out * 1e3);
    rs_destroy(st);
    free(y);
}

static void test_saturation(void) {
    const size_t n = 4800;
    int16_t *x = malloc(n * 2), *y = malloc(n * 2 + 8192);
    for (int sgn = 0; sgn < 2; sgn++) {
        for (size_t k = 0; k < n; k++) x[k] = sgn ? -32768 : 32767;
        rs_state *st = make(48000, 24000, RS_S16_LE, 1, RS_LEFT, 12.0);
        size_t m = run(st, (uint8_t *)x, n * 2, y, 0);
        int bad = 0;
        for (size_t k = 100; k < m - 100; k++) bad += y[k] != (sgn ? -32768 : 32767);
        CHECK(bad == 0, "saturation: %d samples not clipped (sign %d)", bad, sgn);
        rs_destroy(st);
    }
    /* full-scale sine at +12 dB: the peaks clip, no sample flips sign near a peak */
    int16_t *s = tone16(48000, 1000.0, n, 32767.0);
    rs_state *st = make(48000, 24000, RS_S16_LE, 1, RS_LEFT, 12.0);
    size_t m = run(st, (uint8_t *)s, n * 2, y, 0);
    int mx = 0, mn = 0, flips = 0;
    for (size_t k = 200; k + 200 < m; k++) {
        if (y[k] > mx) mx = y[k];
        if (y[k] < mn) mn = y[k];
        if (k > 0 && ((y[k] > 20000 && y[k - 1] < -20000) || (y[k] < -20000 && y[k - 1] > 20000)))
            flips++;
    }
    CHECK(mx == 32767 && mn == -32768 && flips == 0, "sine saturation max %d min %d flips %d",
          mx, mn, flips);
    rs_destroy(st);
    free(s);
    free(x);
    free(y);
}

/* The vector kernel agrees with the portable one within 1 LSB (FMA rounding differs). */
static void test_kernels_agree(long in, long out) {
    size_t n = (size_t)in / 2;
    int16_t *x = tone16(in, 997.0, n, 20000.0);
    for (size_t k = 0; k < n; k++) x[k] = (int16_t)(x[k] / 2 + (int16_t)(rnd() % 16384) - 8192);
    int16_t *a = malloc((n * out / in + 4096) * 2), *b = malloc((n * out / in + 4096) * 2);
    rs_state *st = make(in, out, RS_S16_LE, 1, RS_LEFT, 0.0);
    const char *kname = rs_kernel_name(st);
    size_t na = run(st, (uint8_t *)x, n * 2, a, 0);
    setenv("PARLEY_RESAMPLE_KERNEL", "portable", 1);
    rs_state *sp = make(in, out, RS_S16_LE, 1, RS_LEFT, 0.0);
    unsetenv("PARLEY_RESAMPLE_KERNEL");
    size_t nb = run(sp, (uint8_t *)x, n * 2, b, 0);
    int maxd = 0;
    for (size_t k = 0; k < na && k < nb; k++) {
        int d = abs(a[k] - b[k]);
        if (d > maxd) maxd = d;
    }
    CHECK(na == nb && maxd <= 1, "%ld->%ld: %s vs portable differ by %d LSB", in, out, kname,
          maxd);
    rs_destroy(st);
    rs_destroy(sp);
    free(x);
    free(a);
    free(b);
}

int main(void) {
    static const long rates[] = {8000, 16000, 22050, 32000, 44100, 48000};
    rs_state *probe = make(48000, 24000, RS_S16_LE, 1, RS_LEFT, 0.0);
    printf("resampler C tests (kernel: %s)\n", rs_kernel_name(probe));
    rs_destroy(probe);
    for (int i = 0; i < 6; i++) {
        test_chunking(rates[i], 24000, RS_S16_LE, 1, RS_LEFT);
        test_chunking(24000, rates[i], RS_S24_3LE, 2, RS_MIX);
    }
    test_chunking(48000, 24000, RS_S32_LE, 2, RS_RIGHT);
    test_chunking(44100, 48000, RS_S16_LE, 2, RS_MIX);
    for (int i = 0; i < 6; i++) {
        test_quality(rates[i], 24000);
        test_quality(24000, rates[i]);
    }
    test_saturation();
    test_kernels_agree(48000, 24000);
    test_kernels_agree(44100, 24000);
    test_kernels_agree(8000, 24000);
    test_kernels_agree(24000, 44100);
    {
        rs_config bad = {44101, 24000, RS_S16_LE, 1, RS_LEFT, 1, 0, 0.0};
        char err[256] = "";
        CHECK(rs_create(&bad, err, sizeof err) == NULL && strstr(err, "rate ratio"),
              "bad ratio accepted: %s", err);
    }
    if (failures) {
        printf("%d FAILURES\n", failures);
        return 1;
    }
    printf("all C resampler tests passed\n");
    return 0;
}
