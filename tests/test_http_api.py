"""The OpenAI-compatible HTTP API end to end: the real `openai` client against real gateway processes
(python -m http_gateway) in front of the real decoder, planner and Redis of test_services' stack."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from clients.sdk import AsyncClaspClient, ClaspClient
from http_gateway import app as gateway_app
from http_gateway.app import grpc_error
from serving.plan_wire import plan_key
from test_services import REPO, free_port, metric, stack, wait_for  # noqa: F401  (stack: the module's services)

MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Name three rivers in Europe."}]
RAW_PROMPT = "The three largest rivers of Europe are"
API_KEY = "test-api-key-0123456789"


class Gateway:
    def __init__(self, decoder_target: str, log, api_key: str = "") -> None:
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO), "CLASP_API_KEY": api_key}
        self.proc = subprocess.Popen([sys.executable, "-m", "http_gateway", "--host", "127.0.0.1", "--port",
                                      str(self.port), "--decoder", decoder_target], cwd=REPO, env=env,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
        except OSError:
            return 0, {}

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def gateways(stack):  # noqa: F811
    tmp = stack["tmp"]
    open_ = Gateway(stack["target"], tmp / "gateway.log")
    secured = Gateway(stack["target"], tmp / "gateway-auth.log", api_key=API_KEY)
    dead = Gateway(f"127.0.0.1:{free_port()}", tmp / "gateway-dead.log")  # no decoder behind it
    for g in (open_, secured):
        wait_for(lambda: g.get("/health")[0] == 200, 60, "the gateway to report the decoder serving")
    wait_for(lambda: dead.get("/health")[0] == 503, 60, "the gateway without a decoder to answer")
    yield dict(open=open_, secured=secured, dead=dead)
    for g in (open_, secured, dead):
        g.stop()


@pytest.fixture(scope="module")
def grpc_chat(stack):  # noqa: F811
    """The same chat request through gRPC: what the HTTP API must return."""
    with ClaspClient(stack["target"]) as client:
        return client.generate(messages=MESSAGES, max_new_tokens=24)


def test_models_health_and_model_info(stack, gateways):  # noqa: F811
    with ClaspClient(stack["target"]) as client:
        info = client.model_info()

    async def async_info():
        async with AsyncClaspClient(stack["target"]) as client:
            return await client.model_info()

    assert asyncio.run(async_info()) == info
    assert info["model_id"] == MODEL and info["num_layers"] == 30 and info["context_window"] > 1000
    assert info["dtype"] == "float32" and info["device"] == "cpu" and info["draft_kernel"].startswith(("fused", "torch"))
    assert info["identity"].startswith(MODEL + ":30x")
    models = gateways["open"].client().models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].context_window == info["context_window"] and models[0].draft_kernel == info["draft_kernel"]
    assert gateways["open"].client().models.retrieve(MODEL).id == MODEL
    assert gateways["open"].get("/health") == (200, {"status": "ok"})
    cli = subprocess.run([sys.executable, "clients/cli.py", "--target", stack["target"], "--info"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and json.loads(cli.stdout) == info


def test_chat_greedy_equals_grpc_streaming_and_not(gateways, grpc_chat):
    client = gateways["open"].client()
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24)
    choice = out.choices[0]
    assert choice.message.content == grpc_chat.text and choice.message.role == "assistant"
    assert choice.finish_reason == ("length" if grpc_chat.finish_reason == "length" else "stop")
    assert out.usage.completion_tokens == len(grpc_chat.token_ids) == 24
    assert out.usage.prompt_tokens == grpc_chat.num_prompt_tokens
    assert out.usage.total_tokens == out.usage.prompt_tokens + 24
    extra = out.usage.model_extra["speculation"]  # the extension: the decoder's SpeculationStats
    assert extra["num_rounds"] >= 1 and extra["mean_accepted_length"] >= 1.0
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion" and out.model == MODEL

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == grpc_chat.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1


def test_seeded_sampling_equals_grpc(stack, gateways):  # noqa: F811
    with ClaspClient(stack["target"]) as client:
        reference = client.generate(messages=MESSAGES, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=7)
    out = gateways["open"].client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16,
                                                            temperature=0.8, top_p=0.9, seed=7, user="tester")
    assert out.choices[0].message.content == reference.text


def test_completions_and_stop_strings(stack, gateways):  # noqa: F811
    client = gateways["open"].client()
    with ClaspClient(stack["target"]) as grpc_client:
        reference = grpc_client.generate(RAW_PROMPT, raw_prompt=True, max_new_tokens=32)
    full = client.completions.create(model=MODEL, prompt=RAW_PROMPT, max_tokens=32)
    assert full.choices[0].text == reference.text and full.object == "text_completion"
    streamed = client.completions.create(model=MODEL, prompt=RAW_PROMPT, max_tokens=32, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reference.text
    # A stop string from the middle of the greedy text: the output ends just before it.
    stop = next(w for w in reference.text.split()[2:] if reference.text.index(w) > 0)
    expected = reference.text[:reference.text.index(stop)]
    cut = client.completions.create(model=MODEL, prompt=RAW_PROMPT, max_tokens=32, stop=[stop, "\x00never"])
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=RAW_PROMPT, max_tokens=32, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected and chunks[-1].choices[0].finish_reason == "stop"


def test_session_and_speculation_extensions(stack, gateways):  # noqa: F811
    client = gateways["open"].client()
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Explain in detail how a steam engine works."}],
        max_tokens=48, extra_headers={"X-Session-Id": "http-session"},
        extra_body={"speculation": {"mode": "clasp", "num_skip_layers": 6, "replan_interval": 2}})
    spec = out.usage.model_extra["speculation"]
    assert spec["plan_versions"] and spec["mean_skipped_layers"] > 0  # drafted with skipped layers, adopted plans
    wait_for(lambda: stack["client"].get(plan_key("http-session")), 30, "the header's session to get a plan")
    # The field names the session too (and wins over the header).
    client.completions.create(model=MODEL, prompt=RAW_PROMPT, max_tokens=16, extra_headers={"X-Session-Id": "x"},
                              extra_body={"session_id": "http-field", "top_k": 1,
                                          "speculation": {"num_skip_layers": 6, "replan_interval": 2}})
    wait_for(lambda: stack["client"].get(plan_key("http-field")), 30, "the field's session to get a plan")


@pytest.mark.parametrize("kwargs,param", [
    (dict(n=2), "n"),
    (dict(temperature=5.0), "temperature"),
    (dict(logprobs=True), "logprobs"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(extra_body={"tools_choice_x": 1}), "tools_choice_x"),
    (dict(extra_body={"speculation": {"num_skip_layers": 99}}), "speculation.num_skip_layers"),  # decoder's check
    (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
    (dict(stop=["ok", ""]), "stop"),
])
def test_bad_fields_are_400_naming_them(gateways, kwargs, param):
    request = {**dict(model=MODEL, messages=MESSAGES, max_tokens=4), **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        gateways["open"].client().chat.completions.create(**request)
    assert e.value.status_code == 400
    error = e.value.body  # the client unwraps {"error": {...}}
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and param.split(".")[0].split("[")[0] in error["message"]


def test_body_over_the_limit_is_413(gateways):
    """Refused on the declared length, before the body is read (so the client need not send 5 MiB here)."""
    connection = http.client.HTTPConnection("127.0.0.1", gateways["open"].port, timeout=30)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(5 << 20))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()


def test_unknown_model_is_404(gateways):
    with pytest.raises(openai.NotFoundError) as e:
        gateways["open"].client().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_client_disconnect_mid_stream_stops_the_decoder(stack, gateways):  # noqa: F811
    before = metric(stack, "clasp_cancelled_requests_total")
    stream = gateways["open"].client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a long story about a dragon."}], max_tokens=400,
        stream=True)
    received = [c for c, _ in zip(stream, range(3))]
    assert len(received) == 3
    stream.close()
    wait_for(lambda: metric(stack, "clasp_cancelled_requests_total") > before, 30, "the decoder to stop the stream")
    wait_for(lambda: metric(stack, "clasp_active_requests") == 0, 30, "no stream left decoding")
    # Not streamed: a client that times out (and would retry) stops the generation too.
    before = metric(stack, "clasp_cancelled_requests_total")
    with pytest.raises(openai.APITimeoutError):
        gateways["open"].client().with_options(timeout=1.5).completions.create(model=MODEL, prompt=RAW_PROMPT,
                                                                                max_tokens=400)
    wait_for(lambda: metric(stack, "clasp_cancelled_requests_total") > before, 30, "the decoder to stop the request")
    wait_for(lambda: metric(stack, "clasp_active_requests") == 0, 30, "no stream left decoding")


def test_overload_is_429(stack, gateways):  # noqa: F811
    """The stack's decoder decodes 2 streams and queues 2 more (--max-concurrent 2 --max-queue 2)."""
    release, opened, errors = threading.Event(), [], []

    def hold():
        try:
            stream = gateways["open"].client().completions.create(model=MODEL, prompt=RAW_PROMPT, max_tokens=400,
                                                                   stream=True)
            next(iter(stream))
            opened.append(stream)
            release.wait(60)
            stream.close()
        except Exception as e:  # reported below: a thread's exception would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: metric(stack, "clasp_active_requests") == 2 and metric(stack, "clasp_queue_depth") == 2,
                 60, "2 streams decoding and 2 waiting")
        with pytest.raises(openai.RateLimitError) as e:
            gateways["open"].client().completions.create(model=MODEL, prompt=RAW_PROMPT, max_tokens=4)
        assert e.value.status_code == 429 and "busy" in e.value.body["message"]
    finally:
        release.set()
        for t in threads:
            t.join(120)
    assert not errors and len(opened) == 4
    wait_for(lambda: metric(stack, "clasp_active_requests") == 0, 30, "no stream left decoding")


