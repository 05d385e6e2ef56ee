"""Pure math on arrays (``jax.numpy``, no Flax): top-K with its STE, quantizers, N:M masks, LTE experts."""
