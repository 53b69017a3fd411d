"""The OpenAPI document kept in the repository is the one the API serves."""

from __future__ import annotations

import json

import httpx

from finstream.api.app import create_app
from finstream.cli.api import OPENAPI_PATH, openapi_text
from finstream.settings import Settings


async def test_served_document_equals_the_committed_one() -> None:
    committed = OPENAPI_PATH.read_text()
    assert committed == openapi_text(), "api/openapi.json is stale: run `finstream api openapi`"
    app = create_app(Settings())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
        served = await client.get("/openapi.json")
    assert served.status_code == 200
    assert served.json() == json.loads(committed)


def test_every_operation_documents_its_errors_as_problems() -> None:
    doc = json.loads(OPENAPI_PATH.read_text())
    assert "Problem" in doc["components"]["schemas"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                if status.startswith(("4", "5")) and "content" in response:
                    # /readyz answers its checks; the unsubscribe page a person opened, a page.
                    assert "application/problem+json" in response["content"] or (
                        path == "/readyz" or (method == "get" and path == "/v1/unsubscribe/{token}")
                    ), f"{method.upper()} {path} {status} is not a problem document"
            # Provider webhooks (signed) and one-click unsubscribe links (the token is the
            # authority, RFC 8058) take no bearer token.
            if path.startswith("/v1/") and not path.startswith(
                ("/v1/webhooks/", "/v1/unsubscribe/")
            ):
                assert op.get("security") == [{"bearer": []}], f"{method} {path} lacks auth"
                assert "401" in op["responses"], f"{method} {path} does not document 401"
