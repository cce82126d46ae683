"""A request may name a LoRA adapter of the served model (``agentkit model serve --lora``) as
its model: agentkit asks the same server for that adapter; /v1/models lists it."""

from __future__ import annotations

import json

from fake_server import completion_body, fake_server, sse_body
from fastapi.testclient import TestClient

from agentkit.llm import OpenAIChatModel
from agentkit.services.api import create_app
from agentkit.settings import Settings

MODELS = {"data": [{"id": "base", "max_model_len": 2048},
                   {"id": "sql", "parent": "base", "max_model_len": 2048}]}  # fmt: skip


def answer(path: str, body: dict | None, number: int) -> tuple[int, dict[str, str], bytes]:
    if path.endswith("/models"):
        return 200, {"Content-Type": "application/json"}, json.dumps(MODELS).encode()
    if body and body.get("stream"):
        return 200, {"Content-Type": "text/event-stream"}, sse_body(["SELECT 1"])
    return 200, {"Content-Type": "application/json"}, completion_body("SELECT 1", body["model"])


def test_a_request_names_an_adapter_as_its_model(tmp_path) -> None:
    with fake_server(answer) as (url, requests):
        model = OpenAIChatModel(url)
        app = create_app(model, settings=Settings(cache_dir=tmp_path))
        with TestClient(app) as client:
            listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
            assert "base" in listed and "sql" in listed
            chat = {"messages": [{"role": "user", "content": "count rows"}], "max_tokens": 8}
            for name in ("sql", "base"):
                done = client.post("/v1/chat/completions", json={**chat, "model": name})
                assert done.status_code == 200, done.text
            streamed = client.post("/v1/chat/completions",
                                   json={**chat, "model": "sql", "stream": True})  # fmt: skip
            assert streamed.status_code == 200 and "SELECT 1" in streamed.text
            missing = client.post("/v1/chat/completions", json={**chat, "model": "nope"})
            assert missing.status_code == 404 and "sql" in missing.json()["error"]["message"]
        asked = [body["model"] for path, body in requests if path.endswith("/completions")]
        assert asked == ["sql", "base", "sql"]
        assert model.model == "base"  # the server's model is unchanged for other requests
