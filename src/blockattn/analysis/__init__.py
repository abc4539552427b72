"""Head-level analysis on a model patched with `blockattn.hf.patch`: observe and edit attention heads.

    with blockattn.analysis.hooks(model) as h:        # hooks.py: the one hook API
        h.record_rows([100, 101])                     # attention rows of these query positions only
        h.ablate({(3, 5): "zero"})                    # layer 3, query head 5 outputs zero
        model(ids)
    h.rows[3][0].probs                                # [B, Hq, 2, Lk]

    scores = blockattn.analysis.retrieval_scores(model, tokenizer)   # retrieval.py: [layers, query heads]

The hook API is imported here (it needs only torch); each tool is one module, loaded on first use.
"""
from __future__ import annotations

import importlib

# imported eagerly: the function `hooks` shares its module's name, and a lazily imported submodule would
# shadow it as an attribute of this package
from blockattn.analysis.hooks import Hooks, Rows, hooks

# public name -> module that defines it, loaded on first use; a new tool adds one line here
_EXPORTS = {
    "retrieval_scores": "retrieval",
    "retrieval_search": "retrieval",
    "RetrievalResult": "retrieval",
    "ICLConfig": "icl_regression",
    "MultiHeadSoftmaxICL": "icl_regression",
    "sample_prompts": "icl_regression",
    "debiased_gd": "icl_regression",
    "kq_ov": "icl_regression",
    "pattern_stats": "icl_regression",
    "softpag_attention": "softpag",
    "perturbed": "softpag",
    "head_hunter": "softpag",
    "guided_logits": "softpag_text",
    "rank_heads": "circuits",
    "find_circuit": "circuits",
    "circuit_overlap": "circuit_reuse",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"blockattn.analysis.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'blockattn.analysis' has no attribute {name!r}")


__all__ = sorted([*_EXPORTS, "Hooks", "Rows", "hooks"])
