"""The engine: training primitives over one model (losses, batching, sampling, state)."""
