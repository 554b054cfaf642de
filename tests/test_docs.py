"""The docs stay true to the code: every error type is documented with its own suggestion."""

from __future__ import annotations

from pathlib import Path

import gen_ai_frames.errors as errors

DOCS = Path(__file__).resolve().parent.parent / "docs"


def request_error_types() -> list[type[errors.RequestError]]:
    found, todo = [], [errors.RequestError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__ == errors.__name__:
                found.append(sub)
                todo.append(sub)
    return found


def test_every_error_type_is_in_the_errors_table() -> None:
    text = (DOCS / "errors.md").read_text()
    for error_type in request_error_types():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{error_type.__name__}` |")), None)
        assert row is not None, f"{error_type.__name__} missing from docs/errors.md"
        assert error_type.default_suggestion in row, error_type.__name__


def test_batch_processing_doc_lists_every_parameter_with_its_default() -> None:
    import inspect

    from gen_ai_frames.client import Client

    text = (DOCS / "batch-processing.md").read_text()
    for name, parameter in inspect.signature(Client.generate_batch_response).parameters.items():
        if name == "self":
            continue
        default = "required" if parameter.default is inspect.Parameter.empty else repr(parameter.default)
        assert f"| `{name}` | {default} |" in text, name
