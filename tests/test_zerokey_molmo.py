"""MolmoPointer: prompt building, batching, answer parsing and the local-weights loader.

A tiny randomly initialised *real* Molmo cannot be built here: Molmo's model code is remote code
(``modeling_molmo.py`` etc.) that lives only in the hub repo, and tests never touch the hub. So:

* the loader's error messages are tested on directories lacking weights / config / remote code;
* the loader's real code path (``AutoProcessor`` / ``AutoModelForCausalLM`` with ``trust_remote_code``
  from a LOCAL dir, ``local_files_only``) is exercised with a small stand-in written to ``tmp_path``:
  remote-code files that expose Molmo's interface (``processor.process``, ``generate_from_batch``,
  ``-1`` padding, a tokenizer) around a randomly initialised layer whose outputs decide the points;
* MolmoPointer's batching over views, decoding of only the new tokens and parsing run on top of it.
"""

from __future__ import annotations

import json
import math
import re
import textwrap

import pytest
import torch

from patchalign.render import look_at_cameras
from zerokey.data import ShapeSample
from zerokey.mllm.pointers import (
    MolmoPointer,
    MolmoWeightsError,
    build_multi_point_prompt,
    build_point_prompt,
    collate_molmo_inputs,
    load_molmo,
)
from zerokey.views import RenderedViews


def test_prompts():
    assert build_point_prompt("nose of the airplane") == "Point to the nose of the airplane in this image."
    assert build_point_prompt(" leg\tend ", "Where is the {name}?") == "Where is the leg end?"
    multi = build_multi_point_prompt(["nose", "left wing tip"])
    assert '1. "nose"; 2. "left wing tip"' in multi
    assert 'alt="NAME"' in multi and 'alt="nose"' not in multi  # the example names nothing requested
    with pytest.raises(ValueError):
        build_multi_point_prompt([])


def test_collate_pads_right_with_minus_one():
    a = {"input_ids": torch.tensor([5, 6, 7]), "images": torch.ones(2, 4, 3), "image_masks": torch.ones(2, 4)}
    b = {"input_ids": torch.tensor([8]), "images": torch.zeros(1, 4, 3), "image_masks": torch.zeros(1, 4)}
    batch = collate_molmo_inputs([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, -1, -1]]
    assert batch["images"].shape == (2, 2, 4, 3)
    assert torch.equal(batch["images"][1, 1], torch.full((4, 3), -1.0))
    assert batch["image_masks"][1].tolist() == [[0.0] * 4, [-1.0] * 4]
    with pytest.raises(ValueError):
        collate_molmo_inputs([])


def test_loader_errors_name_the_problem(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        MolmoWeightsError, match="(?s)does not exist.*huggingface-cli download allenai/Molmo-7B-D-0924"
    ):
        load_molmo(tmp_path / "nope")
    (tmp_path / "w").mkdir()
    with pytest.raises(MolmoWeightsError, match="no config.json"):
        load_molmo(tmp_path / "w")
    config = {"model_type": "molmo", "auto_map": {"AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM"}}
    (tmp_path / "w" / "config.json").write_text(json.dumps(config))
    with pytest.raises(MolmoWeightsError, match=r"no weight files \(\*\.safetensors"):
        load_molmo(tmp_path / "w")
    (tmp_path / "w" / "model-00001-of-00007.safetensors").write_bytes(b"")
    with pytest.raises(MolmoWeightsError, match=r"remote-code files \['modeling_molmo.py'\]"):
        load_molmo(tmp_path / "w")
    # auto_map naming another repository's code ("repo--module.Class") is refused before transformers
    # would import it from the Hub cache.
    (tmp_path / "w" / "modeling_molmo.py").write_text("")
    foreign = {"AutoModelForCausalLM": "modeling_molmo.M", "AutoConfig": "evil/repo--configuration_x.C"}
    (tmp_path / "w" / "config.json").write_text(json.dumps({"model_type": "molmo", "auto_map": foreign}))
    with pytest.raises(MolmoWeightsError, match="auto_map points at code outside this directory"):
        load_molmo(tmp_path / "w")
    (tmp_path / "w" / "config.json").write_text(json.dumps(config))
    (tmp_path / "w" / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["other/repo--tok.T", None]}})
    )
    with pytest.raises(MolmoWeightsError, match="other/repo--tok.T"):
        load_molmo(tmp_path / "w")
    (tmp_path / "w" / "modeling_molmo.py").unlink()
    (tmp_path / "w" / "tokenizer_config.json").unlink()
    # The pointer loads lazily and surfaces the same error on first use.
    pointer = MolmoPointer(str(tmp_path / "w"))
    views = _views(2)
    with pytest.raises(MolmoWeightsError):
        pointer(_shape(), ["nose"], views)


# ----------------------------------------------------------------- stand-in remote code, Molmo interface
CONFIG_PY = """
from transformers import PretrainedConfig

class TinyPointConfig(PretrainedConfig):
    model_type = "tiny_point_molmo"
    def __init__(self, hidden=8, **kwargs):
        self.hidden = hidden
        super().__init__(**kwargs)
"""

