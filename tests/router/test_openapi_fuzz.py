"""Fuzzing the router's OpenAPI schema (schemathesis): no input makes it fail with a 5xx, and every error
body is OpenAI-shaped. Runs against a real router process in front of fake workers."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

ADMIN = "fuzz-admin-token"


@pytest.fixture(scope="module")
def router_url(fake_urls, tmp_path_factory):
    from bench.cluster import LocalCluster

    cluster = LocalCluster.in_front_of(fake_urls)
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    yield cluster.start_router("--admin-token", ADMIN, "--keys-file", str(keys), "--max-output-tokens", "20")
    cluster.close()


@pytest.fixture(scope="module")
def api_schema(router_url):
    return schemathesis.openapi.from_url(f"{router_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_gives_a_5xx_and_errors_are_openai_shaped(case, router_url):
    headers = {"authorization": f"Bearer {ADMIN}"} if case.path.startswith("/admin") else {}
    response = case.call(base_url=router_url, headers=headers, timeout=30)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        if case.path == "/v1/messages" and case.method == "POST":  # Anthropic's shape there
            assert body.get("type") == "error" and set(body["error"]) == {"type", "message"}, (response.status_code, body)
            return
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body


def test_the_schema_documents_the_openai_endpoints(router_url):
    paths = httpx.get(f"{router_url}/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/v1/models",
            "/v1/models/{model_id}", "/tokenize", "/detokenize", "/admin/keys"} <= set(paths)
