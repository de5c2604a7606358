"""Localization: the first point inside the model (layer, mixer, MLP, logits) where vLLM and the trainer part."""
