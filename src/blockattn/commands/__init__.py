"""One module per CLI verb; see `blockattn.cli`."""
