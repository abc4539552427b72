"""Integrations with model libraries (Hugging Face transformers: `blockattn.integrations.hf`)."""
