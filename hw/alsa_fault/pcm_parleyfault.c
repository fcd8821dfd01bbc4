/*
 * parleyfault: a fake, real-time paced ALSA PCM with fault injection, for parley's
 * hardware-in-the-loop tests (alsa-lib ioplug API).
 *
 * The device keeps time with CLOCK_MONOTONIC: its hardware pointer moves one period at
 * a time, exactly like a DMA engine, and a timerfd that ticks once per period is its poll
 * descriptor.  Playback frames are appended to `file` when the pointer passes them (so
 * the file holds what was "played", never what was dropped); capture frames come from
 * `infile` (raw interleaved frames in the negotiated format, looped at EOF; silence
 * without one).
 *
 * Faults are driven by a small control file (`control`), re-read at every callback that
 * looks at the clock.  Its content is whitespace-separated `key=value` tokens:
 *
 *   mode=ok       normal operation (also: empty or missing file)
 *   mode=stall    the pointer freezes and poll never reports ready: a blocking read or
 *                 write waits forever, exactly like a device whose clock stopped
 *   mode=nodev    the device vanished: the stream goes DISCONNECTED, every call fails
 *                 with -ENODEV ("No such device") and opening fails the same way until
 *                 the mode changes
 *   mode=busy     opening fails with -EBUSY ("Device or resource busy")
 *   xrun=N        each time N grows, the next pointer update reports an xrun (-EPIPE)
 *
 * Config:
 *   pcm_type.parleyfault { lib "/abs/path/libasound_module_pcm_parleyfault.so" }
 *   pcm.fault { type parleyfault control "/path/ctl" file "/path/out.raw"
 *               infile "/path/in.raw" rate 48000 channels 2 format "S32_LE" }
 * rate / channels / format are optional and restrict what the device accepts (like a
 * real I2S codec that offers only one format).
 */

#include <alsa/asoundlib.h>
#include <alsa/pcm_external.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

enum pf_mode { PF_OK = 0, PF_STALL, PF_NODEV, PF_BUSY };

typedef struct {
	snd_pcm_ioplug_t io;
	char *control;
	char *outfile;
	char *infile;
	int out_fd;
	int in_fd;
	int timer_fd;
	enum pf_mode mode;
	long xrun_seen;
	/* stream position, in frames since prepare; never wraps in a test's lifetime */
	uint64_t hw_total;   /* frames the "hardware" consumed / produced */
	uint64_t appl_total; /* frames the application wrote / read */
	uint64_t clock_base; /* hw_total when the clock (re)started */
	struct timespec t0;  /* when the clock (re)started */
	int running;
	unsigned char *ring; /* buffer_size frames */
	size_t frame_bytes;
} parleyfault_t;

static uint64_t ns_since(const struct timespec *t0)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (uint64_t)(now.tv_sec - t0->tv_sec) * 1000000000ULL +
	       (uint64_t)(now.tv_nsec - t0->tv_nsec);
}

/* Read the control file; returns the mode and stores the xrun counter. */
static enum pf_mode read_control(const char *path, long *xrun)
{
	char buf[256];
	enum pf_mode mode = PF_OK;
	int fd;
	ssize_t n;
	char *tok, *save = NULL;

	*xrun = 0;
	if (!path)
		return PF_OK;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return PF_OK;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return PF_OK;
	buf[n] = '\0';
	for (tok = strtok_r(buf, " \t\r\n", &save); tok; tok = strtok_r(NULL, " \t\r\n", &save)) {
		if (!strcmp(tok, "mode=stall"))
			mode = PF_STALL;
		else if (!strcmp(tok, "mode=nodev"))
			mode = PF_NODEV;
		else if (!strcmp(tok, "mode=busy"))
			mode = PF_BUSY;
		else if (!strcmp(tok, "mode=ok"))
			mode = PF_OK;
		else if (!strncmp(tok, "xrun=", 5))
			*xrun = strtol(tok + 5, NULL, 10);
	}
	return mode;
}

