"""The bundled `digits` model: shipped weights load offline and beat the Gaussian reference clearly."""

import math

import itdcli


def test_digits_model_beats_the_gaussian_on_the_discrete_likelihood_and_says_where_it_does_not() -> None:
    """Its own bounds: better on −log P and on the density, worse dequantized (trained on the exact grid, its error
    on x + δ(u − ½) at high logSNR exceeds the identity decoder's); the note names where N(μ,Σ) does better."""
    common = {"points": 24, "limit": 200, "seed": 11, "save": False, "estimator": "immse"}
    digits = itdcli.nll("digits_test", "digits", **common)
    gauss = itdcli.nll("digits_test", "gaussian", **common)
    assert digits.estimates["dequantized"].bpd > gauss.estimates["dequantized"].bpd
    assert any(n.startswith("dequantized: digits is worse") and "ensemble" in n for n in digits.notes)
    assert "dequantized" in digits.worse_than_reference
    for name in ("continuous", "discrete"):
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
