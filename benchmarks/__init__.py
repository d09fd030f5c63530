"""Accuracy, speed, memory and compile-cost benchmarks of lrcompile."""
