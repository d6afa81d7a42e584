"""`einrewrite inspect` and `einrewrite rewrite`: parse options, build a RewriteConfig, call the API, print."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from einrewrite import (
    STRUCTURES,
    FlopBudget,
    ModelSourceError,
    RewriteConfig,
    SavedModelError,
    inspect_model,
    load_model,
    rewrite,
    save_pretrained,
)
from einrewrite.api import LoadedModel

__all__ = ["inspect_command", "rewrite_command"]


def _config_options(fn: Any) -> Any:
    """The options every command that builds a RewriteConfig shares (each maps to one config field)."""
    options = [
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                     help="RewriteConfig JSON ({type, version, data}); the options below override its fields."),
        click.option("--structure", type=click.Choice(sorted(STRUCTURES)), default=None,
                     help="Structure to rewrite into (default: btt)."),
        click.option("--budget", "ratio", type=click.FloatRange(0, min_open=True), default=None,
                     help="MACs per token of each rewritten layer as a fraction of dense (default 0.25)."),
        click.option("--macs-per-token", type=click.IntRange(min=1), default=None,
                     help="Total MACs per token of all rewritten layers, allocated across them (instead of --budget)."),
        click.option("--target", "targets", multiple=True,
                     help="Layers to rewrite: 'all-linear' (default), an exact FQN, a '.suffix' such as q_proj, or "
                          "'re:<regex>'. Repeatable."),
        click.option("--exclude", "excludes", multiple=True,
                     help="Layers to leave dense; same forms as --target. Repeatable; checked first."),
        click.option("--init", type=click.Choice(["project", "mup"]), default=None,
                     help="project: closest structured weight to the dense one (default); "
                          "mup: fresh init for training."),
        click.option("--min-features", type=click.IntRange(min=0), default=None,
                     help="Leave layers with min(d_in, d_out) below this dense (default 16)."),
        click.option("--mode", type=click.Choice(["auto", "module", "graph"]), default="auto", show_default=True,
                     help="module: swap modules only; graph: always torch.export; auto: the graph only when needed."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def build_config(
    config_file: str | None,
    structure: str | None,
    ratio: float | None,
    macs_per_token: int | None,
    targets: tuple[str, ...],
    excludes: tuple[str, ...],
    init: str | None,
    min_features: int | None,
) -> RewriteConfig:
    """A RewriteConfig from ``--config`` (if given) with the explicitly given options applied on top."""
    if ratio is not None and macs_per_token is not None:
        raise click.UsageError("--budget and --macs-per-token are exclusive: give one (per layer, or the whole model)")
    config = RewriteConfig()
    if config_file is not None:
        try:
            payload = json.loads(Path(config_file).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise click.BadParameter(f"{config_file} is not valid JSON: {e}", param_hint="--config") from None
        config = RewriteConfig.from_dict(payload)
    changes: dict[str, Any] = {}
    if structure is not None:
        changes["structure"] = structure
    if ratio is not None:
        changes["budget"] = FlopBudget(ratio=ratio)
    if macs_per_token is not None:
        changes["budget"] = FlopBudget(macs_per_token=macs_per_token)
    if targets:
        changes["target_modules"] = "all-linear" if targets == ("all-linear",) else targets
    if excludes:
        changes["exclude_modules"] = excludes
    if init is not None:
        changes["init"] = init
    if min_features is not None:
        changes["min_features"] = min_features
    return dataclasses.replace(config, **changes) if changes else config


def _load(model: str) -> LoadedModel:
    try:
        return load_model(model)
    except ModelSourceError as e:
        raise click.BadParameter(str(e), param_hint="MODEL") from None


def _echo_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, default=str))


@click.command("inspect")
@click.argument("model")
@_config_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect_command(model: str, config_file: str | None, structure: str | None, ratio: float | None,
                    macs_per_token: int | None, targets: tuple[str, ...], excludes: tuple[str, ...], init: str | None,
                    min_features: int | None, mode: str, as_json: bool) -> None:
    """List MODEL's linear layers, whether each is targeted, and what each structure costs at the budget.

    MODEL is a Hugging Face model directory (config.json; built offline, weights optional), an einrewrite output
    directory, or package.module:factory.
    """
    config = build_config(config_file, structure, ratio, macs_per_token, targets, excludes, init, min_features)
    loaded = _load(model)
    inspection = inspect_model(loaded.model, config, loaded.example_inputs, mode=mode)
    if as_json:
        _echo_json(inspection.to_dict())
    else:
        click.echo(inspection.table())


@click.command("rewrite")
@click.argument("model")
@_config_options
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Directory to write (model.safetensors, einrewrite.json, config.json for HF models).")
@click.option("--force", is_flag=True, help="Write into OUTPUT even if it is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("--per-layer", is_flag=True, help="One table row per layer (default: repeated layers are merged).")
@click.option("--no-verify", is_flag=True,
              help="Skip the liveness check (every replaced layer is on the forward path).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a terminal).")
def rewrite_command(model: str, config_file: str | None, structure: str | None, ratio: float | None,
                    macs_per_token: int | None, targets: tuple[str, ...], excludes: tuple[str, ...], init: str | None,
                    min_features: int | None, mode: str, output: str, force: bool, as_json: bool, per_layer: bool,
                    no_verify: bool, progress: bool | None) -> None:
    """Rewrite MODEL's dense linear layers into structured layers under a FLOP budget and save to OUTPUT.

    MODEL is a Hugging Face model directory (config.json; built offline, weights optional), an einrewrite output
    directory, or package.module:factory (returning a module, or (module, example_inputs)).
    """
    config = build_config(config_file, structure, ratio, macs_per_token, targets, excludes, init, min_features)
    out = Path(output)
    if out.is_dir() and any(out.iterdir()) and not force:  # fail before the (possibly long) rewrite
        raise SavedModelError(f"{out}: directory exists and is not empty; pass --force to replace it")
    loaded = _load(model)
    new, report = rewrite(loaded.model, config, loaded.example_inputs, mode=mode, verify=not no_verify,
                          progress=progress)
    save_pretrained(new, out, report, overwrite=force, factory=loaded.factory)
    if as_json:
        payload = report.to_dict()
        payload["data"]["output_dir"] = str(out)
        _echo_json(payload)
    else:
        click.echo(report.table(collapse=not per_layer))
    click.echo(f"saved to {out}", err=True)
