"""Generation: sampling, prefill and decode steps, traced steps, and requests decoded together."""
