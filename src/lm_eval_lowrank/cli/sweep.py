"""``lm-eval-lowrank sweep | report | search``: characterisation grids, their report, Definition-1 search.

Examples::

    lm-eval-lowrank sweep --model PATH --tasks arc_easy_local,lambada_openai_local \\
        --ranks 1,8 --layer-sets 'single:3|16|30;table4' --tensor-groups all --limit 20 \\
        --store sweep.jsonl
    lm-eval-lowrank report sweep.jsonl --out report/
    lm-eval-lowrank search --model PATH --tasks arc_easy_local --tolerance 0.03 \\
        --objective 'latency*energy' --limits 10,50 --store sweep.jsonl

A killed sweep or search resumes where it stopped when run again with the same store.
"""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from ..spec import ALLOCATORS, SpecError
from .errors import InputError, OneLineBadParameter


def _fraction_list(value: str, option: str) -> list[float]:
    out = []
    for part in str(value).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            f = float(part)
        except ValueError:
            f = -1.0
        if not 0 < f < 1:
            raise OneLineBadParameter(f"{value!r}: {part!r} is not a fraction 0 < f < 1; give a comma-separated list like 0.7,0.5", param_hint=f"'{option}'")
        out.append(f)
    return list(dict.fromkeys(out))


def _int_list(value: str, option: str, minimum: int = 1, unique: bool = True) -> list[int]:
    """A comma-separated list of ints; a set of values (ranks) drops repeats, a sequence (rungs) keeps them."""
    out = []
    for part in str(value).split(","):
        part = part.strip()
        try:
            n = int(part)
        except ValueError:
            n = minimum - 1
        if n < minimum:
            raise OneLineBadParameter(f"{value!r}: {part!r} is not an int >= {minimum}; give a comma-separated list like 1,8", param_hint=f"'{option}'")
        out.append(n)
    return list(dict.fromkeys(out)) if unique else out


def _tasks(value: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in str(value).split(",") if t.strip())
    if not tasks:
        raise OneLineBadParameter(f"{value!r}: give task names separated by ',' (e.g. arc_easy_local,lambada_openai_local)", param_hint="'--tasks'")
    return tasks


def _include_path(include_path: str | None, tasks: tuple[str, ...]) -> str | None:
    """The local tasks folder when any task is one of ours and no --include-path was given."""
    if include_path or not any(t.endswith("_local") for t in tasks):
        return include_path
    try:
        from ..tasks import task_dir
    except ImportError:
        return None
    return str(task_dir())


# `space`'s built-in names are shapes without weights; "gpt2" alone is also a Hub model (the same name as the shape).
_HUB_MODELS_NAMED_LIKE_SHAPES = ("gpt2",)


def check_model_has_weights(model: str, option: str = "--model") -> None:
    """A built-in shape name (``smollm2-135m``) passed the config checks, and then every evaluation failed."""
    from ..design_space import BUILTIN_CONFIGS

    name = model.strip().lower()
    if name in BUILTIN_CONFIGS and name not in _HUB_MODELS_NAMED_LIKE_SHAPES and not Path(model).expanduser().is_dir():
        raise OneLineBadParameter(
            f"{model!r} is a built-in shape without weights (for `space`); give a model folder or a Hub id "
            "(e.g. meta-llama/Llama-2-7b-hf), or $(lm-eval-lowrank fetch-model) for SmolLM2",
            param_hint=f"'{option}'",
        )


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise OneLineBadParameter(f"{device!r} is not a torch device: give cpu, cuda or cuda:N", param_hint="'--device'") from None
    if kind == "cuda" and not torch.cuda.is_available():  # else every row fails, after the first one's setup
        raise OneLineBadParameter(f"{device!r}: this torch ({torch.__version__}) has no usable CUDA; use --device cpu", param_hint="'--device'")


def _runner(model: str, tasks: str, store: str, include_path: str | None, device: str, batch_size: str, model_args: str, read_only: bool = False) -> Any:
    from ..store import Store, StoreError
    from ..sweep import Runner

    check_model_has_weights(model)
    _check_device(device)
    task_names = _tasks(tasks)
    try:
        opened = Store.open(store, read_only=read_only)  # a dry run changes nothing on disk
    except StoreError as exc:  # a file that is not a store (a results JSON, text): refused, left as it is
        raise OneLineBadParameter(str(exc), param_hint="'--store'") from None
    return Runner(
        model=model,
        tasks=task_names,
        store=opened,
        include_path=_include_path(include_path, task_names),
        device=device,
        batch_size=batch_size,
        model_args=model_args,
    )


