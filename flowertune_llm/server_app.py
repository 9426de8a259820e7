"""ServerApp: config -> preflight -> initial adapter -> FedAvg.start(...) -> checkpoints."""

from __future__ import annotations

from logging import INFO

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from flowertune_llm.checkpoint import Checkpointer, checkpoint_rounds, new_run_dir
from flowertune_llm.config import parse_config
from flowertune_llm.models import initial_adapter, state_to_arrays
from flowertune_llm.preflight import preflight
from flowertune_llm.strategy import FlowerTuneFedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num-server-rounds` of federated SFT and save PEFT checkpoints."""
    cfg = parse_config(context.run_config)
    preflight(cfg, num_nodes=len(list(grid.get_node_ids())))

    state, peft_config = initial_adapter(cfg.model, cfg.train.seed)
    strategy = FlowerTuneFedAvg(
        lr_schedule=cfg.lr,
        fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
    )
    run_dir = new_run_dir(cfg.train.output_dir)
    checkpointer = Checkpointer(
        run_dir,
        peft_config,
        checkpoint_rounds(cfg.num_server_rounds, cfg.train.save_every_round),
        metadata=lambda rnd: {
            "round": rnd,
            "num_server_rounds": cfg.num_server_rounds,
            "config_fingerprint": cfg.fingerprint(),
            "comm_total_mb": strategy.comm.total_payload_mb,
            "comm_total_with_keys_mb": strategy.comm.total_with_keys_mb,
            "config": cfg.to_dict(),
        },
    )
    log(INFO, "Checkpoints will be written to %s", run_dir)
    strategy.start(
        grid=grid,
        initial_arrays=state_to_arrays(state),
        num_rounds=cfg.num_server_rounds,
        train_config=ConfigRecord(),
        evaluate_fn=checkpointer,
    )
    log(
        INFO,
        "Done: %d rounds, communication %.2f MB (%.2f MB with keys); checkpoints: %s",
        cfg.num_server_rounds,
        strategy.comm.total_payload_mb,
        strategy.comm.total_with_keys_mb,
        ", ".join(str(p) for p in checkpointer.saved),
    )
