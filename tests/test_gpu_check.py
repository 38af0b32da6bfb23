"""The prepared GPU check: its pieces on hand-worked input, and the whole command as a CPU smoke run."""

from __future__ import annotations

import pytest
import torch

from patchalign.tools.bench.gpu import canonical_faces, main


def test_canonical_faces_merges_double_sided_copies() -> None:
    faces = torch.tensor([[0, 1, 2], [2, 1, 0], [1, 2, 3], [3, 1, 2], [0, 2, 3]])
    # 0 and 1 are one triangle (opposite windings), 2 and 3 another, 4 is alone
    assert canonical_faces(faces).tolist() == [0, 0, 2, 2, 4]


@pytest.mark.slow
def test_cpu_smoke_run_of_render_and_zerokey_checks(capsys) -> None:
    assert main(["--cpu-smoke", "--only", "imports", "render", "zerokey"]) == 0
    out = capsys.readouterr().out
    assert "CPU SMOKE RUN" in out and "| render parity   | PASS" in out and "| zerokey         | PASS" in out
