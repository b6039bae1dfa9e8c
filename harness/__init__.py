"""What the tests and the benchmarks share: the real service as a subprocess, a protocol client, a fake
OpenRouter and the test speech model. Neither `tests/` nor `bench/` owns it; both import it."""
