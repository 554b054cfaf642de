"""The Azure OpenAI dialect: deployments, ``api-version`` and ``api-key``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from ..common import _STATUS_ERRORS, _BadRequest, _json_response
from .openai import _OpenAIDialect

_AZURE_FILTER_RESULTS = {
    name: {"filtered": False, "severity": "safe"} for name in ("hate", "self_harm", "sexual", "violence")
}


class _AzureDialect(_OpenAIDialect):
    """Azure OpenAI: OpenAI bodies, the deployment in the path, ``api-key`` header,
    ``api-version`` query parameter, and a prompt filter that answers 400 ``content_filter``."""

    name = "azure"
    bearer = False

    def credential(self, request: web.Request) -> bytes:
        return request.headers.get("api-key", "").encode()

    def auth_error(self, request: web.Request) -> web.Response:
        return self.error(401, None, None, request)

    def model(self, data: dict[str, Any], request: web.Request) -> Any:
        return request.match_info["deployment"]

    def options(self, data: dict[str, Any], request: web.Request) -> tuple[int, int | None]:
        if not request.query.get("api-version"):
            raise _BadRequest("Resource not found", status=404)
        return super().options(data, request)

    def bad_request(self, exc: _BadRequest) -> web.Response:
        if exc.status == 404:
            return _json_response({"error": {"code": "404", "message": exc.message}}, status=404)
        return super().bad_request(exc)

    def model_not_found(self, model: str) -> web.Response:
        return _json_response(
            {
                "error": {
                    "code": "DeploymentNotFound",
                    "message": "The API deployment for this resource does not exist. If you created the "
                    "deployment within the last 5 minutes, please wait a moment and try again.",
                }
            },
            status=404,
        )

    def error(
        self, status: int, headers: Mapping[str, str] | None, retry_after: float | None, request: web.Request
    ) -> web.Response:
        message = _STATUS_ERRORS.get(status, (f"Error {status} (injected by FakeServer).",))[0]
        if status == 401:
            message = (
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure "
                "to provide a valid key for an active subscription and use a correct regional "
                "API endpoint for your resource."
            )
        elif status == 429:
            version = request.query.get("api-version", "")
            message = (
                f"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version "
                f"{version} have exceeded call rate limit of your current OpenAI S0 pricing tier "
                "(injected by FakeServer)."
            )
        return _json_response(
            {"error": {"code": str(status), "message": message}}, status=status, headers=headers
        )

    def success(
        self,
        model: str,
        prompts: list[str],
        n: int,
        max_tokens: int | None,
        prompt_tokens: int,
        outcome: str,
        seq: int,
    ) -> dict[str, Any] | web.Response:
        if outcome == "content_filter":
            # Azure filters the prompt before the model sees it, and says so with a 400.
            return _json_response(
                {
                    "error": {
                        "message": "The response was filtered due to the prompt triggering Azure OpenAI's "
                        "content management policy. Please modify your prompt and retry.",
                        "type": None,
                        "param": "prompt",
                        "code": "content_filter",
                        "status": 400,
                        "innererror": {
                            "code": "ResponsibleAIPolicyViolation",
                            "content_filter_result": {
                                **_AZURE_FILTER_RESULTS,
                                "violence": {"filtered": True, "severity": "high"},
                            },
                        },
                    }
                },
                status=400,
            )
        body = super().success(model, prompts, n, max_tokens, prompt_tokens, outcome, seq)
        if isinstance(body, dict) and "choices" in body:
            body["prompt_filter_results"] = [
                {"prompt_index": 0, "content_filter_results": _AZURE_FILTER_RESULTS}
            ]
            for choice in body["choices"]:
                choice["content_filter_results"] = _AZURE_FILTER_RESULTS
        return body


_AZURE_CHAT = _AzureDialect(chat=True)
_AZURE_COMPLETIONS = _AzureDialect(chat=False)
