"""parley hardware layer: button, LED, ALSA audio and the C resampler."""
