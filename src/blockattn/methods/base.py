"""The shape every dynamic method has: a dataclass of its paper's hyperparameters and one `select`."""
from __future__ import annotations

import dataclasses

from torch import Tensor

from blockattn.layout import BlockLayout, _check_positive_int


@dataclasses.dataclass
class Method:
    """Base class of a block-selection method.

    Subclasses are dataclasses whose fields are the paper's hyperparameters (defaults = the
    paper's defaults), validated in `__post_init__`, and implement `select`.
    """

    name = "method"  # registry name, set by @register

    def select(self, q: Tensor, k: Tensor, **ctx) -> BlockLayout:
        """Return the layout for queries `[B, Hq, Lq, D]` and keys `[B, Hkv, Lk, D]`."""
        raise NotImplementedError

    def check_positive_ints(self, *names: str) -> None:
        """`ValueError` naming the first of these fields that is not a positive int."""
        for name in names:
            _check_positive_int(name, getattr(self, name))

    def params(self) -> dict:
        return dataclasses.asdict(self)
