"""Generation: requests and their streams, the sampler (and token healing of a prompt's end),
the KV cache and the prefix store, the runner that picks the fused CPU step, the row table that
reuses prefixes, and the engine that batches requests continuously, driven by whoever waits or
by a thread of its own."""
