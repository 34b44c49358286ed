"""Generation: one decoding engine (engine), its KV cache rows (cache), its traced forwards (trace), sampling, a lone
request and its text (generate), and a server's requests decoded together (batching)."""
