"""`itd finetune`: the objective lowers the loss, runs resume exactly, bad input is refused."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import itdcli
from itdcli.api.finetune import finetune
from itdcli.cli.main import main
from itdcli.errors import ItdError

TINY = "iddpm:channels=32,res_blocks=1,mult=1,attn=none,heads=4,dropout=0.1"
FAST = {"init": "scratch", "arch": TINY, "batch_size": 32, "log_every": 1, "device": "cpu"}


def _weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoint" / name))


def test_resuming_reproduces_the_uninterrupted_run_exactly(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    finetune(None, "digits_train", out=straight, steps=6, save_every=3, **FAST)
    split = tmp_path / "split"
    finetune(None, "digits_train", out=split, steps=3, **FAST)
    finetune(None, "digits_train", out=split, steps=6, resume=True, **FAST)
    for name in ("raw.safetensors", "model.safetensors"):
        a, b = _weights(straight, name), _weights(split, name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    steps = [json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_training_from_scratch_lowers_the_itd_loss_on_held_out_digits(tmp_path: Path) -> None:
    common = {"points": 8, "limit": 120, "seed": 3, "selection": "none", "estimator": "continuous", "save": False}
    out = tmp_path / "run"
    finetune(None, "digits_train", out=out, steps=1, ema_decay=0.0, **{**FAST, "log_every": 1})
    before = itdcli.nll("digits_test", str(out), **common).estimates["continuous"].bpd
    finetune(None, "digits_train", out=out, steps=120, ema_decay=0.0, lr=1e-3, resume=True, **FAST)
    after = itdcli.nll("digits_test", str(out), **common).estimates["continuous"].bpd
    assert after < before - 0.1, (before, after)


def test_an_out_folder_with_a_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    finetune(None, "digits_train", out=out, steps=1, **FAST)
    args = ["finetune", "--init", "scratch", "--arch", TINY, "--steps", "1", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(ItdError, match="nothing to resume"):
        finetune(None, "digits_train", out=tmp_path / "empty", steps=1, resume=True, **FAST)


def test_bad_settings_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ItdError, match="bf16 needs a CUDA"):
        finetune(None, "digits_train", out=tmp_path / "a", steps=1, precision="bf16", **FAST)
    with pytest.raises(ItdError, match="cannot be fine-tuned"):
        finetune("gaussian", "digits_train", out=tmp_path / "b", steps=1, batch_size=32)
    with pytest.raises(ItdError, match=r"non-finite at step|diverged"):
        finetune(None, "digits_train", out=tmp_path / "c", steps=40, lr=1e12, grad_clip=0.0, **FAST)


def test_a_trained_run_is_a_model_for_nll(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    finetune(None, "digits_train", out=out, steps=2, eval_data="digits_test", eval_points=4, eval_limit=20, **FAST)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "itd_loss" in lines[-1]["eval"] and (out / "metrics.png").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["nll", "digits_test", "--model", str(out), "--limit", "10", "--points", "4", "--json"])
    assert exit_info.value.code == 0 and '"discrete"' in capsys.readouterr().out


def test_a_short_finetune_of_the_bundled_digits_model_lowers_its_itd_loss(tmp_path: Path) -> None:
    """Same logSNR points and noise before and after (common random numbers), so the paired difference is sharp."""
    import math

    common = {"points": 16, "limit": 200, "seed": 3, "selection": "none", "estimator": "continuous", "save": False}
    before = itdcli.nll("digits_test", "digits", **common).arrays["bpd/continuous"]
    out = tmp_path / "tuned"
    finetune("digits", "digits_train", out=out, steps=60, lr=1e-4, batch_size=64, ema_decay=0.0, device="cpu")
    after = itdcli.nll("digits_test", str(out), **common).arrays["bpd/continuous"]
    diff = after - before
    se = float(diff.std()) / math.sqrt(diff.numel())
    assert float(diff.mean()) < -3 * se, (float(diff.mean()), se)


def test_arch_keys_left_out_keep_the_default_small_network() -> None:
    from itdcli.api.finetune import parse_arch

    config = parse_arch("iddpm:channels=64", (1, 8, 8))
    assert (config.model_channels, config.num_res_blocks, config.channel_mult) == (64, 2, (1, 2))
    assert (config.attention_resolutions, config.dropout, config.in_channels) == ((2,), 0.1, 1)
    with pytest.raises(ItdError, match="unknown --arch key"):
        parse_arch("iddpm:width=3", (1, 8, 8))


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    """A finite loss that grows by orders of magnitude (lr 1e6, given on --resume, which takes it) is stopped, not
    trained on to 1e16 bits/dim, and the checkpoint it resumed from is left as it was."""
    out = tmp_path / "run"
    finetune(None, "digits_train", out=out, steps=2, save_every=2, **FAST)
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    with pytest.raises(ItdError, match=r"(diverged|non-finite).*checkpoint \(step 2\) is kept"):
        finetune(None, "digits_train", out=out, steps=40, lr=1e6, grad_clip=0.0, resume=True, **FAST)
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before
    with pytest.raises(ItdError, match=r"the loss diverged: .* bits/dim at step 1"):  # finite, but absurd
        finetune(None, "digits_train", out=tmp_path / "fresh", steps=40, lr=1e6, grad_clip=0.0, **FAST)


def test_resuming_with_fewer_steps_than_the_checkpoint_says_so_and_its_advice_works(tmp_path: Path) -> None:
    out = tmp_path / "run"
    finetune(None, "digits_train", out=out, steps=3, save_every=3, **FAST)
    with pytest.raises(ItdError, match=r"at step 3, beyond --steps 2.*--steps 5"):
        finetune(None, "digits_train", out=out, steps=2, resume=True, **FAST)
    # a run complete at its --steps (e.g. stopped during its last step) resumes to a finished result, untouched
    before = _weights(out, "raw.safetensors")
    assert finetune(None, "digits_train", out=out, steps=3, resume=True, **FAST).steps == 3
    after = _weights(out, "raw.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert finetune(None, "digits_train", out=out, steps=5, resume=True, **FAST).steps == 5


def test_a_run_killed_before_its_first_checkpoint_can_simply_be_started_again(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss_bpd": 5.0}\n{"step": 2, "lo')  # torn by a kill
    with pytest.raises(ItdError, match=r"no checkpoint.*drop --resume"):
        finetune(None, "digits_train", out=out, steps=2, resume=True, **FAST)
    assert finetune(None, "digits_train", out=out, steps=2, **FAST).steps == 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
