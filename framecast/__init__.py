"""framecast: Causal Forcing — few-step, frame-wise autoregressive video generation with a KV cache."""

__version__ = "0.1.0"
