"""gate, profile and engine on the command line for ONNX models of several named inputs (the keyword model of
tests/runtime/test_several_inputs.py: input_ids, attention_mask, features, a dynamic ``seq``): --inputs as a .npz
or .pt dict matched by name, random inputs sized with --dim seq=N, and one error line (exit 2) for a name that does
not match or a dimension with no size. In-process through ``cli.perf.main``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from egp_export.cli.perf import main
from tests.runtime.test_several_inputs import keyword  # noqa: F401  (the module-scoped fixture)

FAST = ["--rounds", "2", "--iterations", "2", "--warmup", "1"]


@pytest.fixture
def run(capsys):
    def cli(*args):
        code = main([str(arg) for arg in args])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err, captured.err
        return code, captured.out, captured.err

    return cli


def _one_error_line(err: str) -> str:
    (line,) = err.strip().splitlines()
    assert line.startswith("egp-export: error: "), line
    return line


def test_gate_passes_a_correct_compile_on_held_out_inputs_as_npz_and_pt(keyword, run, tmp_path):  # noqa: F811
    paths, held_out = keyword
    saved = tmp_path / "held_out.pt"
    torch.save({name: torch.from_numpy(value) for name, value in held_out.items()}, saved)
    for given in (paths["held_out"], saved):
        code, out, err = run("gate", paths["original"], paths["compiled"], "--min-speedup", "0.01", "--max-rel-error",
                             "1e-5", "--inputs", given, *FAST)  # fmt: skip
        assert code == 0, out + err
        verdict = out.strip().splitlines()[-1]
        assert verdict.startswith("egp-export gate: PASS") and f"on 40 samples of {given}" in verdict, verdict
    code, out, _ = run("gate", paths["original"], paths["wrong"], "--min-speedup", "0.01", "--max-rel-error", "1e-5",
                       "--inputs", paths["held_out"], *FAST)  # fmt: skip
    assert code == 1 and "FAIL" in out.strip().splitlines()[-1]


def test_gate_and_profile_on_random_inputs_need_the_sequence_size(keyword, run):  # noqa: F811
    paths, _ = keyword
    for argv in (["gate", paths["original"], paths["compiled"], "--min-speedup", "0.01", "--max-rel-error", "1e-4", *FAST],
                 ["profile", paths["compiled"], "--iterations", "2", "--warmup", "0"]):  # fmt: skip
        code, _, err = run(*argv)
        assert code == 2
        line = _one_error_line(err)
        assert "the input 'input_ids' has the dynamic dimension 'seq'" in line and "--dim seq=SIZE" in line, line
    code, out, err = run("gate", paths["original"], paths["compiled"], "--min-speedup", "0.01", "--max-rel-error",
                         "1e-4", "--dim", "seq=12", *FAST)  # fmt: skip
    assert code == 0, out + err
    verdict = out.strip().splitlines()[-1]
    assert "8 random samples of input_ids: integers in [0, 50), the embedding table's rows; attention_mask: integers " \
           "in [0, 2); features: N(0, 1) (not real data: give --inputs)" in verdict, verdict
    code, out, err = run("profile", paths["compiled"], "--dim", "seq=12", "--batch-size", "1", "2", "--iterations", "3",
                         "--warmup", "1")  # fmt: skip
    assert code == 0, err
    assert "input_ids 2x12, attention_mask 2x12, features 2x6" in out
    code, out, err = run("profile", paths["compiled"], "--inputs", paths["held_out"], "--batch-size", "4",
                         "--iterations", "3", "--warmup", "1")  # fmt: skip
    assert code == 0, err
    assert "input_ids 4x10, attention_mask 4x10, features 4x6" in out and f"inputs: {paths['held_out']}" in out


def test_a_missing_or_unknown_input_name_is_one_error_line_naming_the_files_inputs(keyword, run, tmp_path):  # noqa: F811
    paths, held_out = keyword
    missing, unknown = tmp_path / "missing.npz", tmp_path / "unknown.npz"
    np.savez(missing, input_ids=held_out["input_ids"], attention_mask=held_out["attention_mask"])
    np.savez(unknown, **held_out, token_type_ids=held_out["input_ids"])
    expected = {missing: "'features' is missing", unknown: "'token_type_ids' is not among them"}
    for given, problem in expected.items():
        for argv in (["gate", paths["original"], paths["compiled"], "--min-speedup", "0.01", *FAST],
                     ["profile", paths["compiled"], "--iterations", "1", "--warmup", "0"]):  # fmt: skip
            code, _, err = run(*argv, "--inputs", given)
            assert code == 2
            line = _one_error_line(err)
            assert "'input_ids', 'attention_mask', 'features'" in line and problem in line, line


def test_dim_options_are_checked(keyword, run, capsys):  # noqa: F811
    paths, _ = keyword
    with pytest.raises(SystemExit) as refused:
        main(["profile", str(paths["compiled"]), "--dim", "seq"])
    assert refused.value.code == 2 and "--dim: must be NAME=SIZE" in capsys.readouterr().err
    for dims, problem in ((["seq=12", "seq=10"], "--dim seq= is given twice"),
                          (["sequence=12"], "no dynamic dimension named 'sequence'")):  # fmt: skip
        code, _, err = run("profile", paths["compiled"], *[arg for d in dims for arg in ("--dim", d)], "--iterations", "1")
        assert code == 2 and problem in _one_error_line(err)


def test_the_engine_command_reads_several_inputs_and_skips_cleanly_without_tensorrt(keyword, run, tmp_path):  # noqa: F811
    from egp_export.runtime.tensorrt import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason("tensorrt")
    if reason is None:
        pytest.skip("TensorRT is installed here: tests/runtime/test_tensorrt.py builds engines")
    paths, _ = keyword
    code, _, err = run("engine", paths["compiled"], "--out", tmp_path / "m.engine", "--inputs", paths["held_out"])
    assert code == 2 and "tensorrt" in _one_error_line(err).lower()
    assert not (tmp_path / "m.engine").exists()
