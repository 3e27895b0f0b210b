"""KV cache: codecs, chunk files, live-cache pool, prefix matching."""
