"""The engine: kernels that compute attention over a BlockLayout. They know layouts, never methods."""
