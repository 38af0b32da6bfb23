"""Namer / pointer protocols against a local OpenAI-compatible stand-in server (127.0.0.1, a thread)."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch

from patchalign.render import look_at_cameras
from zerokey.data import ShapeSample
from zerokey.mllm.client import BudgetExceeded, CallBudget, ChatClient, ChatError, encode_png_base64
from zerokey.mllm.namers import JSON_NAMER_PROMPT, OpenAINamer
from zerokey.mllm.pointers import OpenAIPointer, build_point_prompt
from zerokey.mllm.testing import FakeChatServer, MolmoStub
from zerokey.views import RenderedViews
from zerokey.writer import config_hash

SIZE = 40


def _shape() -> ShapeSample:
    return ShapeSample("s1", "mem", torch.zeros(3, 3), None, torch.zeros(3), 1.0, category="airplane")


def _views(n_views: int = 3) -> RenderedViews:
    """Views whose grey level encodes the view index, so the stand-in server can tell them apart."""
    images = torch.stack([torch.full((SIZE, SIZE, 3), (v + 1) / 10.0) for v in range(n_views)])
    eyes = torch.tensor([[0.0, 0.0, 3.0], [3.0, 0.0, 0.0], [0.0, 0.0, -3.0], [-3.0, 0.0, 0.0]])[:n_views]
    cameras = look_at_cameras(eyes, image_size=SIZE)
    depth = torch.full((n_views, SIZE, SIZE), float("inf"))
    return RenderedViews(images, cameras, depth, torch.zeros(n_views, SIZE, SIZE, dtype=torch.bool))


def _view_of(request) -> int:
    return int(round(request.images[0][0, 0, 0] / 255.0 * 10)) - 1


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# ------------------------------------------------------------------------------------------ client
def test_client_request_format_and_api_key(monkeypatch):
    monkeypatch.setenv("ZK_TEST_KEY", "sk-test-123")
    image = np.zeros((8, 6, 3), dtype=np.float32)
    image[2, 3] = [1.0, 0.5, 0.0]
    with FakeChatServer(lambda r: "pong") as server:
        client = ChatClient(server.base_url, "my-model", api_key_env="ZK_TEST_KEY", max_tokens=7)
        assert client.complete("ping", [image]) == "pong"
        (request,) = server.requests
    assert request.model == "my-model" and request.text == "ping"
    assert request.headers["authorization"] == "Bearer sk-test-123"
    assert request.body["max_tokens"] == 7 and request.body["temperature"] == 0.0
    # The image made the round trip as a lossless PNG.
    assert request.images[0].shape == (8, 6, 3)
    assert request.images[0][2, 3].tolist() == [255, 128, 0]
    assert request.body["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    # The key is never part of what a run records.
    assert "sk-test-123" not in repr(client.settings()) and "sk-test" not in repr(vars(client))


def test_client_without_key_sends_the_vllm_placeholder(monkeypatch):
    monkeypatch.delenv("ZK_UNSET_KEY", raising=False)
    with FakeChatServer(lambda r: "ok") as server:
        ChatClient(server.base_url, "m", api_key_env="ZK_UNSET_KEY").complete("hi")
        assert server.requests[0].headers["authorization"] == "Bearer EMPTY"


def test_client_retries_then_raises_on_server_errors():
    with FakeChatServer(lambda r: 503) as server:
        client = ChatClient(server.base_url, "m", max_retries=1)
        with pytest.raises(ChatError, match="503"):
            client.complete("hi")
        # the SDK retried once; the client counts one failed call
        assert len(server.requests) == 2 and (client.calls, client.failed_calls) == (1, 1)
    with FakeChatServer(lambda r: 400) as server:  # client errors are not retried
        client = ChatClient(server.base_url, "m", max_retries=2)
        with pytest.raises(ChatError, match="400"):
            client.complete("hi")
        assert len(server.requests) == 1
    with pytest.raises(ChatError, match="cannot reach"):
        ChatClient(_closed_port_url(), "m", max_retries=0, timeout=2).complete("hi")
    with pytest.raises(ValueError, match="http"):
        ChatClient("localhost:8000", "m")


def test_ping_fails_fast_and_clearly_when_the_server_is_down():
    client = ChatClient(_closed_port_url(), "molmo", max_retries=5, timeout=30)
    start = time.perf_counter()
    with pytest.raises(ChatError, match="server check failed for model 'molmo'.*cannot reach"):
        client.ping()
    assert time.perf_counter() - start < 5  # no retries, no backoff
    with FakeChatServer(lambda r: "OK") as server:
        ChatClient(server.base_url, "molmo").ping()
        (request,) = server.requests
        assert request.body["max_tokens"] == 1 and not request.images
    with FakeChatServer(lambda r: 404) as server:
        with pytest.raises(ChatError, match="HTTP 404"):
            ChatClient(server.base_url, "molmo").ping()


def test_call_budget_hand_worked():
    budget = CallBudget(0.02, min_calls=100)
    for _ in range(2):
        budget.record(False, "boom")
    assert not budget.exceeded  # 2 > 0.02 * max(2, 100) = 2 is false
    budget.record(False, "boom")
    assert budget.exceeded and "3 of 3 MLLM calls failed" in budget.reason()
    big = CallBudget(0.02, min_calls=100)
    for i in range(1000):
        big.record(i >= 20)  # 20 failures in 1000 calls: exactly 2 %
    assert not big.exceeded
    big.record(False)
    assert big.exceeded  # 21 > 0.02 * 1001
    assert not CallBudget(1.0).exceeded
    with pytest.raises(ValueError):
        CallBudget(1.5)


def test_spent_budget_stops_calls_without_sending():
    budget = CallBudget(0.0, min_calls=1)
    with FakeChatServer(lambda r: 500) as server:
        client = ChatClient(server.base_url, "m", max_retries=0, budget=budget)
        with pytest.raises(ChatError, match="HTTP 500"):
            client.complete("a")
        assert budget.exceeded
        with pytest.raises(BudgetExceeded, match="1 of 1 MLLM calls failed"):
            client.complete("b")
        assert len(server.requests) == 1


def test_encode_png_rejects_bad_shapes():
    with pytest.raises(ValueError, match="H,W,3"):
        encode_png_base64(np.zeros((4, 4)))


def test_stub_server_is_bounded():
    with FakeChatServer(lambda r: "ok", max_requests=2) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        client = ChatClient(server.base_url, "m", max_retries=0)
        client.complete("1"), client.complete("2")
        with pytest.raises(ChatError, match="503"):
            client.complete("3")
    with FakeChatServer(lambda r: "ok", max_body_bytes=1000) as server:
        with pytest.raises(ChatError, match="413"):
            ChatClient(server.base_url, "m", max_retries=0).complete("x", [np.random.rand(64, 64, 3)])


# ------------------------------------------------------------------------------------------- namer
def test_openai_namer_paper_prompt_and_free_text_answer():
    answer = "Possible salient key points:\n1. **Nose**: front tip\n2. **Left wingtip**\n3. Tail - rear end"
    with FakeChatServer(lambda r: answer) as server:
        namer = OpenAINamer(server.base_url, "gpt-4o", api_key_env=None)
        result = namer(_shape(), _views(4).images)
        (request,) = server.requests
    assert request.text == "List possible salient key points (in text)."  # the paper's prompt
    assert len(request.images) == 4  # n_views=6 capped by the 4 rendered views
    assert result.names == ["Nose", "Left wingtip", "Tail"] and result.instances == [1, 1, 1]
    assert result.calls == 1 and result.error is None
    assert OpenAINamer("http://127.0.0.1:1/v1", "m").select_views(26) == [0, 4, 9, 13, 17, 22]
    fifteen = "\n".join(f"- name {i}" for i in range(15))
    with FakeChatServer(lambda r: fifteen) as server:
        capped = OpenAINamer(server.base_url, "m", api_key_env=None)(_shape(), _views(2).images)
    assert len(capped.names) == 10  # the paper reports 6-10 names per shape


def test_openai_namer_json_prompt_option_keeps_instances():
    answer = 'Sure!\n```json\n["nose of the airplane", "end of the leg", "end of the leg", "tail"]\n```'
    with FakeChatServer(lambda r: answer) as server:
        namer = OpenAINamer(
            server.base_url, "gpt-test", api_key_env=None, prompt=JSON_NAMER_PROMPT, max_names=20
        )
        result = namer(_shape(), _views(4).images)
        (request,) = server.requests
    assert result.names == ["nose of the airplane", "end of the leg", "tail"]
    assert result.instances == [1, 2, 1]
    assert "airplane" in request.text and "JSON list" in request.text and "at most 20" in request.text


def test_openai_namer_without_names_is_an_error_not_an_empty_list():
    with FakeChatServer(lambda r: "I like turtles") as server:
        result = OpenAINamer(server.base_url, "m", api_key_env=None, view_indices=[1])(
            _shape(), _views(3).images
        )
        assert len(server.requests[0].images) == 1
    assert result.names == [] and result.stats.garbage == 1 and "no names" in result.error
    with FakeChatServer(lambda r: "I like turtles") as server:
        namer = OpenAINamer(server.base_url, "m", api_key_env=None, fallback_names=["nose"])
        result = namer(_shape(), _views(3).images)
    assert result.names == ["nose"] and result.error is None and result.stats.garbage == 1
    namer = OpenAINamer(_closed_port_url(), "m", api_key_env=None, max_retries=0, timeout=2)
    result = namer(_shape(), _views(2).images)
    assert result.names == [] and result.stats.failed_calls == 1 and "request failed" in result.error
    with pytest.raises(ValueError, match="out of range"):
        OpenAINamer("http://127.0.0.1:1/v1", "m", view_indices=[7])(_shape(), _views(2).images)


# ----------------------------------------------------------------------------------------- pointer
NAMES = ["nose of the airplane", "tail of the airplane"]


def test_openai_pointer_default_is_one_paper_prompt_per_view_and_name():
    def locate(image, name):
        view = int(round(image[0, 0, 0] / 255.0 * 10)) - 1
        if name == NAMES[0]:
            return [(25.0, 50.0)] if view == 0 else []
        return [(10.0, 10.0), (90.0, 20.0)]  # two instances: one <points> tag ("Counting the ...")

    with FakeChatServer(MolmoStub(locate)) as server:
        points = OpenAIPointer(server.base_url, "molmo", api_key_env=None, max_workers=3)(
            _shape(), NAMES, _views(2)
        )
        prompts = sorted(r.text for r in server.requests)
    assert prompts == sorted([f"Point to the {n} in this image." for n in NAMES] * 2)
    assert build_point_prompt("nose  of the\nairplane") == "Point to the nose of the airplane in this image."
    assert points.calls == 4 and points.error is None
    got = sorted(
        (u, v, int(w), int(n))
        for (u, v), w, n in zip(points.uv.tolist(), points.view, points.name_index, strict=True)
    )
    # percent -> pixels: u = x / 100 * W (W = 40)
    assert got == [
        (4.0, 4.0, 0, 1),
        (4.0, 4.0, 1, 1),
        (10.0, 20.0, 0, 0),
        (36.0, 8.0, 0, 1),
        (36.0, 8.0, 1, 1),
    ]
    s = points.stats
    assert (s.answers, s.points, s.declined, s.garbage) == (4, 5, 1, 0)  # view 1 nose: "There are none."


def test_openai_pointer_counts_refusals_echoes_and_malformed_answers():
    names = ["nose", "tail", "wing", "engine", "door"]
    failures = {
        "tail": "refusal_sorry",
        "wing": "echo",
        "engine": "malformed_coordinate",
        "door": "truncated",
    }
    with FakeChatServer(MolmoStub(lambda image, name: [(50.0, 50.0)], failures=failures)) as server:
        points = OpenAIPointer(server.base_url, "molmo", api_key_env=None)(_shape(), names, _views(1))
    s = points.stats
    assert (s.answers, s.declined, s.garbage, s.malformed) == (5, 1, 2, 2)
    # nose answered; door's truncated <points> keeps its complete first pair; nothing else assigned
    assert sorted(points.name_index.tolist()) == [0, 4] and s.points == 2


def _multi_answer(request) -> str:
    view = _view_of(request)
    if view == 0:
        return (
            '<point x="25" y="50" alt="nose of the airplane">nose of the airplane</point>\n'
            '<points x1="10" y1="10" x2="90" y2="20" alt="2">2</points> '
            '<point x="1" y="1" alt="tail">tail</point>'
        )
    if view == 1:
        return "lorem ipsum <point x=150 y=3>"
    return "There are none."


def test_openai_pointer_all_names_option_matches_labels_exactly():
    with FakeChatServer(_multi_answer) as server:
        pointer = OpenAIPointer(server.base_url, "molmo", api_key_env=None, mode="all_names", max_workers=3)
        points = pointer(_shape(), NAMES, _views(3))
        texts = [r.text for r in server.requests]
    assert len(texts) == 3 and points.calls == 3  # V requests, not V x N
    assert all(all(n in t for n in NAMES) for t in texts)
    got = sorted(
        (u, v, int(w), int(n))
        for (u, v), w, n in zip(points.uv.tolist(), points.view, points.name_index, strict=True)
    )
    assert got == [(4.0, 4.0, 0, 1), (10.0, 20.0, 0, 0), (36.0, 8.0, 0, 1)]  # "2" = the 2nd name
    s = points.stats
    # alt "tail" is not "tail of the airplane": unmatched, not guessed
    assert (s.answers, s.points, s.unmatched, s.garbage, s.declined, s.out_of_range) == (3, 3, 1, 1, 1, 1)


def test_openai_pointer_all_names_echo_is_counted():
    with FakeChatServer(lambda r: r.text) as server:  # a server that echoes the prompt
        points = OpenAIPointer(server.base_url, "m", api_key_env=None, mode="all_names")(
            _shape(), NAMES, _views(2)
        )
    assert len(points) == 0 and points.stats.echoed == 2


def test_openai_pointer_fallback_per_name_and_failed_calls():
    def answer(request):
        if "each of the following" in request.text:
            return "they are all there"  # ignores the label instruction
        return '<point x="10" y="10"></point>'

    with FakeChatServer(answer) as server:
        pointer = OpenAIPointer(
            server.base_url, "m", api_key_env=None, mode="all_names", fallback_per_name=True
        )
        points = pointer(_shape(), NAMES, _views(1))
        assert len(server.requests) == 3
    assert sorted(points.name_index.tolist()) == [0, 1] and points.stats.garbage == 1

    with FakeChatServer(lambda r: 500) as server:
        pointer = OpenAIPointer(server.base_url, "m", api_key_env=None, max_retries=0)
        points = pointer(_shape(), NAMES, _views(2))
    assert len(points) == 0 and points.stats.failed_calls == 4
    assert points.error.startswith("4 of 4 pointer requests failed") and "HTTP 500" in points.error


def test_run_settings_identify_answers_not_plumbing(monkeypatch):
    monkeypatch.setenv("ZK_SECRET", "sk-never-recorded")
    a = OpenAIPointer("http://127.0.0.1:1/v1", "molmo", api_key_env="ZK_SECRET", max_workers=2)
    b = OpenAIPointer("http://10.0.0.5:8000/v1", "molmo", api_key_env="ZK_SECRET", max_workers=16, timeout=5)
    assert a.settings() == b.settings()  # host, pool size, timeout: same answers
    assert "sk-never-recorded" not in repr(a.settings())
    c = OpenAIPointer("http://127.0.0.1:1/v1", "molmo", api_key_env=None, prompt="Where is the {name}?")
    d = OpenAIPointer("http://127.0.0.1:1/v1", "molmo-72b", api_key_env=None)
    assert len({config_hash(p.settings()) for p in (a, c, d)}) == 3
    with pytest.raises(ValueError, match="name"):
        OpenAIPointer("http://127.0.0.1:1/v1", "m", prompt="Point at it.")