static void arm_timer(parleyfault_t *pf, uint64_t first_ns)
{
	struct itimerspec its;
	uint64_t period_ns;

	if (!pf->io.rate || !pf->io.period_size)
		return;
	period_ns = (uint64_t)pf->io.period_size * 1000000000ULL / pf->io.rate;
	its.it_interval.tv_sec = (time_t)(period_ns / 1000000000ULL);
	its.it_interval.tv_nsec = (long)(period_ns % 1000000000ULL);
	if (first_ns == 0)
		first_ns = 1;
	its.it_value.tv_sec = (time_t)(first_ns / 1000000000ULL);
	its.it_value.tv_nsec = (long)(first_ns % 1000000000ULL);
	timerfd_settime(pf->timer_fd, 0, &its, NULL);
}

/* Move frames [from, to) of the ring to the output file (playback). */
static void emit_played(parleyfault_t *pf, uint64_t from, uint64_t to)
{
	snd_pcm_uframes_t bs = pf->io.buffer_size;

	while (from < to && pf->out_fd >= 0) {
		snd_pcm_uframes_t off = (snd_pcm_uframes_t)(from % bs);
		snd_pcm_uframes_t n = bs - off;
		ssize_t w;

		if ((uint64_t)n > to - from)
			n = (snd_pcm_uframes_t)(to - from);
		w = write(pf->out_fd, pf->ring + off * pf->frame_bytes, n * pf->frame_bytes);
		if (w < 0)
			break;
		from += n;
	}
}

/* Fill frames [from, to) of the ring from the input file (capture). */
static void fill_captured(parleyfault_t *pf, uint64_t from, uint64_t to)
{
	snd_pcm_uframes_t bs = pf->io.buffer_size;

	while (from < to) {
		snd_pcm_uframes_t off = (snd_pcm_uframes_t)(from % bs);
		snd_pcm_uframes_t n = bs - off;
		size_t want, got = 0;
		unsigned char *dst = pf->ring + off * pf->frame_bytes;

		if ((uint64_t)n > to - from)
			n = (snd_pcm_uframes_t)(to - from);
		want = n * pf->frame_bytes;
		if (pf->in_fd >= 0) {
			int rewound = 0;
			while (got < want) {
				ssize_t r = read(pf->in_fd, dst + got, want - got);
				if (r > 0) {
					got += (size_t)r;
					rewound = 0;
				} else if (r == 0 && !rewound) {
					lseek(pf->in_fd, 0, SEEK_SET);
					rewound = 1;
				} else {
					break;
				}
			}
		}
		if (got < want)
			memset(dst + got, 0, want - got);
		from += n;
	}
}

static int check_mode(parleyfault_t *pf)
{
	long xrun;

	pf->mode = read_control(pf->control, &xrun);
	if (pf->mode == PF_NODEV) {
		snd_pcm_ioplug_set_state(&pf->io, SND_PCM_STATE_DISCONNECTED);
		return -ENODEV;
	}
	if (xrun > pf->xrun_seen) {
		pf->xrun_seen = xrun;
		return -EPIPE;
	}
	return 0;
}

/* Advance the hardware position according to the clock; returns 0 or -errno. */
static int advance(parleyfault_t *pf)
{
	uint64_t target, ps = pf->io.period_size;
	int err = check_mode(pf);

	if (err < 0)
		return err;
	if (!pf->running)
		return 0;
	if (pf->mode == PF_STALL) {
		/* the clock stopped: freeze the position, restart the clock from here later */
		pf->clock_base = pf->hw_total;
		clock_gettime(CLOCK_MONOTONIC, &pf->t0);
		return 0;
	}
	target = pf->clock_base + ns_since(&pf->t0) * pf->io.rate / 1000000000ULL / ps * ps;
	if (target <= pf->hw_total)
		return 0;
	if (pf->io.stream == SND_PCM_STREAM_PLAYBACK) {
		if (target >= pf->appl_total) {
			/* underrun: what was queued has been played, then the device ran dry */
			emit_played(pf, pf->hw_total, pf->appl_total);
			pf->hw_total = pf->appl_total;
			return -EPIPE;
		}
		emit_played(pf, pf->hw_total, target);
	} else {
		if (target - pf->appl_total >= pf->io.buffer_size)
			return -EPIPE; /* overrun: the application did not read in time */
		fill_captured(pf, pf->hw_total, target);
	}
	pf->hw_total = target;
	return 0;
}

