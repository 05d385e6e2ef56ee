"""The network (Flax NNX): sharding rules, attention, layers, the LTE layer, the model, KV-cache decoding.

Imports only ``ops``, ``kernels``, ``config`` and ``errors``: no checkpoint, HF, data or training code."""