def test_auth_on_and_off(gateways):
    secured = gateways["secured"]
    for key in ("wrong-key", API_KEY[:-1], API_KEY + "x"):
        with pytest.raises(openai.AuthenticationError) as e:
            secured.client(api_key=key).models.list()
        assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
        assert e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):  # checked before the body: no validation details leak
        secured.client(api_key="wrong-key").chat.completions.create(model=MODEL, messages=MESSAGES, n=2)
    status, body = secured.get("/v1/models", headers={})
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}
    assert [m.id for m in secured.client(api_key=API_KEY).models.list().data] == [MODEL]
    out = secured.client(api_key=API_KEY).completions.create(model=MODEL, prompt=RAW_PROMPT, max_tokens=4)
    assert out.usage.completion_tokens == 4
    assert secured.get("/health")[0] == 200  # probes need no key
    assert gateways["open"].client(api_key="anything").models.list().data[0].id == MODEL  # auth off


def test_no_decoder_is_503(gateways):
    dead = gateways["dead"]
    status, body = dead.get("/health")
    assert status == 503 and body["error"]["type"] == "service_unavailable"
    with pytest.raises(openai.InternalServerError) as e:
        dead.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert e.value.status_code == 503 and e.value.body["code"] == "unavailable"


@pytest.mark.parametrize("code,details,status,param", [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy: 2 requests already waiting (max_queue 2)", 429, None),
    (grpc.StatusCode.UNAVAILABLE, "server is shutting down", 503, None),
    (grpc.StatusCode.INVALID_ARGUMENT, "chat.messages[0].role: must not be empty", 400, "messages[0].role"),
    (grpc.StatusCode.INVALID_ARGUMENT, "sampling: top_p must be in (0, 1], got 2", 400, None),
    (grpc.StatusCode.INTERNAL, "internal error: RuntimeError", 500, None),
])
def test_grpc_status_maps_to_http(code, details, status, param):
    error = grpc_error(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details))
    assert (error.status, error.param, error.message) == (status, param, details)
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_the_gateway_sends_the_decoders_token_when_one_is_configured(monkeypatch, tmp_path):
    """HTTP clients authenticate with the API key; the gateway itself with the decoder's bearer token
    (CLASP_AUTH_TOKEN_FILE, else CLASP_AUTH_TOKEN), on every Generate and ModelInfo call."""
    monkeypatch.delenv("CLASP_AUTH_TOKEN_FILE", raising=False)
    monkeypatch.delenv("CLASP_AUTH_TOKEN", raising=False)
    assert gateway_app.Gateway(gateway_app.Settings()).metadata is None
    monkeypatch.setenv("CLASP_AUTH_TOKEN", "t" * 24)
    assert gateway_app.Gateway(gateway_app.Settings()).metadata == (("authorization", "Bearer " + "t" * 24),)
    tokens = tmp_path / "tokens"
    tokens.write_text("# identity:token\ngateway:" + "g" * 24 + "\n")
    monkeypatch.setenv("CLASP_AUTH_TOKEN_FILE", str(tokens))
    assert gateway_app.Gateway(gateway_app.Settings()).metadata == (("authorization", "Bearer " + "g" * 24),)
