"""The docs stay true to the code: every error type is documented with its own suggestion."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

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


def test_local_model_error_is_in_the_errors_doc() -> None:
    # Not a RequestError (no row fails alone: the local model cannot run at all), so it sits in the
    # table of errors raised before any request.
    text = (DOCS / "errors.md").read_text()
    row = next((line for line in text.splitlines() if line.startswith("| `LocalModelError`")), None)
    assert row is not None, "LocalModelError missing from docs/errors.md"
    assert issubclass(errors.LocalModelError, errors.ConfigurationError) and "ConfigurationError" in row
    assert "SIGILL" in row and "--force-reinstall" in row


# ------------------------------------------------------------------ text and chat completion pages

EXAMPLE = re.compile(r"<!-- example: (\w+) -->\n```python\n(.*?)```", flags=re.DOTALL)


def doc_examples(page: str, server_url: str) -> dict[str, str]:
    """The page's marked examples, pointed at the fake server instead of api.example.com."""
    return {name: source.replace("https://api.example.com/v1", server_url)
            for name, source in EXAMPLE.findall((DOCS / page).read_text())}


def test_completion_pages_list_every_parameter_with_its_default() -> None:
    import inspect

    from gen_ai_frames.client import Client

    pages = {"text-completions.md": (Client.generate_response, Client.agenerate_response),
             "chat-completions.md": (Client.generate_chat_response, Client.agenerate_chat_response)}
    for page, methods in pages.items():
        text = (DOCS / page).read_text()
        for method in methods:
            assert f"`{method.__name__}" in text, (page, method.__name__)
            for name, parameter in inspect.signature(method).parameters.items():
                if name == "self":
                    continue
                empty = parameter.default is inspect.Parameter.empty
                default = "required" if empty else repr(parameter.default)
                assert f"| `{name}` | {default} |" in text, (page, name)


def test_text_completions_examples_run(fake_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code = doc_examples("text-completions.md", fake_server.url)
    assert set(code) == {"text_basic", "text_system", "text_errors", "text_async", "text_legacy"}
    namespace: dict[str, Any] = {}

    exec(code["text_basic"], namespace)  # noqa: S102 - the page's own code
    assert capsys.readouterr().out == "echo: What is the capital of France?\n"

    exec(code["text_system"], namespace)  # noqa: S102
    assert capsys.readouterr().out.startswith("echo: Summarize: the weekly meeting moves")

    exec(code["text_errors"], namespace)  # noqa: S102
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "echo: What is 2+2?"
    assert out[1] == "InvalidPromptError: the prompt is empty or only whitespace" and out[-1] == "None"
    assert namespace["ask"]("[[status=400]] a prompt the server rejects") is None
    out = capsys.readouterr().out
    assert out.startswith("BadRequestError: HTTP 400") and "\nSuggestion: " in out

    exec(code["text_async"], namespace)  # noqa: S102
    assert namespace["answers"] == ["echo: What is 2+2?", "echo: Name a primary color.",
                                    "echo: What is the largest planet?"]
    capsys.readouterr()

    exec(code["text_legacy"], namespace)  # noqa: S102
    # the Completions API answers in choices[0].text: a chat-shaped answer would not parse
    assert capsys.readouterr().out == "echo: Once upon a time\n"
    assert fake_server.stats()["outcome_counts"].get("ok", 0) >= 7


def test_chat_completions_examples_run(fake_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code = doc_examples("chat-completions.md", fake_server.url)
    assert set(code) == {"chat_basic", "chat_conversation", "chat_errors", "chat_async"}
    namespace: dict[str, Any] = {}

    exec(code["chat_basic"], namespace)  # noqa: S102 - the page's own code
    assert capsys.readouterr().out == "echo: What is the capital of France?\n"

    exec(code["chat_conversation"], namespace)  # noqa: S102
    questions = ["What is the capital of France?", "And of Germany?", "Which of the two is larger?"]
    history = namespace["history"]
    assert [m["role"] for m in history] == ["system"] + ["user", "assistant"] * 3
    assert [m["content"] for m in history[2::2]] == ["echo: " + q for q in questions]
    assert capsys.readouterr().out == "".join(f"> {q}\necho: {q}\n" for q in questions)

    exec(code["chat_errors"], namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert out.startswith("Not sent: messages must be a non-empty list") and out.count("\n") == 1
    # a conversation grown past the context window (not retried: no backoff sleeps here)
    assert namespace["chat"]([{"role": "user", "content": "[[context_length]] a long story"}]) is None
    out = capsys.readouterr().out
    assert out.startswith("ContextLengthError: ") and "\nSuggestion: " in out

    exec(code["chat_async"], namespace)  # noqa: S102
    assert namespace["answers"] == ["echo: Translate 'good morning' into French.",
                                    "echo: Translate 'good night' into Spanish."]
