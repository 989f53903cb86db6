"""``lm-eval-lowrank gate``: fail CI when compressed accuracy drops more than a tolerance.

Thin wrapper over :mod:`lm_eval_lowrank.gate`; no torch import.

Exit codes: 0 every gated task within tolerance; 1 a task dropped too far or is
missing from either file, the compressed run cut less than --min-reduction, or the
runs are not comparable (another num_fewshot or number of documents);
2 usage or input error (missing/unreadable file, bad JSON, not an lm-eval results
file, bad option).
"""

from __future__ import annotations

import json
import sys

import click

from .. import gate as g
from .errors import InputError


class GateInputError(InputError):
    """One-line ``Error: ...`` and exit code 2, for problems with the inputs."""

    exit_code = g.EXIT_USAGE


@click.command(
    "gate",
    epilog=(
        "Exit codes: 0 pass; 1 a task dropped more than the tolerance (with --confidence: FAIL, or UNSURE "
        "unless --unsure pass) or is missing from a file, the run cut less than --min-reduction, or the runs are not comparable "
        "(another num_fewshot or number of documents, unless --allow-incomparable); 2 usage or input error.\n\n"
        "Primary metric per task: --metric TASK=METRIC, else --metric METRIC where the task "
        "reports it, else the first of " + ", ".join(g.PREFERRED_METRICS) + ", else the task's "
        "first metric; filter 'none', else 'strict-match', else the first. For lower-is-better "
        "metrics (perplexity, bits_per_byte) the drop is the increase."
    ),
)
@click.argument("results", metavar="RESULTS", type=click.Path(dir_okay=True, file_okay=True))
@click.option(
    "--baseline",
    required=True,
    type=click.Path(dir_okay=True, file_okay=True),
    help="Dense run: a results JSON or the --output_path folder lm-eval wrote (newest results_<timestamp>.json is used).",
)
@click.option(
    "--max-drop",
    "max_drop",
    multiple=True,
    required=True,
    metavar="NUMBER|TASK=NUMBER",
    help="Largest allowed drop, in metric units (0.03 = 3 accuracy points); repeat TASK=NUMBER for per-task tolerances.",
)
@click.option(
    "--tasks",
    multiple=True,
    metavar="TASK[,TASK...]",
    help="Tasks or groups to gate (default: every top-level task and group in the baseline).",
)
@click.option(
    "--metric",
    multiple=True,
    metavar="METRIC|TASK=METRIC",
    help="Metric to gate on, e.g. acc_norm or gsm8k=exact_match,flexible-extract (repeatable).",
)
@click.option("--relative", is_flag=True, help="Measure the drop relative to the baseline value (0.05 = 5%).")
@click.option("--subtasks", is_flag=True, help="Also gate every subtask of the selected groups.")
@click.option(
    "--confidence",
    type=float,
    default=None,
    metavar="LEVEL",
    help=(
        "Gate each drop on its one-sided confidence bounds at LEVEL (e.g. 0.95): PASS when the upper bound is within "
        "the tolerance, FAIL when the lower bound exceeds it, UNSURE between. The standard error is paired over "
        "documents when both runs used --log_samples (the samples files beside the results), else lm-eval's stderr."
    ),
)
@click.option(
    "--unsure",
    type=click.Choice(["fail", "pass"]),
    default="fail",
    show_default=True,
    help="What an UNSURE verdict does to the exit code (with --confidence).",
)
@click.option(
    "--family-wise",
    is_flag=True,
    help="With --confidence: make LEVEL hold for all gated tasks together (Bonferroni), e.g. with --subtasks.",
)
@click.option(
    "--min-reduction",
    type=float,
    default=None,
    metavar="FRACTION",
    help="Also fail unless the compressed run cut at least this fraction of the parameters (e.g. 0.05), so that a change that leaves the model dense cannot pass.",
)
@click.option(
    "--allow-incomparable",
    is_flag=True,
    help="Gate runs with another num_fewshot or number of documents anyway (warned); without it they fail.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print a JSON verdict on stdout; the table then goes to stderr."
)
def gate(
    results: str,
    baseline: str,
    max_drop: tuple[str, ...],
    tasks: tuple[str, ...],
    metric: tuple[str, ...],
    relative: bool,
    subtasks: bool,
    confidence: float | None,
    unsure: str,
    family_wise: bool,
    min_reduction: float | None,
    allow_incomparable: bool,
    as_json: bool,
) -> None:
    """Compare RESULTS (compressed run) against --baseline (dense run).

    Both are lm-eval results JSON files or the folders lm-eval wrote with --output_path.
    """
    try:
        default_drop, task_drop = g.parse_max_drop(max_drop)
        default_metric, task_metric = g.parse_metric_options(metric)
        base = g.load_results(baseline)
        comp = g.load_results(results)
        outcome = g.run_gate(
            base,
            comp,
            max_drop=default_drop,
            task_max_drop=task_drop,
            tasks=g.parse_tasks(tasks),
            metric=default_metric,
            task_metric=task_metric,
            relative=relative,
            subtasks=subtasks,
            confidence=confidence,
            unsure_passes=unsure == "pass",
            family_wise=family_wise,
            min_reduction=min_reduction,
            allow_incomparable=allow_incomparable,
        )
    except g.GateError as exc:
        raise GateInputError(str(exc)) from None

    click.echo(g.format_table(outcome), err=as_json)
    if as_json:
        click.echo(json.dumps(g.to_json(outcome), indent=2))
    # sys.exit, not ctx.exit: the group runs with standalone_mode=False, where a
    # ctx.exit code would be returned and dropped instead of reaching the shell.
    sys.exit(outcome.exit_code)
