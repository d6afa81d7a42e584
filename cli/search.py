"""`einrewrite search`: rank structures by validation loss at one compute budget (a thin call to einrewrite.search)."""

from __future__ import annotations

import json
from typing import Any

import click

from einrewrite import STRUCTURES
from einrewrite.search import LMTask, RegressionTask, SearchTask, make_candidates, search
from einrewrite.train import TrainConfig

__all__ = ["search_command"]

_NAMES = sorted(n for n in STRUCTURES if n != "einsum")


def _task(task: str, width: int | None, layers: int, steps: int, batch_size: int, block_size: int,
          corpus_bytes: int, seed: int) -> SearchTask:
    if task == "regression":
        return RegressionTask(d=width or 32, steps=steps, batch_size=batch_size)
    from einrewrite.data import load_corpus
    from einrewrite.gpt import GPTConfig

    d_head = 16
    base = width or 64
    if base % d_head:
        raise click.BadParameter(f"the LM task needs a multiple of d_head = {d_head}, got {base}", param_hint="--width")
    train = TrainConfig(steps=steps, batch_size=batch_size, block_size=block_size, warmup=max(1, steps // 10),
                        eval_every=steps, eval_batches=4, seed=seed)
    model = GPTConfig(d_model=base, d_head=d_head, n_layer=layers, block_size=block_size)
    return LMTask(corpus=load_corpus(max_bytes=corpus_bytes), model=model, train=train)


@click.command("search")
@click.option("--task", type=click.Choice(["lm", "regression"]), default="lm", show_default=True,
              help="lm: a small GPT on the standard library's source (offline); regression: y = W*x, W* orthogonal.")
@click.option("--structure", "structures", type=click.Choice(_NAMES), multiple=True,
              help="Registry structures to try (repeatable; default: all).")
@click.option("--no-named", is_flag=True, help="Try no registry structure (only θ).")
@click.option("--paper/--no-paper", default=True, show_default=True, help="Try the paper's θ list.")
@click.option("--samples", type=click.IntRange(min=0), default=0, show_default=True,
              help="θ sampled uniformly from the canonical region.")
@click.option("--theta", "thetas", multiple=True, help="Extra θ to try, e.g. '(.5|0|.5|0|.5|.5|.25)'. Repeatable.")
@click.option("--where", default=None, help="Taxonomy filter, e.g. 'omega == 0 and psi == 1'.")
@click.option("--budget", "flops_ratio", type=click.FloatRange(0, min_open=True), default=0.5, show_default=True,
              help="MACs/token of each candidate model as a fraction of the dense model at --width.")
@click.option("--macs-per-token", type=click.IntRange(min=1), default=None,
              help="The budget in MACs/token of the whole model (instead of --budget).")
@click.option("--width", type=click.IntRange(min=1), default=None,
              help="Base width: d_model of the GPT (default 64) or d of the regression (default 32).")
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True, help="GPT blocks (lm task).")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True,
              help="Training steps per candidate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Sequences per step.")
@click.option("--block-size", type=click.IntRange(min=2), default=64, show_default=True, help="Context (lm task).")
@click.option("--corpus-bytes", type=click.IntRange(min=10_000), default=1_000_000, show_default=True,
              help="Bytes of standard-library text to read (lm task).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds init, sampling and data.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="CSV to write row by row; an existing one is resumed (its candidates are not rerun).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the ranked rows as JSON instead of a table.")
def search_command(task: str, structures: tuple[str, ...], no_named: bool, paper: bool, samples: int,
                   thetas: tuple[str, ...], where: str | None, flops_ratio: float, macs_per_token: int | None,
                   width: int | None, layers: int, steps: int, batch_size: int, block_size: int, corpus_bytes: int,
                   seed: int, output: str | None, progress: bool, as_json: bool) -> None:
    """Size every candidate structure to one FLOP budget, train it briefly and rank by validation loss."""
    named: bool | list[str] = False if no_named else (list(structures) or True)
    candidates = make_candidates(named=named, paper=paper, samples=samples, thetas=thetas, seed=seed)
    if not candidates:
        raise click.UsageError("no candidates: drop --no-named, keep --paper, or give --samples/--theta")
    built = _task(task, width, layers, steps, batch_size, block_size, corpus_bytes, seed)
    result = search(built, candidates, where=where, flops_ratio=flops_ratio, macs_per_token=macs_per_token,
                    seed=seed, csv_path=output, progress=progress)
    if as_json:
        payload: dict[str, Any] = {"budget_macs": result.budget_macs, "resumed": result.resumed,
                                   "rows": [r.to_csv() for r in result.ranked()]}
        click.echo(json.dumps(payload, indent=2, default=str))
        return
    if result.resumed:
        click.echo(f"resumed {result.resumed} candidates from {output}")
    click.echo(result.table())
    if output:
        click.echo(f"wrote {output}")
