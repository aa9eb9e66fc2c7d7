"""Benchmarks: the lifelong (sequential) editing benchmark on CounterFact."""
