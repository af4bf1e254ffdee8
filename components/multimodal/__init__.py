"""Multimodal bridges onto the frozen causal LM: Flamingo (resampler + gated cross-attention) and PaLM-E."""
