"""The bundled `digits` model: shipped weights load offline and beat the Gaussian reference clearly."""

import math

import itdcli


def test_digits_model_beats_the_gaussian_on_every_likelihood() -> None:
    """Its own bounds: better on −log P, on the density and dequantized (where, trained on the exact grid, it needs
    the cell posterior of its nearest level at high logSNR: its clamped error there exceeds the identity's)."""
    common = {"points": 24, "limit": 200, "seed": 11, "save": False, "estimator": "immse"}
    digits = itdcli.nll("digits_test", "digits", **common)
    gauss = itdcli.nll("digits_test", "gaussian", **common)
    assert "dequantized" not in digits.worse_than_reference
    for name in ("continuous", "discrete", "dequantized"):
        d, g = digits.estimates[name], gauss.estimates[name]
        assert d.stderr_bpd is not None and g.stderr_bpd is not None
        margin = 5 * math.hypot(d.stderr_bpd, g.stderr_bpd)
        assert d.bpd < g.bpd - margin, (name, d.bpd, g.bpd, margin)


def test_digits_model_is_small_and_described() -> None:
    from importlib.resources import files

    folder = files("itdcli.models") / "digits"
    assert (folder / "model.safetensors").is_file() and (folder / "itd-model.json").is_file()
    assert (folder / "model.safetensors").stat().st_size < 5 * 2**20
    model = itdcli.load_model("digits")
    assert model.input_shape == (1, 8, 8)  # type: ignore[attr-defined]
