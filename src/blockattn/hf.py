"""`blockattn.hf`: alias of `blockattn.integrations.hf` (transformers attention function, `patch`, `unpatch`)."""
from blockattn.integrations.hf import (NAME, Patch, Plan, Stats, attention_forward, attention_modules,  # noqa: F401
                                       patch, register, unpatch)
