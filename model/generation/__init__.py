"""Generation: one decoding engine (engine), its traced forwards (trace), sampling, a lone request and its text
(generate), and a server's requests decoded together (batching)."""
