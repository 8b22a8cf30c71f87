"""Real-model workloads and measurements: the demo and the CPU benchmarks drive the Engine with
a long document request mixed into a stream of short chat requests."""
