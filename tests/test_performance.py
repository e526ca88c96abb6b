"""Execution and efficiency features of `itd nll`: precision policy, out-of-memory backoff, rounds to a target."""

import math
from pathlib import Path

import pytest
import torch

import itdcli
from itdcli import runtime
from itdcli.errors import ItdError

COMMON = {"points": 16, "limit": 40, "seed": 3, "adapt": False, "save": False}


def test_precision_policy_stays_within_0_002_bpd_of_float32_and_all_bf16_does_not() -> None:
    """Real bf16 arithmetic on the CPU (autocast) below the policy's threshold; float32 above it."""
    exact = itdcli.nll("digits_test", "digits", precision="fp32", **COMMON)
    policy = itdcli.nll("digits_test", "digits", precision="policy", **COMMON)
    for name, e in exact.estimates.items():
        assert abs(policy.estimates[name].bpd - e.bpd) <= 0.002, name
    assert "bf16 autocast below logSNR" in policy.precision
    crude = itdcli.nll("digits_test", "digits", precision="bf16", **COMMON)
    assert max(abs(crude.estimates[n].bpd - e.bpd) for n, e in exact.estimates.items()) > 0.002


def test_policy_modes_follow_the_thresholds() -> None:
    p = runtime.precision("policy", torch.device("cuda"))
    assert [p.mode(g) for g in (-5.0, runtime.BF16_MAX_LOGSNR, runtime.TF32_MAX_LOGSNR, 20.0)] == [
        "bf16",
        "tf32",
        "fp32",
        "fp32",
    ]
    assert runtime.precision("auto", torch.device("cpu")).name == "fp32"
    assert runtime.precision("auto", torch.device("cuda")).name == "policy"


class _SmallMemory:
    """The bundled network behind a device that runs out of memory above 24 cells per batch."""

    def __init__(self) -> None:
        self.net = itdcli.load_model("digits")
        self.largest = 0

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        if z.shape[0] > 24:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.largest = max(self.largest, z.shape[0])
        return self.net(z, logsnr)


def test_out_of_memory_halves_the_batch_and_gives_the_same_answer() -> None:
    small = _SmallMemory()
    backed_off = itdcli.nll("digits_test", small, batch_size=200, **COMMON)
    direct = itdcli.nll("digits_test", "digits", batch_size=16, **COMMON)
    assert small.largest == 200 // 2**4  # 200 → 100 → 50 → 25 → 12: the first size that fits
    for name, e in direct.estimates.items():
        assert backed_off.estimates[name].bpd == pytest.approx(e.bpd, abs=1e-6), name


def test_rounds_stop_at_the_target_and_the_reported_error_matches_the_spread_over_seeds() -> None:
    # without the control variate: the Gaussian's own error is its control variate, which would leave no noise
    run = itdcli.nll(
        "digits_test", "gaussian", target_stderr=0.01, control_variate=False, estimator="immse", save=False
    )
    assert run.rounds >= 2 and run.target_stderr_bpd == 0.01
    assert all(e.stderr_bpd is not None and e.stderr_bpd <= 0.01 for e in run.estimates.values())
    assert run.points == run.arrays["logsnr"].shape[1] > 16
    # honesty: the Monte Carlo standard error of a fixed budget against independent repetitions (other seeds)
    runs = [
        itdcli.nll("digits_test", "gaussian", points=4, seed=s, control_variate=False, estimator="immse", save=False)
        for s in range(8)
    ]
    for name in ("continuous", "discrete", "dequantized"):
        means = torch.tensor([r.estimates[name].bpd for r in runs])
        reported = math.sqrt(sum(r.estimates[name].stderr_bpd ** 2 for r in runs) / len(runs))  # type: ignore[operator]
        assert 0.5 < reported / float(means.std()) < 2.2, name


