"""ServerApp: config -> preflight -> initial (or resumed) adapter -> FedAvg.start -> validation, checkpoints."""

from __future__ import annotations

from dataclasses import asdict
from logging import INFO, WARNING

import flowertune_llm.ml_stack  # noqa: F401  first: Flower imports both apps at once (see ml_stack.py)
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from flowertune_llm.checkpoint import Checkpointer, checkpoint_metadata, checkpoint_rounds, load_resume
from flowertune_llm.config import ConfigError, parse_config
from flowertune_llm.gguf import GgufError
from flowertune_llm.logs import one_line_errors
from flowertune_llm.metrics import RunLog
from flowertune_llm.rundir import checkpoint_name, new_run_dir, read_metrics, set_aside_checkpoints_after
from flowertune_llm.evaluate.validation import Validator
from flowertune_llm.devices import set_process_threads
from flowertune_llm.models import arrays_to_state, initial_adapter, state_to_arrays
from flowertune_llm.preflight import federation_warning, preflight
from flowertune_llm.schedule import Coverage
from flowertune_llm.strategy import CommStats, FederationError, TimedGrid, build_strategy, with_dp

app = ServerApp()
one_line_errors((ConfigError, GgufError, FederationError))  # a bad input ends the run with its message, no traceback


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) federated SFT for `num-server-rounds` and save PEFT checkpoints."""
    num_nodes = len(list(grid.get_node_ids()))
    if warning := federation_warning(num_nodes):  # first: before anything slow happens
        log(WARNING, "%s", warning)
    cfg = parse_config(context.run_config)
    set_process_threads()  # evaluation runs between rounds, while the ClientApps wait
    resume = load_resume(cfg) if cfg.train.resume_from else None
    checked = preflight(cfg)

    if resume is None:
        state, peft_config = initial_adapter(cfg.model, cfg.train.seed)
        run_dir, done, comm = new_run_dir(cfg.train.output_dir), 0, CommStats()
        coverage = Coverage(cfg.train.seed, cfg.train.dynamic_data_seed)
    else:
        state, peft_config, run_dir, done = resume.state, resume.peft_config, resume.run_dir, resume.round
        comm = CommStats(**resume.comm_total_bytes)
        coverage = Coverage.replay(cfg.train.seed, cfg.train.dynamic_data_seed,
                                   [m for m in read_metrics(run_dir) if m.get("server_round", 0) <= done])
        log(INFO, "Resuming %s after round %d", run_dir, done)
        if (aside := set_aside_checkpoints_after(run_dir, done)) is not None:  # the final checkpoint is this run's
            log(WARNING, "Checkpoints after round %d (an abandoned continuation) moved to %s", done, aside)
    strategy = build_strategy(
        cfg.strategy.name,
        lr_schedule=cfg.lr,
        fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
        seed=cfg.train.seed,
        round_offset=done,
        comm=comm,
        wire_dtype=cfg.comm.dtype,
        min_replies=cfg.strategy.min_replies,
        round_timeout=cfg.strategy.round_timeout,
        coverage=coverage,
        **dict(cfg.strategy.params),
    )
    run_info = {"run_config": dict(context.run_config), "num_nodes": num_nodes, "flower_run_id": context.run_id,
                "dataset_rows": checked.dataset_rows}
    run_log = RunLog(run_dir, cfg, last_round=done, run_info=run_info)
    checkpointer = Checkpointer(
        run_dir,
        peft_config,
        checkpoint_rounds(cfg.num_server_rounds, cfg.train.save_every_round),
        metadata=lambda rnd: checkpoint_metadata(cfg, rnd, asdict(strategy.comm)),
    )

    validate = Validator(cfg, peft_config, checked.questions) if checked.questions else None

    def on_round_end(server_round: int, arrays: ArrayRecord) -> None:
        """Strategy.start's evaluate_fn: validate and log the round, checkpoint when due."""
        rnd = server_round + done
        due = validate is not None and cfg.eval.due(rnd, cfg.num_server_rounds)
        if server_round == 0:
            if due and done == 0:  # a resumed run already has this point
                run_log.append_baseline(validate(arrays_to_state(arrays)))
            return
        round_log = strategy.rounds[rnd]
        if due:
            round_log.validation = validate(arrays_to_state(arrays))
        run_log.append(round_log)
        saved = checkpointer(rnd, arrays)
        if saved:
            run_log.checkpointed()
        if saved or due:
            run_log.plot()

    log(INFO, "Run folder: %s", run_dir)
    runner = with_dp(strategy, cfg.dp, num_nodes=num_nodes)
    run_log.set_status("running")
    try:
        runner.start(
            grid=TimedGrid(grid, strategy.round_timeout),  # type: ignore[arg-type]
            initial_arrays=state_to_arrays(state),
            num_rounds=cfg.num_server_rounds - done,
            train_config=ConfigRecord(),
            evaluate_fn=on_round_end,
        )
    except Exception as exc:
        run_log.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    run_log.finish("complete", checkpoint=run_dir / checkpoint_name(cfg.num_server_rounds))
    log(
        INFO,
        "Done: %d rounds, communication %.2f MiB (%.2f MiB with keys), peak memory per client %s; checkpoints in %s",
        cfg.num_server_rounds,
        strategy.comm.total_payload_mb,
        strategy.comm.total_with_keys_mb,
        f"{strategy.peak_mem_mb:,.0f} MiB" if strategy.peak_mem_mb is not None else "not reported",
        run_dir,
    )