static snd_pcm_sframes_t pf_pointer(snd_pcm_ioplug_t *io)
{
	parleyfault_t *pf = io->private_data;
	int err = advance(pf);

	/* -ENODEV: check_mode() already moved the stream to DISCONNECTED; a negative
	 * return here would be turned into an xrun by ioplug, so report no progress. */
	if (err < 0 && err != -ENODEV)
		return err;
	return (snd_pcm_sframes_t)(pf->hw_total % io->buffer_size);
}

static snd_pcm_sframes_t pf_transfer(snd_pcm_ioplug_t *io, const snd_pcm_channel_area_t *areas,
				     snd_pcm_uframes_t offset, snd_pcm_uframes_t size)
{
	parleyfault_t *pf = io->private_data;
	snd_pcm_uframes_t done = 0;

	if (pf->mode == PF_NODEV)
		return -ENODEV;
	/* interleaved access: area 0 holds the whole frame */
	while (done < size) {
		snd_pcm_uframes_t pos = (snd_pcm_uframes_t)((pf->appl_total + done) % io->buffer_size);
		snd_pcm_uframes_t n = io->buffer_size - pos;
		unsigned char *buf = (unsigned char *)areas[0].addr + areas[0].first / 8 +
				     (offset + done) * (areas[0].step / 8);

		if (n > size - done)
			n = size - done;
		if (io->stream == SND_PCM_STREAM_PLAYBACK)
			memcpy(pf->ring + pos * pf->frame_bytes, buf, n * pf->frame_bytes);
		else
			memcpy(buf, pf->ring + pos * pf->frame_bytes, n * pf->frame_bytes);
		done += n;
	}
	pf->appl_total += size;
	return (snd_pcm_sframes_t)size;
}

static int pf_start(snd_pcm_ioplug_t *io)
{
	parleyfault_t *pf = io->private_data;
	uint64_t period_ns = (uint64_t)io->period_size * 1000000000ULL / io->rate;

	if (pf->mode == PF_NODEV)
		return -ENODEV;
	clock_gettime(CLOCK_MONOTONIC, &pf->t0);
	pf->clock_base = pf->hw_total;
	pf->running = 1;
	arm_timer(pf, period_ns);
	return 0;
}

static int pf_stop(snd_pcm_ioplug_t *io)
{
	parleyfault_t *pf = io->private_data;

	pf->running = 0;
	return 0;
}

static int pf_prepare(snd_pcm_ioplug_t *io)
{
	parleyfault_t *pf = io->private_data;
	long xrun;

	if (read_control(pf->control, &xrun) == PF_NODEV)
		return -ENODEV;
	pf->hw_total = 0;
	pf->appl_total = 0;
	pf->running = 0;
	/* playback may be written at once; capture wakes only once running */
	arm_timer(pf, 1);
	return 0;
}

static int pf_hw_params(snd_pcm_ioplug_t *io, snd_pcm_hw_params_t *params)
{
	parleyfault_t *pf = io->private_data;
	size_t bytes;

	(void)params;
	pf->frame_bytes = (size_t)snd_pcm_format_physical_width(io->format) / 8 * io->channels;
	bytes = io->buffer_size * pf->frame_bytes;
	free(pf->ring);
	pf->ring = calloc(1, bytes);
	return pf->ring ? 0 : -ENOMEM;
}