def test_noise_draws_and_antithetic_pairs_are_counted_and_agree() -> None:
    one = itdcli.nll("digits_test", "gaussian", control_variate=False, **COMMON)
    anti = itdcli.nll("digits_test", "gaussian", draws=2, antithetic=True, control_variate=False, **COMMON)
    assert anti.evals_per_image == 4 * one.evals_per_image
    for name, e in one.estimates.items():
        gap = abs(anti.estimates[name].bpd - e.bpd)
        assert gap < 4 * math.hypot(e.stderr_bpd or 0, anti.estimates[name].stderr_bpd or 0), name


def test_a_compiled_network_gives_the_same_answer_with_padded_batches() -> None:
    """--compile: torch.compile'd denoiser, every batch padded to one shape (50 → 50, 50, 28 padded)."""
    opts = {**COMMON, "points": 8, "limit": 16, "batch_size": 50, "estimator": "continuous"}
    plain = itdcli.nll("digits_test", "gaussian", **opts)
    compiled = itdcli.nll("digits_test", "gaussian", compile=True, **opts)
    for name, e in plain.estimates.items():
        assert compiled.estimates[name].bpd == pytest.approx(e.bpd, abs=1e-9), name


def test_tf32_rounding_keeps_ten_significand_bits_with_ties_to_even() -> None:
    x = torch.tensor([1.0, 1 + 2**-10, 1 + 2**-11, 1 + 3 * 2**-11, -(1 + 3 * 2**-11), 3.14159265])
    assert runtime.round_tf32(x).tolist() == [1.0, 1 + 2**-10, 1.0, 1 + 2**-9, -(1 + 2**-9), 3.140625]


def test_emulated_tf32_rounds_the_operands_of_matmuls_and_convolutions_on_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 48, generator=gen), torch.randn(48, 16, generator=gen)
    img, kernel = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(4, 3, 3, 3, generator=gen)
    with runtime.network_mode("tf32", torch.device("cpu")):
        prod, conv = a @ b, torch.nn.functional.conv2d(img, kernel)
    r = runtime.round_tf32
    exact_prod = r(a).double() @ r(b).double()
    exact_conv = torch.nn.functional.conv2d(r(img).double(), r(kernel).double())
    assert torch.allclose(prod.double(), exact_prod, atol=1e-5) and torch.allclose(conv.double(), exact_conv, atol=1e-5)
    assert not torch.allclose(prod.double(), a.double() @ b.double(), atol=1e-4)  # float32 operands differ


def test_coarse_rounds_are_not_pulled_up_by_the_choice_of_denoiser() -> None:
    """Four points per image make four wide columns; the choice is per logSNR bin, so the bound stays tight."""
    opts = {"estimator": "dequantized", "adapt": False, "save": False}
    fine = itdcli.nll("digits_test", "digits", points=32, seed=1, **opts).estimates["dequantized"]
    coarse = [itdcli.nll("digits_test", "digits", points=4, seed=s, **opts).estimates["dequantized"] for s in (2, 3)]
    mean = sum(e.bpd for e in coarse) / len(coarse)
    se = math.sqrt(fine.stderr_bpd**2 + sum(e.stderr_bpd**2 for e in coarse) / len(coarse) ** 2)  # type: ignore[operator]
    assert abs(mean - fine.bpd) < 4 * se


def test_the_dequantized_pass_stops_on_its_own_and_its_points_are_saved_apart(tmp_path: Path) -> None:
    run = itdcli.nll(
        "digits_test", "digits", target_stderr=0.02, limit=120, seed=4, out=tmp_path / "run", control_variate=False
    )
    a = run.arrays
    assert run.deq_points is not None and run.deq_points != run.points
    assert a["deq/logsnr"].shape == a["deq/mse/deq"].shape == (120, run.deq_points)
    assert a["logsnr"].shape == a["mse/model"].shape == a["mse/ctl_sq_low"].shape == (120, run.points)
    assert a["deq/mse/ctl_sq_low"].shape == (120, run.deq_points)
    assert all(e.stderr_bpd is not None and e.stderr_bpd <= 0.02 for e in run.estimates.values())
    assert run.evals_per_image == pytest.approx(run.points + run.deq_points + run.pilot_evals_per_image)
    figure = itdcli.curve([tmp_path / "run"], out=tmp_path / "curve.png")
    assert Path(figure.path).read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ItdError, match="points of its own"):
        itdcli.ensemble("digits_test", runs=[tmp_path / "run"], limit=120, seed=4, save=False)


