"""The browser app (patchalign.tools.app): callbacks, a gradio_client round trip, and a real browser.

The browser test drives Debian's headless Chromium through Selenium and chromedriver (no browser
download); it skips, saying why, where either is missing. All servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio", reason="the app extra (pip install -e '.[app]') is not installed")
pytest.importorskip("sentence_transformers")

from patchalign.model import EncoderConfig, PatchAlignEncoder  # noqa: E402
from patchalign.pretrained import PretrainedPatchAlign  # noqa: E402
from patchalign.tools.app import SegmentApp, build_app  # noqa: E402
from patchalign.tools.segment import InputError  # noqa: E402

NAMES = ["spout", "lid", "body", "handle"]


@pytest.fixture(scope="module")
def model() -> PretrainedPatchAlign:
    torch.manual_seed(0)
    enc = PatchAlignEncoder(EncoderConfig.tiny(head_dim=384)).eval()
    return PretrainedPatchAlign(enc, {"text_encoder": "demo", "logit": {"form": "scale", "scale": 10.0}})


@pytest.fixture(scope="module")
def teapot(shared_data_module: Path) -> Path:
    return shared_data_module / "meshes" / "teapot.obj"


@pytest.fixture(scope="module")
def shared_data_module() -> Path:
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(model: PretrainedPatchAlign, teapot: Path, tmp_path_factory: pytest.TempPathFactory):
    page = build_app(model, [teapot], work_dir=tmp_path_factory.mktemp("app"))
    port = _free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", page
    finally:
        page.close()


def _face_count(path: Path) -> int:
    import trimesh

    return len(trimesh.load(path, process=False, force="mesh").faces)


def test_callback_returns_viewer_glb_legend_pca_and_downloads(model, teapot, tmp_path):
    import trimesh

    app = SegmentApp(model, tmp_path)
    view, legend, pca, downloads = app.segment(str(teapot), ", ".join(NAMES), 2)
    glb = trimesh.load(view)
    assert glb.metadata["patchalign"]["votes"] == 2
    assert sum(len(g.faces) for g in glb.geometry.values()) == _face_count(teapot)
    for name in NAMES:
        assert f"<td>{name}</td>" in legend
    shares = [float(s.split(">")[-1]) for s in legend.split(" %</td>")[:-1]]
    assert sum(shares) == pytest.approx(100.0, abs=0.3)  # shares of the surface add up
    assert Path(pca).stat().st_size > 0
    assert [Path(d).name for d in downloads] == ["segmented.glb", "labels.npz", "teapot_parts.zip"]


def test_keypoints_tab_finds_one_peak_per_name_on_the_shape(model, teapot, tmp_path):
    """A keypoint per name, each a point of the teapot's surface, in the table and as a sphere."""
    import trimesh

    app = SegmentApp(model, tmp_path)
    glb, table = app.keypoints(str(teapot), "spout, lid", 2)
    assert table.count("<tr><td>spout</td>") == 2 and table.count("<tr><td>lid</td>") == 2
    scene = trimesh.load(glb)
    assert len(scene.geometry) == 1 + 4  # the shape and one sphere per keypoint
    from patchalign.geometry import sample_surface

    mesh = trimesh.load(teapot, force="mesh", process=False)
    surface = sample_surface(torch.tensor(mesh.vertices), torch.tensor(mesh.faces), 2048, seed=0).points
    for row in table.split("<tr><td>")[2:]:  # each keypoint is one of the 2048 surface points the model saw
        xyz = torch.tensor([float(c) for c in row.split("</td><td>")[1].split(",")])
        assert float((surface - xyz).norm(dim=1).min()) < 1e-3
    with pytest.raises(InputError, match="names no part"):
        app.keypoints(str(teapot), " ", 1)


