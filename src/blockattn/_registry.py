"""A name -> class registry for a package of one-file plugins (methods, KV policies): classes register
themselves with a decorator when their module is imported; `names()` and `get()` import the package's
modules first, so every plugin is known without an import list to keep in sync."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil


def split_spec(spec, kind: str) -> tuple[str, dict]:
    """`"razor:ratio=0.7,sink=4"` -> `("razor", {"ratio": 0.7, "sink": 4})`: a registered name and its
    parameters (values read as Python literals, else kept as strings). `kind` names the thing in errors."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{kind} spec must be a non-empty string like 'name' or 'name:key=value,...', got {spec!r}")
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{kind} parameter {item!r} in {spec!r} must look like key=value")
        try:
            params[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            params[key.strip()] = value.strip()
    return name.strip(), params


class Registry:
    def __init__(self, kind: str, plural: str, package: str, path, *, internal: tuple[str, ...] = ()):
        self.kind, self.plural, self.package, self.path, self.internal = kind, plural, package, path, internal
        self.classes: dict[str, type] = {}

    def register(self, name: str):
        """Class decorator: `@registry.register("xattention")` makes the class reachable by name."""
        def wrap(cls):
            if name in self.classes and self.classes[name] is not cls:
                raise ValueError(f"{self.kind} name {name!r} is already registered by {self.classes[name].__name__}")
            cls.name = name
            self.classes[name] = cls
            return cls
        return wrap

    def _load_all(self):
        for info in pkgutil.iter_modules(self.path):
            if info.name not in self.internal:
                importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> list[str]:
        self._load_all()
        return sorted(self.classes)

    def without_required(self) -> list[str]:
        """The names whose class constructs from its defaults alone (no `required` parameters, such as a
        trained method's weights file): what a default run, a sweep or a contract test can build."""
        self._load_all()
        return sorted(n for n, cls in self.classes.items() if not getattr(cls, "required", ()))

    def get(self, name: str, **params):
        """An instance of the class registered as `name`, with these hyperparameters (its defaults otherwise)."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a str, got {type(name).__name__}")
        self._load_all()
        if name not in self.classes:
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.plural}: {', '.join(sorted(self.classes))}")
        cls = self.classes[name]
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        unknown = sorted(set(params) - fields)
        if unknown:
            raise TypeError(f"{self.kind} {name!r} does not take {unknown}; its parameters are {sorted(fields)}")
        return cls(**params)