def test_per_image_standard_errors_match_the_spread_between_two_seeds() -> None:
    """se/NAME against E[(b₁ − b₂)²] = E[se₁² + se₂²] over images: calibrated, two points per stratum."""
    opts = {"points": 8, "control_variate": False, "estimator": "immse", "save": False}
    runs = [itdcli.nll("digits_test", "gaussian", seed=s, **opts) for s in (7, 8)]
    for name in ("continuous_pointwise", "discrete", "dequantized"):
        a, b = (r.arrays[f"bpd/{name}"] for r in runs)
        sa, sb = (r.arrays[f"se/{name}"] for r in runs)
        ratio = float(((a - b) ** 2).mean() / (sa**2 + sb**2).mean())
        assert 0.75 < ratio < 1.3, (name, ratio)


def test_control_variates_keep_per_image_errors_calibrated_and_shrink_them() -> None:
    """The digits model with the noise-moment and mean-curve controls: se/NAME still matches the spread between
    two seeds, and the dataset errors are well below those of the same points without controls (all images: a
    --limit subset would differ between seeds)."""
    opts = {"points": 8, "adapt": False, "estimator": "immse", "save": False}
    runs = [itdcli.nll("digits_test", "digits", seed=s, **opts) for s in (7, 8)]
    plain = itdcli.nll("digits_test", "digits", seed=7, control_variate=False, **opts)
    for name in ("continuous_pointwise", "discrete", "dequantized"):
        a, b = (r.arrays[f"bpd/{name}"] for r in runs)
        sa, sb = (r.arrays[f"se/{name}"] for r in runs)
        ratio = float(((a - b) ** 2).mean() / (sa**2 + sb**2).mean())
        assert 0.7 < ratio < 1.4, (name, ratio)
        assert abs(float(a.mean() - b.mean())) < 4 * math.hypot(float(sa.norm()), float(sb.norm())) / len(a)
    for name in ("continuous", "discrete"):
        assert runs[0].estimates[name].stderr_bpd < 0.7 * plain.estimates[name].stderr_bpd  # type: ignore[operator]


def test_a_per_image_target_adds_rounds_until_the_images_own_errors_meet_it() -> None:
    opts = {"points": 8, "limit": 40, "seed": 2, "save": False, "adapt": False}
    fixed = itdcli.nll("digits_test", "digits", **opts)
    run = itdcli.nll("digits_test", "digits", target_image_stderr=0.3, **opts)
    assert run.target_image_stderr_bpd == 0.3 and run.target_stderr_bpd is None
    assert run.rounds >= 2 and run.points > fixed.points
    missed = 0
    for name in run.estimates:
        before = float((fixed.arrays[f"se/{name}"] ** 2).mean().sqrt())
        after = float((run.arrays[f"se/{name}"] ** 2).mean().sqrt())
        assert after <= 0.3, name
        if before > 0.3:  # a pass whose images missed the target took more points
            missed += 1
            assert after < before, name
    assert missed > 0


def test_too_few_cells_fit_no_control_and_leave_the_estimates_as_they_were() -> None:
    """12 images × 8 points: no logSNR bin has ten training cells per control and no fold enough cells for the
    mean curve, so the controls change nothing (rather than adding the variance of fits to a handful of cells)."""
    opts = {"points": 8, "limit": 12, "seed": 1, "adapt": False, "save": False}
    on = itdcli.nll("digits_test", "digits", **opts)
    off = itdcli.nll("digits_test", "digits", control_variate=False, **opts)
    for name, e in on.estimates.items():
        assert e.bpd == pytest.approx(off.estimates[name].bpd, abs=1e-9), name
        assert e.stderr_bpd == pytest.approx(off.estimates[name].stderr_bpd, abs=1e-9), name
