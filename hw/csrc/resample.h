/*
 * parley streaming resampler - C core (plain C11, no Python dependency).
 *
 * Converts an interleaved PCM stream (S16_LE, S24_3LE or S32_LE, any channel count) to
 * S16_LE mono (or mono duplicated to stereo) at another sample rate, in streaming fashion:
 * every output sample whose inputs are available is emitted by the call that delivers them
 * (no block buffering), partial input frames are kept for the next call, and the output is
 * bit-identical whatever the chunking of the input bytes.
 *
 * Algorithm
 * ---------
 * The rate ratio out/in is reduced to L/M (gcd). A linear-phase low-pass prototype h of
 * length N runs at L*in_rate and is split into L polyphase branches of K taps (K padded to
 * a multiple of 8 with zeros that multiply the oldest samples, so they add no delay).
 * Output n uses branch p = n*M mod L on the K newest inputs up to i0 = floor(n*M/L):
 *     y[n] = sum_j h[p + j*L] * x[i0 - j].
 * The dot product uses 8 lanes accumulated in a fixed order and a fixed final reduction,
 * four outputs per kernel call (independent FMA chains): AVX2+FMA chosen at run time on
 * x86-64, NEON on aarch64, portable C (auto-vectorised SSE) otherwise. No -ffast-math; a
 * given output sample gets the same bits wherever its input sits in the internal buffer,
 * so output never depends on chunking. (Kernels differ from each other by <= 1 LSB.)
 *
 * Filter specification (what "rejection" means here)
 * ---------------------------------------------------
 * Let Nl = min(in_rate, out_rate)/2 be the lower Nyquist frequency.
 *   passband  0 .. 0.9 Nl   flat within +/-0.1 dB (equiripple: +/-0.04 dB; Kaiser: +/-0.001)
 *   stopband  1.1 Nl ..     attenuated >= 90 dB (design 96 dB: the alias of a full-scale
 *                           tone stays below 0.5 LSB, so int16 rounding cannot lift it)
 *   cutoff    Nl (-6 dB)
 * Consequences, and exactly what the benchmark and the tests measure:
 *   - downsampling: an input tone above 1.1 Nl appears in the output (aliased) at least
 *     90 dB down. Tones between Nl and 1.1 Nl alias into 0.9..1.0 Nl only, i.e. outside
 *     the passband (the usual compromise that buys half the filter length and delay).
 *   - upsampling: the images of any input tone below 0.9 Nl (they lie above 1.1 Nl) are at
 *     least 90 dB down; only input content in 0.9..1.0 Nl has images in 1.0..1.1 Nl.
 * The prototype is an equiripple design (Parks-McClellan / Remez exchange, weighted for
 * the 0.04 dB passband vs 96 dB stopband trade, shortest odd length that meets both) when
 * it has at most 801 taps (max(L, M) <= ~19: 48, 32, 16, 8 kHz <-> 24 kHz), otherwise a
 * Kaiser-windowed sinc (44.1 and 22.05 kHz: L = 80..160 branches); the equiripple filter is
 * ~40 % shorter, which is what brings 8 kHz under 3 ms. Group delay is (N-1)/2 prototype
 * samples = (N-1)/(2M) output frames, constant (linear phase); <= 2.5 ms for all of
 * 8/16/22.05/32/44.1/48 kHz <-> 24 kHz (0.83 ms for 48 <-> 24).
 *
 * Measured by tests/test_resample.py, hw/csrc/test_resample.c and bench/resample_bench.py
 * on the int16 output: level of tones up to 0.9 Nl, and every component |k*in +/- f| at or
 * above 1.1 Nl (aliases when downsampling, images when upsampling) at its folded output
 * frequency, >= 90 dB below a full-scale tone.
 *
 * Sample path: input -> channel pick (left/right) or mix (mean of channels 0 and 1) ->
 * float in S16 units (S24 / 256, S32 keeps its 24 most significant bits, / 256 after >> 8)
 * -> optional DC removal (one-pole high-pass, 15 Hz corner, double precision state) ->
 * FIR (gain folded into the taps) -> round to nearest, saturate to [-32768, 32767].
 */
#ifndef PARLEY_RESAMPLE_H
#define PARLEY_RESAMPLE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { RS_S16_LE = 0, RS_S24_3LE = 1, RS_S32_LE = 2 } rs_format;
typedef enum { RS_LEFT = 0, RS_RIGHT = 1, RS_MIX = 2 } rs_channel;

typedef struct {
    long in_rate;
    long out_rate;
    rs_format in_format;
    int in_channels;  /* 1..32 */
    rs_channel channel;
    int out_channels; /* 1 or 2 (2 = mono duplicated) */
    int dc_remove;    /* bool */
    double gain_db;   /* -120 .. +60 */
} rs_config;

/* Limits on the reduced ratio L/M. */
#define RS_MAX_RATE 1536000L
#define RS_MAX_PHASES 4096u
#define RS_MAX_TAPS_PER_PHASE 8192u

#define RS_DC_CORNER_HZ 15.0

typedef struct rs_state rs_state;

/* Creates a resampler; on failure returns NULL and writes a message into err. */
rs_state *rs_create(const rs_config *cfg, char *err, size_t errlen);
void rs_destroy(rs_state *st);
/* Back to the freshly created state (history zeroed, partial frame dropped). */
void rs_reset(rs_state *st);

/* Upper bound of output bytes for in_bytes of input, whatever the state. */
size_t rs_max_output_bytes(const rs_state *st, size_t in_bytes);
/* Exact number of output bytes the next rs_process(in_bytes) will write. */
size_t rs_output_bytes(const rs_state *st, size_t in_bytes);
/* Processes in_bytes of input; out must hold rs_output_bytes(st, in_bytes).
 * Returns the number of bytes written. Never allocates. */
size_t rs_process(rs_state *st, const uint8_t *in, size_t in_bytes, uint8_t *out);
/* Bytes rs_flush will write. */
size_t rs_flush_bytes(const rs_state *st);
/* Writes the filter tail (outputs up to the end of the input signal, pushing zeros
 * through the filter), then resets. Returns the number of bytes written. */
size_t rs_flush(rs_state *st, uint8_t *out);

/* Group delay in output frames, (N-1)/(2M). */
double rs_delay_frames(const rs_state *st);

/* Introspection. */
unsigned rs_phases(const rs_state *st);        /* L */
unsigned rs_decimation(const rs_state *st);    /* M */
unsigned rs_taps_per_phase(const rs_state *st);/* K (padded) */
unsigned rs_filter_length(const rs_state *st); /* N (prototype length) */
int rs_design_kind(const rs_state *st);        /* 0 passthrough, 1 kaiser, 2 remez */
/* Copies the prototype h[0..N) (including gain, DC gain L) into out (if non-NULL). */
unsigned rs_prototype(const rs_state *st, double *out);
size_t rs_in_frame_bytes(const rs_state *st);
size_t rs_out_frame_bytes(const rs_state *st);
const rs_config *rs_config_of(const rs_state *st);
/* "avx2", "neon" or "portable" (env PARLEY_RESAMPLE_KERNEL=portable forces the latter). */
const char *rs_kernel_name(const rs_state *st);

#ifdef __cplusplus
}
#endif
#endif
