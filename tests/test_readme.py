"""The README's batch-processing examples, run as written against the loopback fake server."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def examples() -> dict[str, str]:
    text = README.read_text()
    return dict(re.findall(r"<!-- example: (\w+) -->\n```python\n(.*?)```", text, flags=re.DOTALL))


def test_readme_has_the_three_original_examples() -> None:
    found = examples()
    assert set(found) == {"basic", "errors", "concurrent"}
    assert "from gen_ai_frames.factory import create_client" in found["basic"]
    assert "error['message']" in found["errors"] and "error['suggestion']" in found["errors"]
    assert "max_concurrent=3" in found["concurrent"]


def test_readme_examples_run(fake_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, Any] = {}
    code = {name: source.replace("https://api.example.com/v1", fake_server.url) for name, source in examples().items()}

    exec(code["basic"], namespace)  # noqa: S102 - the README's own code
    out = capsys.readouterr().out
    assert "Response: echo: What is the capital of France?" in out
    assert namespace["responses"] == ["echo: " + p for p in namespace["prompts"]]

    namespace["prompts"] = namespace["prompts"] + ["[[status=400]] a prompt the server rejects"]
    exec(code["errors"], namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "Response: echo: List 3 benefits of cloud computing." in out
    assert "Prompt 4:\nError: HTTP 400" in out and "Suggestion: " in out

    fake_server.reset()
    fake_server.configure(latency=0.05)
    namespace["prompts"] = [f"question {i}" for i in range(10)]
    exec(code["concurrent"], namespace)  # noqa: S102
    assert namespace["responses"] == [f"echo: question {i}" for i in range(10)]
    assert fake_server.stats()["max_in_flight"] == 3
