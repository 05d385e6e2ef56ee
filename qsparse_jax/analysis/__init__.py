"""Analysis: the inference-optimal scaling law (fit, optimum, plot) and LTE probes."""
