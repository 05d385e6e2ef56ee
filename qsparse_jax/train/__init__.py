"""Training: optimizer and schedules, the jitted step, metrics, the loop, ahead-of-time compilation, methods."""