def test_keypoints_tab_runs_zerokey_through_a_configured_pointer_server(model, teapot, tmp_path):
    """With a pointer server (here the local Molmo-like stub on 127.0.0.1), the tab runs ZeroKey: 6 views
    x 2 names pointing calls, one keypoint per name on the shape; without one, one clear message."""
    import trimesh

    from zerokey.mllm.namers import StaticNamer
    from zerokey.mllm.pointers import OpenAIPointer
    from zerokey.mllm.testing import FakeChatServer, MolmoStub
    from zerokey.pipeline import ZeroKeyPipeline
    from zerokey.views import ViewConfig

    with pytest.raises(InputError, match="--pointer_url"):
        SegmentApp(model, tmp_path / "a").keypoints(str(teapot), "spout", 1, "zerokey")
    with FakeChatServer(MolmoStub(lambda image, name: [(50.0, 50.0)])) as server:
        pointer = OpenAIPointer(server.base_url, "stub", api_key_env=None)
        pointer.check()
        pipeline = ZeroKeyPipeline(StaticNamer([]), pointer, views=ViewConfig(n_views=6, image_size=128))
        glb, table = SegmentApp(model, tmp_path / "b", zerokey=pipeline).keypoints(
            str(teapot), "spout, lid", 1, "zerokey"
        )
        asked = [r.text for r in server.requests if r.images]
    assert len(asked) == 6 * 2 and sum("spout" in a for a in asked) == 6
    assert table.count("<tr><td>spout</td>") == 1 and table.count("<tr><td>lid</td>") == 1
    mesh = trimesh.load(teapot, force="mesh", process=False)
    lo, hi = mesh.bounds
    for row in table.split("<tr><td>")[2:]:
        xyz = np.array([float(c) for c in row.split("</td><td>")[1].split(",")])
        assert ((xyz >= lo - 1e-3) & (xyz <= hi + 1e-3)).all()  # lifted onto the shape, input frame
    assert len(trimesh.load(glb).geometry) == 1 + 2


@pytest.mark.parametrize(
    ("content", "parts", "message"),
    [
        (None, "a, b", "upload a mesh or point cloud first"),
        ("", "a, b", "empty file"),
        ("nan nan nan\n" * 40, "a", "non-finite"),
        ("0 0 0\n" * 5, "a", "too few points: 5"),
        ("0 0 1\n1 0 0\n0 1 0\n" * 20, " , ", "names no part"),
    ],
)
def test_callback_errors_are_one_message(model, tmp_path, content, parts, message):
    path = None
    if content is not None:
        path = tmp_path / "in.xyz"
        path.write_text(content)
    with pytest.raises(InputError, match=message):
        SegmentApp(model, tmp_path / "w").segment(None if path is None else str(path), parts, 1)


def test_gradio_client_round_trip(served, teapot, tmp_path):
    from gradio_client import Client, handle_file

    url, _ = served
    client = Client(url, verbose=False, download_files=str(tmp_path))
    view, legend, _, downloads = client.predict(
        handle_file(str(teapot)), "spout, lid", 1, api_name="/segment"
    )
    assert _face_count(Path(view)) == _face_count(teapot)
    assert "<td>spout</td>" in legend and "<td>lid</td>" in legend
    labels = np.load([d for d in downloads if d.endswith("labels.npz")][0])
    assert labels["face_labels"].shape == (_face_count(teapot),)
    with pytest.raises(Exception, match="names no part"):
        client.predict(handle_file(str(teapot)), "   ", 1, api_name="/segment")


def _chrome():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip(
            "Debian's chromium + chromium-driver are not installed (apt-get install chromium chromium-driver)"
        )
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--disable-dev-shm-usage",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.mark.slow
def test_in_a_real_browser(served, teapot, tmp_path):
    """Upload the shared teapot, name parts, run; the page shows the legend and the 3D view."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = served
    browser = _chrome()
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
        assert "PatchAlign3D" in browser.title
        browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(teapot))
        wait.until(lambda b: "teapot.obj" in b.page_source)
        box = browser.find_element(By.CSS_SELECTOR, "textarea, input[data-testid=textbox]")
        box.send_keys(", ".join(NAMES))
        browser.find_element(By.ID, "segment-button").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#legend table.patchalign-legend")))
        legend = browser.find_element(By.ID, "legend").text
        for name in NAMES:
            assert name in legend
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#segmented-view canvas")))
        downloads = browser.find_element(By.ID, "downloads")
        wait.until(lambda b: "labels" in downloads.get_attribute("innerHTML"))
        time.sleep(3)  # let the viewer draw a frame before the screenshot
        view = np.asarray(
            Image.open(io.BytesIO(browser.find_element(By.ID, "segmented-view").screenshot_as_png))
        )
        assert view[..., :3].std() > 5, "the 3D viewer drew nothing"
        shot = Path(os.environ.get("PATCHALIGN_APP_SCREENSHOT", tmp_path / "app.png"))
        assert browser.save_screenshot(str(shot))
    finally:
        browser.quit()

    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert img.shape[0] >= 800 and img.std() > 10  # a real page, not a blank frame
