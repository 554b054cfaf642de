"""OpenAI provider: request building and answer/error parsing, without any network."""

from __future__ import annotations

import json

import pytest

from gen_ai_frames import errors
from gen_ai_frames.params import GenerationParams
from gen_ai_frames.providers.openai import OpenAIProvider
from gen_ai_frames.transport import HttpResponse

from .conftest import FAKE_KEY, chat_answer


def provider(api: str = "chat") -> OpenAIProvider:
    return OpenAIProvider(api_key=FAKE_KEY, endpoint="http://127.0.0.1:8000/v1", model_name="m", api=api)


def response(status: int, body: object, headers: dict[str, str] | None = None) -> HttpResponse:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HttpResponse(status, headers or {"content-type": "application/json"}, raw)


def test_chat_request_carries_params_system_prompt_and_key() -> None:
    params = GenerationParams(max_tokens=100, temperature=0.7, top_p=0.9, system_prompt="Be brief.")
    request = provider().build_request([{"role": "user", "content": "Hi"}], params)
    body = json.loads(request.body)
    assert request.method == "POST"
    assert request.url == "http://127.0.0.1:8000/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {FAKE_KEY}"
    assert body == {"model": "m", "max_tokens": 100, "temperature": 0.7, "top_p": 0.9,
                    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    assert FAKE_KEY not in repr(request)


def test_completions_request_flattens_the_prompt() -> None:
    request = provider("completions").build_request([{"role": "user", "content": "Hi"}],
                                                    GenerationParams(system_prompt="Sys"))
    assert request.url.endswith("/v1/completions")
    assert json.loads(request.body)["prompt"] == "Sys\n\nHi"


def test_parse_chat_answer_with_usage() -> None:
    completion = provider().parse_response(response(200, chat_answer("Paris", prompt_tokens=7, completion_tokens=1)))
    assert (completion.text, completion.finish_reason, completion.prompt_tokens, completion.completion_tokens) == (
        "Paris", "stop", 7, 1)


def test_parse_completions_answer() -> None:
    body = {"choices": [{"text": "Paris", "finish_reason": "length"}]}
    completion = provider("completions").parse_response(response(200, body))
    assert (completion.text, completion.finish_reason) == ("Paris", "length")


@pytest.mark.parametrize(
    ("status", "body", "error_type", "retryable", "suggestion_part"),
    [
        (401, {"error": {"message": "Incorrect API key", "code": "invalid_api_key"}}, errors.AuthenticationError,
         False, "OPENAI_API_KEY"),
        (403, {"error": {"message": "no access"}}, errors.PermissionDeniedError, False, "permissions"),
        (404, {"error": {"message": "The model `x` does not exist", "code": "model_not_found"}},
         errors.NotFoundError, False, "model_name"),
        (408, {"error": {"message": "timeout"}}, errors.APIStatusError, True, "timeout"),
        (409, {"error": {"message": "conflict"}}, errors.ConflictError, True, ""),
        (429, {"error": {"message": "Rate limit reached"}}, errors.RateLimitError, True, "max_concurrent"),
        (400, {"error": {"message": "This model's maximum context length is 4097 tokens",
                         "code": "context_length_exceeded"}}, errors.ContextLengthError, False, "max_tokens"),
        (400, {"error": {"message": "bad temperature"}}, errors.BadRequestError, False, "parameters"),
        (500, {"error": {"message": "server error"}}, errors.ServerError, True, "retry later"),
        (502, b"<html>Bad Gateway</html>", errors.ServerError, True, "retry later"),
        (529, {"error": {"message": "overloaded"}}, errors.ServerError, True, "overloaded"),
    ],
)
def test_error_statuses_map_to_types_with_suggestions(status: int, body: object, error_type: type,
                                                      retryable: bool, suggestion_part: str) -> None:
    with pytest.raises(error_type) as caught:
        provider().parse_response(response(status, body))
    error = caught.value
    assert type(error) is error_type
    assert error.status_code == status
    assert error.retryable is retryable
    assert suggestion_part in error.suggestion
    assert str(status) in error.message


def test_html_page_with_200_is_malformed_and_says_so() -> None:
    page = response(200, b"<!DOCTYPE html><html><body>Sign in to the proxy</body></html>",
                    {"content-type": "text/html"})
    with pytest.raises(errors.MalformedResponseError) as caught:
        provider().parse_response(page)
    assert "not JSON" in caught.value.message and "text/html" in caught.value.message
    assert "endpoint" in caught.value.suggestion


@pytest.mark.parametrize("body", [{"id": "x"}, {"choices": []}, {"choices": [{"message": None}]}, [1, 2]])
def test_json_of_the_wrong_shape_is_malformed(body: object) -> None:
    with pytest.raises(errors.MalformedResponseError):
        provider().parse_response(response(200, body))


def test_200_carrying_an_error_object_is_an_error() -> None:
    with pytest.raises(errors.APIStatusError) as caught:
        provider().parse_response(response(200, {"error": {"message": "quota exceeded", "code": 429}}))
    assert isinstance(caught.value, errors.RateLimitError)
    assert "quota exceeded" in caught.value.message


def test_content_filter_is_its_own_error() -> None:
    body = {"choices": [{"message": {"content": None}, "finish_reason": "content_filter"}]}
    with pytest.raises(errors.ContentFilterError) as caught:
        provider().parse_response(response(200, body))
    assert "rephrase" in caught.value.suggestion


def test_repr_hides_key() -> None:
    assert FAKE_KEY not in repr(provider())


# One bad field fails one row (issue 12) ---------------------------------------------------------
def answer(**changes: object) -> dict[str, object]:
    body = chat_answer("Paris")
    choice = body["choices"][0]  # type: ignore[index]
    for name, value in changes.items():
        if name == "usage":
            body["usage"] = value
        elif name in ("content", "refusal"):
            choice["message"][name] = value
        else:
            choice[name] = value
    return body


@pytest.mark.parametrize(("changes", "field"), [
    ({"usage": {"prompt_tokens": "7", "completion_tokens": 1}}, "usage.prompt_tokens is '7' (str)"),
    ({"usage": {"prompt_tokens": 7, "completion_tokens": 3.5}}, "usage.completion_tokens is 3.5 (float)"),
    ({"usage": {"prompt_tokens": -1}}, "usage.prompt_tokens is -1 (int)"),
    ({"usage": {"prompt_tokens": False}}, "usage.prompt_tokens is False (bool)"),
    ({"finish_reason": 1}, "choices[0].finish_reason is 1 (int), not a string"),
    ({"content": 42}, "choices[0].message.content is 42 (int)"),
    ({"content": {"text": "Paris"}}, "choices[0].message.content is {'text': 'Paris'} (dict)"),
    ({"content": [{"type": "text", "text": 7}]}, "choices[0].message.content has a text part whose text"),
])
def test_a_field_of_the_wrong_type_is_malformed_and_named(changes: dict[str, object], field: str) -> None:
    with pytest.raises(errors.MalformedResponseError) as caught:
        provider().parse_response(response(200, answer(**changes)))
    assert field in caught.value.message
    assert "only this row failed" in caught.value.suggestion


@pytest.mark.parametrize("usage", [[1, 2], "12 tokens", 5, None])
def test_usage_that_is_not_an_object_is_ignored(usage: object) -> None:
    completion = provider().parse_response(response(200, answer(usage=usage)))
    assert (completion.text, completion.prompt_tokens, completion.completion_tokens) == ("Paris", None, None)


def test_whole_number_floats_count_as_tokens() -> None:
    completion = provider().parse_response(response(200, answer(usage={"prompt_tokens": 7.0,
                                                                       "completion_tokens": 2})))
    assert (completion.prompt_tokens, completion.completion_tokens) == (7, 2)


def test_content_parts_are_joined_into_text() -> None:
    parts = [{"type": "text", "text": "Par"}, {"type": "image_url", "image_url": {}}, "i", {"text": "s"}]
    assert provider().parse_response(response(200, answer(content=parts))).text == "Paris"


def test_completions_text_that_is_not_text_is_malformed() -> None:
    with pytest.raises(errors.MalformedResponseError, match=r"choices\[0\].text is \{'a': 1\} \(dict\)"):
        body = {"choices": [{"text": {"a": 1}, "finish_reason": "stop"}]}
        provider("completions").parse_response(response(200, body))


def test_a_refusal_is_its_own_error_with_its_words() -> None:
    with pytest.raises(errors.RefusalError) as caught:
        provider().parse_response(response(200, answer(content=None, refusal="I can't help with that.")))
    assert caught.value.message == "the model refused to answer: I can't help with that."
    assert isinstance(caught.value, errors.ContentFilterError) and not caught.value.retryable


@pytest.mark.parametrize("content", [None, ""])
def test_no_text_at_max_tokens_says_to_raise_max_tokens(content: object) -> None:
    with pytest.raises(errors.EmptyAnswerError) as caught:
        provider().parse_response(response(200, answer(content=content, finish_reason="length")))
    assert "raise `max_tokens`" in caught.value.suggestion and "endpoint" not in caught.value.suggestion


def test_an_empty_answer_that_stopped_is_an_answer() -> None:
    assert provider().parse_response(response(200, answer(content=""))).text == ""


# Redirects come back as 3xx answers: the provider says where they pointed -----------------------
@pytest.mark.parametrize(("status", "location", "message"), [
    (302, "https://new.example/v2/chat/completions",
     "HTTP 302: it moved to https://new.example/v2/chat/completions"),
    (307, "https://u:pw-secret@other.example/v1/chat/completions?key=qs-secret",
     "redirecting to another host: https://***@other.example/v1/chat/completions?key=***"),
])
def test_a_redirect_names_where_it_pointed_without_credentials(status: int, location: str,
                                                               message: str) -> None:
    with pytest.raises(errors.RedirectError) as caught:
        provider().parse_response(response(status, b"", {"location": location}))
    assert message in caught.value.message and caught.value.fatal
    assert "pw-secret" not in str(caught.value) and "qs-secret" not in str(caught.value)
    assert "pass endpoint='https://" in caught.value.suggestion


def test_an_endpoint_query_string_is_kept_on_every_request() -> None:
    keyed = OpenAIProvider(api_key=None, endpoint="http://127.0.0.1:8000/v1?key=qs-secret-1", model_name="m")
    request = keyed.build_request([{"role": "user", "content": "Hi"}], GenerationParams())
    assert request.url == "http://127.0.0.1:8000/v1/chat/completions?key=qs-secret-1"
    assert "qs-secret-1" not in repr(keyed) and "qs-secret-1" not in str(keyed.fingerprint())
    assert errors.ServerError("proxy said: bad key qs-secret-1").message == "proxy said: bad key ***"