def _batch_size(value: str) -> str:
    from ..spec import BATCH_SIZE_SYNTAX, check_batch_size

    try:
        check_batch_size(value)
    except SpecError:
        raise OneLineBadParameter(f"{value!r} is not {BATCH_SIZE_SYNTAX}", param_hint="'--batch-size'") from None
    return value


def _check_tasks(runner: Any, first_limit: int | None) -> None:
    """Unknown --tasks as one line before any model loads. A finished dense row of these tasks in the store shows
    they resolve: a resumed run then skips the TaskManager's index (~20 s) when it has nothing left to evaluate."""
    if runner.stored_row(runner.key({}, first_limit)) is not None:
        return
    unknown = runner.unknown_tasks()
    if unknown:
        where = f" (include path {runner.include_path})" if runner.include_path else ""
        raise OneLineBadParameter(
            f"{', '.join(map(repr, unknown))}: lm-eval{where} has no such task, group or tag, and no such YAML file "
            "(`lm-eval-lowrank tasks --list` lists the local ones)",
            param_hint="'--tasks'",
        )


def _limit(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise OneLineBadParameter(f"{value!r} is not an int >= 1 (documents per task)", param_hint="'--limit'")
    return value


_common = [
    click.option("--model", required=True, help="HF model folder or hub id (e.g. $(lm-eval-lowrank fetch-model))."),
    click.option("--tasks", required=True, help="Comma-separated lm-eval task names, e.g. arc_easy_local,lambada_openai_local."),
    click.option("--include-path", default=None, help="lm-eval --include_path; default: the local tasks folder when a *_local task is named."),
    click.option("--device", default="cpu", show_default=True, help="Device for HFLM (cpu, cuda, cuda:0)."),
    click.option("--batch-size", default="8", show_default=True, help="HFLM batch size (an int or 'auto')."),
    click.option("--model-args", "model_args", default="", help="Extra HFLM model_args, e.g. dtype=float32 (not pretrained/rank/layers/tensors/budget/allocator: set per configuration)."),
]


def common(f: Any) -> Any:
    for opt in reversed(_common):
        f = opt(f)
    return f


@click.command("sweep")
@common
@click.option("--ranks", default="1", show_default=True, help="Comma-separated ranks, e.g. 1,8.")
@click.option("--layer-sets", "layer_sets", default="single", show_default=True, help="';'-separated: table4 | single | single:3|15|28 | spread:1-4 | all | 3|15|28.")
@click.option("--tensor-groups", "tensor_groups", default="all", show_default=True, help="','-separated: all | attn | mlp | single | q|k (explicit).")
@click.option("--limit", type=int, default=None, help="Documents per task (lm-eval --limit); default: all.")
@click.option("--store", required=True, type=click.Path(dir_okay=False), help="JSON Lines results store (created, or resumed).")
@click.option(
    "--doc-scores",
    "doc_scores",
    is_flag=True,
    help="Keep each document's score in the store (lm-eval's log_samples), so that report gives each drop a paired 95% interval; stored rows without them are evaluated again.",
)
@click.option("--dry-run", is_flag=True, help="Print the grid (and which rows are already stored) and exit.")
def sweep(model: str, tasks: str, include_path: str | None, device: str, batch_size: str, model_args: str, ranks: str, layer_sets: str, tensor_groups: str, limit: int | None, store: str, doc_scores: bool, dry_run: bool) -> None:
    """Run ranks x layer sets x tensor groups (plus the dense baseline) through hf-tucker."""
    from ..sweep import build_grid, expand_layer_sets, expand_tensor_groups, model_info, run_sweep

    rank_list = _int_list(ranks, "--ranks")
    limit = _limit(limit)
    batch_size = _batch_size(batch_size)
    num_layers, _, adapter = model_info(model)
    grid = build_grid(rank_list, expand_layer_sets(layer_sets, num_layers), expand_tensor_groups(tensor_groups, adapter))
    runner = _runner(model, tasks, store, include_path, device, batch_size, model_args, read_only=dry_run)
    runner.keep_doc_scores = doc_scores
    runner.check_specs(cfg.spec_args() for cfg in grid)  # a rank too large fails here, not after earlier rows ran
    _check_tasks(runner, limit)  # a dry run checks what the run would
    if dry_run:
        for cfg in grid:
            state = "to run" if runner.stored_row(runner.key(cfg.spec_args(), limit)) is None else "stored"
            click.echo(f"{state:7s} {cfg.label}  model_args='{runner.model_args_string(cfg.spec_args())}'")
        return
    if runner.store.repaired_bytes:
        click.echo(f"store: cut a torn last line ({runner.store.repaired_bytes} bytes) left by an interrupted run", err=True)
    rows = run_sweep(runner, grid, limit)
    failed = [r for r in rows if r.get("status") != "ok"]
    click.echo(f"{len(rows) - len(failed)}/{len(grid)} configurations in {store} ({runner.evaluated} run now)")
    if failed:
        for r in failed:
            click.echo(f"failed: {r.get('label')}: {r.get('error')}", err=True)
        sys.exit(1)


@click.command("report")
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for report.md and the PNG plots.")
@click.option("--plots/--no-plots", default=None, help="Draw the PNG plots (needs matplotlib). Default: when matplotlib is installed.")
def report(store: str, out_dir: str, plots: bool | None) -> None:
    """Markdown table and PNG plots (accuracy, latency, energy, memory, sensitivity) from a store."""
    from ..report import ReportError, write_report
    from ..store import StoreError

    try:
        files = write_report(store, out_dir, plots=plots)
    except (ReportError, StoreError) as exc:  # a missing, empty or unreadable store
        raise InputError(str(exc)) from None
    for f in files:
        click.echo(str(f))
    if plots is None and not any(f.suffix == ".png" for f in files):
        click.echo("no plots: matplotlib is not installed (pip install 'lm-eval-lowrank[plots]')", err=True)


@click.command("search")
@common
@click.option("--tolerance", type=float, default=0.03, show_default=True, help="Largest accuracy drop allowed (fraction: 0.03 = 3 points).")
@click.option("--objective", default="latency*energy", show_default=True, help="latency | energy | latency*energy | memory | params (energy falls back to latency where unavailable).")
@click.option("--ranks", default="1,8", show_default=True, help="Candidate ranks ('none': only --keeps and --budgets).")
@click.option("--keeps", default="", help="Candidate kept fractions of each chosen layer's parameters (budget=), e.g. 0.7,0.5.")
@click.option("--budgets", default="", help="Candidate kept fractions of every decoder matrix, placed by --allocator over any layers and tensors, e.g. 0.95,0.9.")
@click.option(
    "--allocator",
    default="fisher",
    show_default=True,
    help="What places the cut of a --budgets candidate: fisher (the K-FAC loss estimate), sensitivity (measured per layer), output_error, tail or uniform.",
)
@click.option(
    "--method",
    default=None,
    help="Decomposition method of the candidates (tucker, whiten, rom, asvd, fwsvd, fwhiten), or several joined by ',' to compare them in one search; calibration options go in --model_args.",
)
@click.option("--max-k", "max_k", type=int, default=4, show_default=True, help="Spread sets of k = 1..max-k whole layers.")
@click.option("--strides", default="", help="Also every s-th layer of the allowed band for each s, e.g. 2,3,4.")
@click.option("--no-table4", is_flag=True, help="Leave the Table 4 layer sets out of the candidates.")
@click.option("--limits", default="10,50", show_default=True, help="Documents per task at each successive-halving rung, screening first, e.g. 10,50 or 8,24,100.")
@click.option("--eta", type=float, default=3.0, show_default=True, help="Keep the best 1/eta of the candidates at each screening rung.")
@click.option(
    "--prune-margin",
    type=float,
    default=None,
    help="Prune at screening when the drop exceeds tolerance + this margin [default: 0.1]; with --confidence, when the drop's lower bound does [default: 0].",
)
@click.option("--aggregate", type=click.Choice(["mean", "max"]), default="mean", show_default=True, help="Drop over tasks: mean, or the worst task.")
@click.option(
    "--confidence",
    type=float,
    default=None,
    metavar="LEVEL",
    help="Paired one-sided LEVEL bounds of the drop, e.g. 0.95: the last rung calls a candidate feasible only when its upper bound is within the tolerance, and screening prunes only when its lower bound is not.",
)
@click.option(
    "--family-wise",
    "family_wise",
    is_flag=True,
    help="With --confidence: make LEVEL hold for all the candidates of a rung together (Bonferroni), so that picking the cheapest of many does not favour a bound that came out too low.",
)
@click.option(
    "--tie-break",
    "tie_break",
    type=click.Choice(["objective", "params"]),
    default="objective",
    show_default=True,
    help="With the latency objective: 'params' picks the most compressed of the feasible candidates whose paired latency interval against the fastest reaches 1 (tied within the timing noise); 'objective' keeps the fastest reading.",
)
@click.option("--store", required=True, type=click.Path(dir_okay=False), help="JSON Lines store; every evaluation is recorded (resumable).")
def search(model: str, tasks: str, include_path: str | None, device: str, batch_size: str, model_args: str, tolerance: float, objective: str, ranks: str, keeps: str, budgets: str, allocator: str, method: str | None, max_k: int, strides: str, no_table4: bool, limits: str, eta: float, prune_margin: float | None, aggregate: str, confidence: float | None, family_wise: bool, tie_break: str, store: str) -> None:
    """Minimise the objective subject to accuracy(dense) - accuracy <= tolerance (Definition 1)."""
    from ..latency_stats import LatencyRatio
    from ..search import BaselineError, default_candidates, parse_objective, pareto_front
    from ..search import search as run_search
    from ..sweep import model_info

    if not math.isfinite(tolerance) or not 0 <= tolerance <= 1:
        raise OneLineBadParameter(f"{tolerance!r} is not a finite drop in accuracy, 0 <= x <= 1 (a fraction: 0.03 = 3 points)", param_hint="'--tolerance'")
    if not math.isfinite(eta) or eta <= 1:
        raise OneLineBadParameter(f"{eta!r} is not a finite number > 1", param_hint="'--eta'")
    if max_k < 1:
        raise OneLineBadParameter(f"{max_k!r} is not an int >= 1", param_hint="'--max-k'")
    if confidence is not None and not 0.5 <= confidence < 1:
        raise OneLineBadParameter(f"{confidence!r} is not a level in [0.5, 1), e.g. 0.95", param_hint="'--confidence'")
    if prune_margin is not None and (not math.isfinite(prune_margin) or prune_margin < 0):
        raise OneLineBadParameter(f"{prune_margin!r} is not a finite margin >= 0 (fraction, e.g. 0.1)", param_hint="'--prune-margin'")
    if family_wise and confidence is None:
        raise OneLineBadParameter("needs --confidence: it spreads that level over each rung's candidates", param_hint="'--family-wise'")
    try:
        objective = parse_objective(objective)
    except SpecError as exc:
        raise OneLineBadParameter(str(exc), param_hint="'--objective'") from None
    limit_list = _int_list(limits, "--limits", unique=False)
    # screening on many documents and deciding on few would be upside down; a repeated rung halves on no new documents
    if any(b <= a for a, b in zip(limit_list, limit_list[1:])):
        raise OneLineBadParameter(f"{limits!r}: the rungs' documents per task must strictly ascend, screening first, like 10,50 or 8,24,100", param_hint="'--limits'")
    rank_list = [] if ranks.strip().lower() in ("none", "") else _int_list(ranks, "--ranks")
    keep_list = _fraction_list(keeps, "--keeps")
    budget_list = _fraction_list(budgets, "--budgets")
    allocator = allocator.strip().lower()
    if allocator not in ALLOCATORS:
        raise OneLineBadParameter(f"{allocator!r} is not an allocator; valid: {', '.join(ALLOCATORS)}", param_hint="'--allocator'")
    stride_list = _int_list(strides, "--strides") if strides.strip() else []
    method_list: list[str] | None = None
    if method is not None:
        from ..spec import METHODS

        method_list = [m.strip().lower() for m in method.split(",") if m.strip()]
        bad = [m for m in method_list if m not in METHODS]
        if bad or not method_list:
            raise OneLineBadParameter(f"{method!r} is not a method or a ','-joined list of them; valid: {', '.join(METHODS)}", param_hint="'--method'")
    if not rank_list and not keep_list and not budget_list:
        raise OneLineBadParameter("no candidates: give --ranks, --keeps and/or --budgets", param_hint="'--ranks'")
    batch_size = _batch_size(batch_size)
    num_layers, _, _ = model_info(model)
    candidates = default_candidates(num_layers, rank_list, max_k=max_k, table4=not no_table4, keeps=keep_list, strides=stride_list, method=method_list, budgets=budget_list, allocator=allocator)
    runner = _runner(model, tasks, store, include_path, device, batch_size, model_args)
    if method_list is not None and "method" in runner.decomposition_args:  # tucker candidates would silently take it
        raise OneLineBadParameter(f"{model_args!r}: method is set per candidate by --method; give the methods there", param_hint="'--model-args'")
    runner.keep_doc_scores = confidence is not None  # the paired bound needs each document's score
    runner.check_specs(c.spec for c in candidates)  # a rank too large fails here, not after earlier candidates ran
    _check_tasks(runner, limit_list[0])
    click.echo(f"{len(candidates)} candidates, rungs at limit {', '.join(map(str, limit_list))}, tolerance {tolerance:g}, objective {objective}", err=True)
    try:
        res = run_search(
            candidates, runner.evaluate, tolerance, limits=limit_list, objective=objective, eta=eta, prune_margin=prune_margin, aggregate=aggregate, log=lambda s: click.echo(s, err=True), confidence=confidence,
            family_wise=family_wise, tie_break=tie_break,
        )
    except BaselineError as exc:
        raise click.ClickException(str(exc)) from None
    for note in res.notes:
        click.echo(f"note: {note}")
    best = res.best
    click.echo(f"objective: {objective} (used: {res.objective_used}); tolerance {tolerance:g} ({aggregate} drop over {', '.join(runner.tasks)}), decided at limit {best.limit}")
    level = f"{confidence}{' family-wise' if family_wise else ''}"

    def described(e: Any) -> str:
        bound = f" (upper {level} bound {100 * e.row['drop_upper']:+.1f})" if "drop_upper" in e.row else ""
        return f"{e.candidate.name}: drop {100 * e.drop:+.1f} pts{bound}, parameter reduction {100 * e.row.get('param_reduction', 0):.2f}%, objective {e.objective:.4g} (dense {res.dense.objective:.4g})"

    # the candidate whose latency is shown: the chosen one, or the cheapest feasible one when dense beat it
    shown = res.cheapest_candidate if best.candidate.is_dense else best
    if best.candidate.is_dense:
        click.echo("chosen: dense (no decomposition)")
        if shown is not None:
            click.echo(f"cheapest feasible candidate: {described(shown)}")
    else:
        click.echo(f"chosen: {described(best)}")
    if shown is not None:
        pct = f"{res.latency_level:.0%}"
        vs = res.latency_vs_dense
        if isinstance(vs, LatencyRatio):
            click.echo(f"latency vs dense: {vs.ratio:.3f} [{vs.lower:.3f}, {vs.upper:.3f}] ({pct} interval, paired over {vs.calls} batches)")
        elif vs is not None:
            click.echo(f"latency vs dense: n/a: {vs}")
        if res.latency_ties:
            fastest = res.fastest
            assert fastest is not None
            tied = "; ".join(f"{e.candidate.name} {r.ratio:.3f} [{r.lower:.3f}, {r.upper:.3f}]" for e, r in res.latency_ties)
            click.echo(f"within the timing noise of the fastest, {fastest.candidate.name} (latency ratio to it, {pct} paired interval reaching 1): {tied}")
            if best is not fastest:
                click.echo(f"tie-break params: chose the most compressed of these over {fastest.candidate.name}")
            elif any(e.row.get("param_reduction", 0) > fastest.row.get("param_reduction", 0) for e, _ in res.latency_ties):
                click.echo("these timings do not separate them: --tie-break params would pick the most compressed")
    args = runner.model_args_string(best.candidate.spec)
    # always quoted: '|' in layers would otherwise be a shell pipe
    click.echo("--model_args " + (shlex.quote(args) if "'" in args else f"'{args}'"))
    click.echo(f"evaluations: {len(res.history)} ({runner.evaluated} run now, the rest from the store)")
    click.echo("Pareto front (parameter reduction vs accuracy drop, last rung):")
    upper = confidence is not None
    click.echo(f"  {'reduction':>9}  {'drop (pts)':>10}  " + (f"{'upper bound':>11}  " if upper else "") + f"{'objective':>10}  config")
    for e in pareto_front(res.final):
        bound = (f"{100 * e.row['drop_upper']:+11.1f}  " if "drop_upper" in e.row else f"{'-':>11}  ") if upper else ""
        click.echo(f"  {100 * e.row.get('param_reduction', 0):8.2f}%  {100 * e.drop:+10.1f}  {bound}{e.objective:10.4g}  {e.candidate.name}{'  (feasible)' if e.row.get('feasible') else ''}")
