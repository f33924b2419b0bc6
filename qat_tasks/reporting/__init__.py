"""What a quarterly run reports: the GPU memory budget of the whole stack, and the run's summary."""
