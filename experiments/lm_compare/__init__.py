"""Language-model comparison and speed benchmarks: Transformer++, Titans, Hope-Attention, HOPE (see README.md)."""