static int pf_poll_revents(snd_pcm_ioplug_t *io, struct pollfd *pfd, unsigned int nfds,
			   unsigned short *revents)
{
	parleyfault_t *pf = io->private_data;
	uint64_t ticks;
	int err;

	(void)nfds;
	*revents = 0;
	if (pfd[0].revents & POLLIN) {
		if (read(pf->timer_fd, &ticks, sizeof(ticks)) < 0) {
			/* nothing pending: a spurious wake-up */
		}
	}
	err = advance(pf);
	if (err == -ENODEV) {
		*revents = POLLERR | POLLHUP;
		return 0;
	}
	if (err == -EPIPE) {
		snd_pcm_ioplug_set_state(io, SND_PCM_STATE_XRUN);
		*revents = io->stream == SND_PCM_STREAM_PLAYBACK ? POLLOUT : POLLIN;
		*revents |= POLLERR;
		return 0;
	}
	if (pf->mode == PF_STALL)
		return 0;
	if (io->stream == SND_PCM_STREAM_PLAYBACK) {
		if (pf->appl_total - pf->hw_total < io->buffer_size)
			*revents = POLLOUT;
	} else if (pf->running && pf->hw_total > pf->appl_total) {
		*revents = POLLIN;
	}
	return 0;
}

/* Everything the plugin owns; also the open path's cleanup (fds start at -1). */
static void pf_free(parleyfault_t *pf)
{
	if (pf->out_fd >= 0)
		close(pf->out_fd);
	if (pf->in_fd >= 0)
		close(pf->in_fd);
	if (pf->timer_fd >= 0)
		close(pf->timer_fd);
	free(pf->ring);
	free(pf->control);
	free(pf->outfile);
	free(pf->infile);
	free(pf);
}

static int pf_close(snd_pcm_ioplug_t *io)
{
	pf_free(io->private_data);
	return 0;
}

static const snd_pcm_ioplug_callback_t pf_callback = {
	.start = pf_start,
	.stop = pf_stop,
	.pointer = pf_pointer,
	.transfer = pf_transfer,
	.close = pf_close,
	.hw_params = pf_hw_params,
	.prepare = pf_prepare,
	.poll_revents = pf_poll_revents,
};

static int set_constraints(parleyfault_t *pf, long rate, long channels, snd_pcm_format_t format)
{
	static const unsigned int access[] = { SND_PCM_ACCESS_RW_INTERLEAVED };
	static const unsigned int all_formats[] = { SND_PCM_FORMAT_S16_LE, SND_PCM_FORMAT_S24_3LE,
						    SND_PCM_FORMAT_S32_LE };
	unsigned int one_format[1];
	int err;

	err = snd_pcm_ioplug_set_param_list(&pf->io, SND_PCM_IOPLUG_HW_ACCESS, 1, access);
	if (err < 0)
		return err;
	if (format != SND_PCM_FORMAT_UNKNOWN) {
		one_format[0] = (unsigned int)format;
		err = snd_pcm_ioplug_set_param_list(&pf->io, SND_PCM_IOPLUG_HW_FORMAT, 1, one_format);
	} else {
		err = snd_pcm_ioplug_set_param_list(&pf->io, SND_PCM_IOPLUG_HW_FORMAT, 3, all_formats);
	}
	if (err < 0)
		return err;
	err = snd_pcm_ioplug_set_param_minmax(&pf->io, SND_PCM_IOPLUG_HW_CHANNELS,
					      channels > 0 ? (unsigned int)channels : 1,
					      channels > 0 ? (unsigned int)channels : 2);
	if (err < 0)
		return err;
	err = snd_pcm_ioplug_set_param_minmax(&pf->io, SND_PCM_IOPLUG_HW_RATE,
					      rate > 0 ? (unsigned int)rate : 8000,
					      rate > 0 ? (unsigned int)rate : 192000);
	if (err < 0)
		return err;
	err = snd_pcm_ioplug_set_param_minmax(&pf->io, SND_PCM_IOPLUG_HW_PERIOD_BYTES, 64,
					      1024 * 1024);
	if (err < 0)
		return err;
	return snd_pcm_ioplug_set_param_minmax(&pf->io, SND_PCM_IOPLUG_HW_PERIODS, 2, 1024);
}

