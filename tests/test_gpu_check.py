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


def test_a_check_that_exits_is_a_fail_row_not_the_end_of_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool called inside a check may ``raise SystemExit`` (zerokey's CLI does on a bad option): the
    check is a FAIL row with the code, and the checks after it still run."""
    from patchalign.tools.bench import gpu

    def exits(sz: gpu.Sizes) -> gpu.Row:
        raise SystemExit(2)

    monkeypatch.setattr(gpu, "check_imports", exits)
    monkeypatch.setattr(gpu, "check_encoder", lambda sz: gpu.Row("encoder", "PASS", "stub"))
    rows = gpu.run_checks(gpu.SMOKE, ["imports", "encoder"], budget_s=60)
    assert [(r.check, r.status) for r in rows] == [("imports", "FAIL"), ("encoder", "PASS")]
    assert rows[0].detail == "SystemExit: 2"
