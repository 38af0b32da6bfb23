"""Namer / pointer protocols against a local OpenAI-compatible stand-in server (127.0.0.1, a thread)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from patchalign.render import look_at_cameras
from zerokey.data import ShapeSample
from zerokey.namers import OpenAINamer
from zerokey.openai_client import ChatClient, ChatError, encode_png_base64
from zerokey.pointers import OpenAIPointer, build_point_prompt
from zerokey.testing import FakeChatServer
from zerokey.views import RenderedViews

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


def test_client_without_key_sends_no_auth_header(monkeypatch):
    monkeypatch.delenv("ZK_UNSET_KEY", raising=False)
    with FakeChatServer(lambda r: "ok") as server:
        ChatClient(server.base_url, "m", api_key_env="ZK_UNSET_KEY").complete("hi")
        assert "authorization" not in server.requests[0].headers


def test_client_retries_then_raises_on_server_errors():
    with FakeChatServer(lambda r: 503) as server:
        client = ChatClient(server.base_url, "m", max_retries=2, retry_backoff=0.0)
        with pytest.raises(ChatError, match="503"):
            client.complete("hi")
        assert len(server.requests) == 3 and client.calls == 3
    with FakeChatServer(lambda r: 400) as server:  # client errors are not retried
        client = ChatClient(server.base_url, "m", max_retries=2, retry_backoff=0.0)
        with pytest.raises(ChatError, match="400"):
            client.complete("hi")
        assert len(server.requests) == 1
    with pytest.raises(ChatError, match="cannot reach"):
        ChatClient(_closed_port_url(), "m", max_retries=0, timeout=2).complete("hi")
    with pytest.raises(ValueError, match="http"):
        ChatClient("localhost:8000", "m")


def test_encode_png_rejects_bad_shapes():
    with pytest.raises(ValueError, match="H,W,3"):
        encode_png_base64(np.zeros((4, 4)))


# ------------------------------------------------------------------------------------------- namer
def test_openai_namer_parses_names_and_instances():
    answer = 'Sure!\n```json\n["nose of the airplane", "end of the leg", "end of the leg", "tail"]\n```'
    with FakeChatServer(lambda r: answer) as server:
        namer = OpenAINamer(server.base_url, "gpt-test", api_key_env=None)
        result = namer(_shape(), _views(4).images)
        (request,) = server.requests
    assert result.names == ["nose of the airplane", "end of the leg", "tail"]
    assert result.instances == [1, 2, 1]
    assert result.calls == 1 and result.stats.points == 4 and result.stats.garbage == 0
    assert "airplane" in request.text and "JSON list" in request.text
    assert len(request.images) == 4


def test_openai_namer_garbage_and_failures_are_counted():
    with FakeChatServer(lambda r: "I like turtles") as server:
        namer = OpenAINamer(server.base_url, "m", api_key_env=None, fallback_names=["nose"], view_indices=[1])
        result = namer(_shape(), _views(3).images)
        assert len(server.requests[0].images) == 1
    assert result.names == ["nose"] and result.stats.garbage == 1
    namer = OpenAINamer(_closed_port_url(), "m", api_key_env=None, max_retries=0, timeout=2)
    result = namer(_shape(), _views(2).images)
    assert result.names == [] and result.stats.failed_calls == 1
    with pytest.raises(ValueError, match="out of range"):
        OpenAINamer("http://127.0.0.1:1/v1", "m", view_indices=[7])(_shape(), _views(2).images)


# ----------------------------------------------------------------------------------------- pointer
NAMES = ["nose of the airplane", "tail of the airplane"]


def _multi_answer(request) -> str:
    view = _view_of(request)
    if view == 0:
        return (
            '<point x="25" y="50" alt="nose of the airplane">nose of the airplane</point>\n'
            '<points x1="10" y1="10" x2="90" y2="20" alt="tail">tail</points> '
            '<point x="1" y="1" alt="wing">wing</point>'
        )
    if view == 1:
        return "lorem ipsum <point x=150 y=3>"
    return "There are none."


def test_openai_pointer_one_request_per_view_for_all_names():
    with FakeChatServer(_multi_answer) as server:
        pointer = OpenAIPointer(server.base_url, "molmo", api_key_env=None, max_workers=3)
        points = pointer(_shape(), NAMES, _views(3))
        texts = [r.text for r in server.requests]
    assert len(texts) == 3 and points.calls == 3  # V requests, not V x N
    assert all(all(n in t for n in NAMES) for t in texts)
    order = torch.argsort(points.uv[:, 0])
    got = [
        (u, v, int(w), int(n))
        for (u, v), w, n in zip(
            points.uv[order].tolist(), points.view[order], points.name_index[order], strict=True
        )
    ]
    # percent -> pixels: u = x / 100 * W
    assert got == [(4.0, 4.0, 0, 1), (10.0, 20.0, 0, 0), (36.0, 8.0, 0, 1)]
    s = points.stats
    assert (s.answers, s.points, s.unmatched, s.garbage, s.declined, s.out_of_range) == (3, 3, 1, 1, 1, 1)


def test_openai_pointer_per_name_mode_and_single_name_prompt():
    def answer(request):
        return '<point x="50" y="50" alt="x">x</point>' if "nose" in request.text else "no"

    with FakeChatServer(answer) as server:
        points = OpenAIPointer(server.base_url, "m", api_key_env=None, mode="per_name")(
            _shape(), NAMES, _views(2)
        )
        prompts = sorted(r.text for r in server.requests)
    assert prompts == sorted([build_point_prompt(n) for n in NAMES] * 2)
    assert build_point_prompt("nose  of the\nairplane") == "Point to the nose of the airplane in this image."
    assert points.calls == 4 and len(points) == 2
    assert points.name_index.tolist() == [0, 0] and sorted(points.view.tolist()) == [0, 1]
    assert points.stats.garbage == 2  # "no" is neither a point nor a recognisable refusal


def test_openai_pointer_fallback_per_name_and_failed_calls():
    def answer(request):
        if "each of the following" in request.text:
            return "they are all there"  # ignores the label instruction
        return '<point x="10" y="10"></point>'

    with FakeChatServer(answer) as server:
        pointer = OpenAIPointer(server.base_url, "m", api_key_env=None, fallback_per_name=True)
        points = pointer(_shape(), NAMES, _views(1))
        assert len(server.requests) == 3
    assert sorted(points.name_index.tolist()) == [0, 1] and points.stats.garbage == 1

    with FakeChatServer(lambda r: 500) as server:
        pointer = OpenAIPointer(server.base_url, "m", api_key_env=None, max_retries=0)
        points = pointer(_shape(), NAMES, _views(2))
    assert len(points) == 0 and points.stats.failed_calls == 2
