"""Generation: requests and their streams, the sampler, the KV cache and the prefix store, the
runner that picks the fused CPU step, and the engine that batches them continuously."""