MODELING_PY = """
import torch
from transformers import PreTrainedModel
from .configuration_tiny import TinyPointConfig

class TinyPointForCausalLM(PreTrainedModel):
    config_class = TinyPointConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(3, 2)
        self.calls = []

    def _init_weights(self, module):
        pass

    @torch.no_grad()
    def generate_from_batch(self, batch, generation_config=None, tokenizer=None):
        ids = batch["input_ids"]
        self.calls.append(ids.shape[0])
        valid = batch["images"][:, :, 0, :] != -1                    # (B, crops, 3)
        colour = (batch["images"][:, :, 0, :] * valid).sum(1) / valid.sum(1).clamp_min(1)
        xy = 100 * torch.sigmoid(self.proj(colour.to(self.proj.weight.dtype)))  # random layer -> percent
        rows = []
        for b in range(ids.shape[0]):
            prompt = tokenizer.decode([int(t) for t in ids[b] if t >= 0])
            name = prompt[len("Point to the "):-len(" in this image.")]
            text = f'<point x="{xy[b, 0]:.1f}" y="{xy[b, 1]:.1f}" alt="{name}">{name}</point>'
            rows.append([ord(c) for c in text])
        length = max(map(len, rows))
        new = torch.tensor([r + [0] * (length - len(r)) for r in rows], dtype=ids.dtype)
        return torch.cat([ids, new], dim=1)
"""

PROCESSING_PY = """
import numpy as np
import torch

class CharTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(int(i)) for i in ids if not (skip_special_tokens and int(i) == 0))

class TinyPointProcessor:
    def __init__(self):
        self.tokenizer = CharTokenizer()

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        return cls()

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        pass

    def process(self, images, text):
        pixels = np.asarray(images[0], dtype=np.float32) / 255.0  # PIL image in, like Molmo
        crop = torch.from_numpy(pixels.reshape(-1, 3)[:4])
        return {
            "input_ids": torch.tensor([ord(c) for c in text]),
            "images": crop[None],                                  # (crops=1, patches=4, 3)
            "image_input_idx": torch.zeros(1, 2, dtype=torch.long),
            "image_masks": torch.ones(1, 4),
        }
"""


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_molmo")
    (path / "configuration_tiny.py").write_text(textwrap.dedent(CONFIG_PY))
    (path / "modeling_tiny.py").write_text(textwrap.dedent(MODELING_PY))
    (path / "processing_tiny.py").write_text(textwrap.dedent(PROCESSING_PY))
    # Build the random model from its config through the same remote-code machinery and save it.
    import importlib.util
    import sys

    sys.path.insert(0, str(path))
    try:
        spec = importlib.util.spec_from_file_location("configuration_tiny", path / "configuration_tiny.py")
        cfg_mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cfg_mod)
        sys.modules["configuration_tiny"] = cfg_mod
        src = (
            (path / "modeling_tiny.py")
            .read_text()
            .replace("from .configuration_tiny", "from configuration_tiny")
        )
        namespace: dict = {}
        exec(compile(src, "modeling_tiny", "exec"), namespace)
        torch.manual_seed(0)
        model = namespace["TinyPointForCausalLM"](cfg_mod.TinyPointConfig())
        model.save_pretrained(path)
    finally:
        sys.path.remove(str(path))
        sys.modules.pop("configuration_tiny", None)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_tiny.TinyPointConfig",
        "AutoModelForCausalLM": "modeling_tiny.TinyPointForCausalLM",
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "processor_config.json").write_text(
        json.dumps(
            {
                "processor_class": "TinyPointProcessor",
                "auto_map": {"AutoProcessor": "processing_tiny.TinyPointProcessor"},
            }
        )
    )
    return path


def _shape() -> ShapeSample:
    return ShapeSample("s", "mem", torch.zeros(3, 3), None, torch.zeros(3), 1.0)


def _views(n_views: int, size: int = 32) -> RenderedViews:
    images = torch.stack([torch.full((size, size, 3), (v + 1) / (n_views + 1)) for v in range(n_views)])
    eyes = torch.tensor([[0.0, 0.0, 3.0]]).expand(n_views, 3) + torch.arange(n_views)[:, None] * 0.1
    cams = look_at_cameras(eyes, image_size=size)
    return RenderedViews(
        images, cams, torch.ones(n_views, size, size), torch.ones(n_views, size, size, dtype=torch.bool)
    )


def test_loader_and_pointer_through_local_remote_code(standin_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = load_molmo(standin_dir, "cpu", "float32")
    assert type(model).__name__ == "TinyPointForCausalLM" and not model.training
    assert hasattr(processor, "process")

    names = ["nose of the airplane", "tail"]
    n_views, size, batch = 5, 32, 2
    pointer = MolmoPointer(str(standin_dir), batch_size=batch)
    points = pointer(_shape(), names, _views(n_views, size))
    model = pointer._model
    # Batched over views: ceil(V / batch) generate calls per name, batches of <= batch_size.
    assert points.calls == math.ceil(n_views / batch) * len(names)
    assert model.calls == [2, 2, 1, 2, 2, 1]
    assert len(points) == n_views * len(names) and points.stats.points == n_views * len(names)
    # Independent expectation: the random layer's output for each view colour, percent -> pixels.
    colours = torch.tensor([[(v + 1) / (n_views + 1)] * 3 for v in range(n_views)])
    colours = (colours * 255 + 0.5).floor() / 255  # the uint8 image the processor saw
    expected = 100 * torch.sigmoid(model.proj(colours))
    expected = torch.round(expected * 10) / 10 / 100 * size
    for v in range(n_views):
        for i in range(len(names)):
            sel = (points.view == v) & (points.name_index == i)
            assert torch.allclose(points.uv[sel][0], expected[v], atol=1e-4)


def test_pointer_counts_garbage_from_the_model(standin_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pointer = MolmoPointer(str(standin_dir), batch_size=4)
    pointer._ensure_loaded(torch.device("cpu"))
    real = pointer.generate
    pointer.generate = lambda batch: [re.sub(r'x="[^"]*"', 'x="200"', a) for a in real(batch)]
    points = pointer(_shape(), ["nose"], _views(3))
    assert len(points) == 0 and points.stats.out_of_range == 3 and points.stats.garbage == 3
