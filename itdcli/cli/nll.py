"""`itd nll DATA --model M`: bits/dim per estimator with standard errors."""

from typing import Annotated, Any

import typer

from itdcli.api.options import default
from itdcli.cli import _options as o
from itdcli.cli._render import err_console, print_nll, progress_bar
from itdcli.core.kinds import ESTIMATOR_HELP


def _estimators() -> str:
    """The --estimator choices for the help, from the registry in core/kinds.py."""
    named = [f"{name} ({gloss})" if gloss else name for name, gloss in ESTIMATOR_HELP.items()]
    return ", ".join(named[:-1]) + " or " + named[-1]


def nll_command(
    data: Annotated[
        str,
        typer.Argument(
            metavar="DATA",
            help="Dataset: digits_test, cifar_test (after itd download cifar10), an image folder, a .npz file.",
        ),
    ],
    model: o.ModelOpt = "gaussian",
    discrete: Annotated[bool, typer.Option("--discrete", help="Report the discrete −log P(x) estimate.")] = False,
    estimator: Annotated[
        str | None,
        typer.Option(help=f"{_estimators()} (default: discrete and dequantized on integer data)."),
    ] = None,
    points: o.BudgetOpt = None,
    target_stderr: Annotated[
        float | None,
        typer.Option(help="Add points until every Monte Carlo standard error is at most this (bpd; default 0.005)."),
    ] = None,
    target_image_stderr: Annotated[
        float | None,
        typer.Option(
            help="Also add points until the images' own Monte Carlo errors are at most this (bpd, root mean square "
            "over images; e.g. 0.02 for outlier scores)."
        ),
    ] = None,
    max_points: Annotated[
        int | None,
        typer.Option(help=f"Most logSNR points per image when aiming at a target (default {default('max_points')})."),
    ] = None,
    adapt: Annotated[
        bool | None,
        typer.Option(help="Fit the logSNR proposal to the model's integrands in a short pilot pass (default: on)."),
    ] = None,
    draws: Annotated[
        int | None, typer.Option(help=f"Noise draws per logSNR point (default {default('draws')}).")
    ] = None,
    antithetic: Annotated[bool, typer.Option("--antithetic", help="Evaluate every noise draw also at −ε.")] = False,
    control_variate: Annotated[
        bool | None,
        typer.Option(
            help="Control variates: the Gaussian denoiser's error and noise moments on the same draw, a mean curve "
            "(default: on)."
        ),
    ] = None,
    paper_clamp: Annotated[
        bool,
        typer.Option(
            "--paper-clamp",
            help="The paper's max(0, mmse_G − m̄): switch to N(μ,Σ) per logSNR (an ensemble, named as such).",
        ),
    ] = False,
    precision: Annotated[
        str | None,
        typer.Option(
            help="Network precision: auto (the per-logSNR policy on CUDA, fp32 on CPU), policy, fp32 or bf16 "
            f"(default {default('precision')})."
        ),
    ] = None,
    compile_net: o.CompileOpt = False,
    seed: Annotated[
        int | None, typer.Option(help=f"Seed for logSNR points, noise and subsets (default {default('seed')}).")
    ] = None,
    batch_size: o.BatchOpt = None,
    device: Annotated[
        str | None, typer.Option(help=f"cpu, cuda, cuda:N or auto (default {default('device')}).")
    ] = None,
    limit: o.LimitOpt = None,
    reference: o.ReferenceOpt = None,
    selection: Annotated[
        str | None,
        typer.Option(
            help="Per-logSNR choice among the model's projections: crossfit (held out), same (paper), none "
            f"(default {default('selection')})."
        ),
    ] = None,
    rounding: Annotated[
        str | None,
        typer.Option(help=f"soft or hard rounding for the discrete estimator (default {default('rounding')})."),
    ] = None,
    scale_constant: Annotated[
        float | None, typer.Option(help="c in scale = √(1 + c·Var log λ) (default: 3/π, the paper's).")
    ] = None,
    loc: Annotated[float | None, typer.Option(help="Proposal centre (default: −mean log λ of the spectrum).")] = None,
    scale: Annotated[float | None, typer.Option(help="Proposal scale (default: from the spectrum).")] = None,
    clip: Annotated[
        float | None,
        typer.Option(help="Range loc ± clip·scale, the paper's (default: from the tails; 4 with --loc or --scale)."),
    ] = None,
    scheme: Annotated[
        str | None,
        typer.Option(help=f"logSNR points per image: stratified or iid, the paper's (default {default('scheme')})."),
    ] = None,
    logsnr_min: Annotated[float | None, typer.Option(help="Lower end of the logSNR range.")] = None,
    logsnr_max: Annotated[float | None, typer.Option(help="Upper end of the logSNR range.")] = None,
    levels: o.LevelsOpt = None,
    time_map: Annotated[
        str | None,
        typer.Option(
            help="logSNR → model time: exact, or reference (the ITD code's, for reproducing the paper) "
            f"(default {default('time_map')})."
        ),
    ] = None,
    vlb_full: Annotated[
        bool,
        typer.Option("--vlb-full", help="The variational bound over every step (calc_bpd_loop), not a sample."),
    ] = False,
    probes: Annotated[
        int | None,
        typer.Option(help=f"Hutchinson probes per image for the ODE's divergence (default {default('probes')})."),
    ] = None,
    rtol: Annotated[
        float | None, typer.Option(help=f"ODE solver relative tolerance (default {default('rtol')}).")
    ] = None,
    atol: Annotated[
        float | None, typer.Option(help=f"ODE solver absolute tolerance (default {default('atol')}).")
    ] = None,
    ode_max_steps: Annotated[
        int | None,
        typer.Option(help=f"ODE solver steps per batch before it gives up (default {default('ode_max_steps'):,})."),
    ] = None,
    out: o.OutDirOpt = None,
    overwrite: o.OverwriteOpt = False,
    json_out: o.JsonOpt = False,
) -> None:
    """Estimate −log p(x) and −log P(x) in bits/dim with honest standard errors."""
    from itdcli import runtime
    from itdcli.api.nll import nll
    from itdcli.api.options import NllOptions

    fields: dict[str, Any] = {
        "estimator": estimator,
        "discrete": discrete,
        "points": points,
        "target_stderr": target_stderr,
        "target_image_stderr": target_image_stderr,
        "max_points": max_points,
        "adapt": adapt,
        "draws": draws,
        "antithetic": antithetic,
        "control_variate": control_variate,
        "paper_clamp": paper_clamp,
        "precision": precision,
        "compile": compile_net,
        "seed": seed,
        "batch_size": batch_size,
        "device": device,
        "limit": limit,
        "selection": selection,
        "rounding": rounding,
        "scale_constant": scale_constant,
        "loc": loc,
        "scale": scale,
        "clip": clip,
        "scheme": scheme,
        "logsnr_min": logsnr_min,
        "logsnr_max": logsnr_max,
        "levels": levels,
        "time_map": time_map,
        "vlb_full": vlb_full,
        "probes": probes,
        "rtol": rtol,
        "atol": atol,
        "ode_max_steps": ode_max_steps,
        "out": out,
        "overwrite": overwrite,
    }
    options = NllOptions.model_validate({k: v for k, v in fields.items() if v is not None})
    with progress_bar("nll") as advance:
        result = nll(data, model, reference=reference, progress=advance, **options.model_dump())
    if not runtime.is_main():
        return
    for line in result.warnings:
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False)
    if json_out:
        typer.echo(result.model_dump_json(indent=2))
    else:
        print_nll(result)