static int get_string(snd_config_t *n, const char *id, char **out)
{
	const char *s;

	if (snd_config_get_string(n, &s) < 0) {
		SNDERR("parleyfault: %s must be a string", id);
		return -EINVAL;
	}
	*out = strdup(s);
	return *out ? 0 : -ENOMEM;
}

SND_PCM_PLUGIN_DEFINE_FUNC(parleyfault)
{
	snd_config_iterator_t i, next;
	parleyfault_t *pf;
	long rate = 0, channels = 0, xrun;
	snd_pcm_format_t format = SND_PCM_FORMAT_UNKNOWN;
	int err;

	(void)root;
	pf = calloc(1, sizeof(*pf));
	if (!pf)
		return -ENOMEM;
	pf->out_fd = pf->in_fd = pf->timer_fd = -1;

	snd_config_for_each(i, next, conf) {
		snd_config_t *n = snd_config_iterator_entry(i);
		const char *id;

		if (snd_config_get_id(n, &id) < 0)
			continue;
		if (!strcmp(id, "comment") || !strcmp(id, "type") || !strcmp(id, "hint"))
			continue;
		if (!strcmp(id, "control"))
			err = get_string(n, id, &pf->control);
		else if (!strcmp(id, "file"))
			err = get_string(n, id, &pf->outfile);
		else if (!strcmp(id, "infile"))
			err = get_string(n, id, &pf->infile);
		else if (!strcmp(id, "rate"))
			err = snd_config_get_integer(n, &rate);
		else if (!strcmp(id, "channels"))
			err = snd_config_get_integer(n, &channels);
		else if (!strcmp(id, "format")) {
			const char *s;
			err = snd_config_get_string(n, &s);
			if (err >= 0) {
				format = snd_pcm_format_value(s);
				if (format == SND_PCM_FORMAT_UNKNOWN)
					err = -EINVAL;
			}
		} else {
			SNDERR("parleyfault: unknown field %s", id);
			err = -EINVAL;
		}
		if (err < 0)
			goto fail;
	}

	switch (read_control(pf->control, &xrun)) {
	case PF_NODEV:
		err = -ENODEV;
		goto fail;
	case PF_BUSY:
		err = -EBUSY;
		goto fail;
	default:
		break;
	}
	pf->xrun_seen = xrun; /* only later increments inject an xrun */

	if (stream == SND_PCM_STREAM_PLAYBACK && pf->outfile) {
		pf->out_fd = open(pf->outfile, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
		if (pf->out_fd < 0) {
			err = -errno;
			SNDERR("parleyfault: cannot open %s", pf->outfile);
			goto fail;
		}
	}
	if (stream == SND_PCM_STREAM_CAPTURE && pf->infile) {
		pf->in_fd = open(pf->infile, O_RDONLY | O_CLOEXEC);
		if (pf->in_fd < 0) {
			err = -errno;
			SNDERR("parleyfault: cannot open %s", pf->infile);
			goto fail;
		}
	}
	pf->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	if (pf->timer_fd < 0) {
		err = -errno;
		goto fail;
	}

	pf->io.version = SND_PCM_IOPLUG_VERSION;
	pf->io.name = "parley fault-injecting fake PCM";
	pf->io.flags = SND_PCM_IOPLUG_FLAG_MONOTONIC;
	pf->io.mmap_rw = 0;
	pf->io.callback = &pf_callback;
	pf->io.private_data = pf;
	pf->io.poll_fd = pf->timer_fd;
	pf->io.poll_events = POLLIN;

	err = snd_pcm_ioplug_create(&pf->io, name, stream, mode);
	if (err < 0)
		goto fail;
	err = set_constraints(pf, rate, channels, format);
	if (err < 0) {
		snd_pcm_ioplug_delete(&pf->io);
		return err;
	}
	*pcmp = pf->io.pcm;
	return 0;

fail:
	pf_free(pf);
	return err;
}

SND_PCM_PLUGIN_SYMBOL(parleyfault);
