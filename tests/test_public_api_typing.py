"""The public API (mla_ref.__all__) is fully annotated: every parameter and return, with type arguments on generics.

mypy --strict over tests/typing/public_api.py (CI step 1) checks that the annotations are
consistent with how the documentation calls the API; mypy does not flag a partly annotated
function there, so this test checks completeness.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import mla_ref

BARE_GENERIC = re.compile(r"\b(tuple|list|dict|set|Mapping|Sequence|Iterable|Callable)\b(?!\[)")


def _public_functions():
    for name in mla_ref.__all__:
        obj = getattr(mla_ref, name)
        if inspect.isclass(obj):
            if issubclass(obj, Exception) or getattr(obj, "_is_protocol", False):
                continue
            for attribute, member in vars(obj).items():
                if attribute.startswith("_") and attribute not in ("__init__", "__call__"):
                    continue
                member = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
                member = member.fget if isinstance(member, property) else member
                generated = dataclasses.is_dataclass(obj) and attribute == "__init__"
                if inspect.isfunction(member) and not generated:
                    yield f"{name}.{attribute}", member
        elif inspect.isfunction(obj):
            yield name, obj


def _public_fields():
    for name in mla_ref.__all__:
        obj = getattr(mla_ref, name)
        if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
            for field in dataclasses.fields(obj):
                yield f"{name}.{field.name}", field.type


def test_every_public_signature_is_annotated():
    missing = []
    for name, function in _public_functions():
        signature = inspect.signature(function)
        missing += [f"{name}({parameter})" for parameter, spec in signature.parameters.items()
                    if spec.annotation is inspect.Parameter.empty and parameter not in ("self", "cls")]
        if signature.return_annotation is inspect.Signature.empty:
            missing.append(f"{name} -> ?")
    assert not missing, f"unannotated: {missing}"


def test_public_annotations_give_their_type_arguments():
    bare = [f"{name}: {annotation}" for name, function in _public_functions()
            for annotation in inspect.get_annotations(function).values() if BARE_GENERIC.search(str(annotation))]
    bare += [f"{name}: {annotation}" for name, annotation in _public_fields() if BARE_GENERIC.search(str(annotation))]
    assert not bare, f"generic without type arguments: {bare}"


def test_the_package_is_typed():
    from importlib import resources
    assert resources.files("mla_ref").joinpath("py.typed").is_file()
