"""``lmms-quant eval``: arguments it refuses before lmms-eval loads anything."""

from __future__ import annotations

import pytest

from lmms_quant.cli import main


@pytest.mark.parametrize("flag", [["--output_path", "runs/method=uniform,bits_llm=2"], ["--output_path=runs/method=uniform,bits_llm=2"]])
def test_eval_refuses_an_output_path_with_a_comma(flag, capsys, monkeypatch) -> None:
    import lmms_eval.__main__ as lm_main

    def must_not_run() -> None:
        raise AssertionError("lmms-eval ran")

    monkeypatch.setattr(lm_main, "cli_evaluate", must_not_run)
    code = main(["eval", "--model", "quant_vlm", "--model_args", "bits_llm=2", "--tasks", "lq_world_vqa", *flag])
    err = capsys.readouterr().err
    assert code == 2
    assert "--output_path 'runs/method=uniform,bits_llm=2' has a comma" in err
    assert "'runs/method=uniform_bits_llm=2'" in err
