"""plain_flower ServerApp: Flower's FedAvg over every site, settings from the environment."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from task import Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg; write the final model and the time each round ended (rounds.json)."""
    settings = json.loads(os.environ["PLAIN_FLOWER_SETTINGS"])
    out = Path(settings.pop("out"))
    rounds, sites = settings.pop("rounds"), settings.pop("sites")
    ended: list[float] = []

    def mark(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        ended.append(time.time())  # called before round 1 and after every round
        return None

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=sites)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(Net(settings["seed"]).state_dict()),
        num_rounds=rounds,
        train_config=ConfigRecord(settings),
        evaluate_config=ConfigRecord(settings),
        evaluate_fn=mark,
    )
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result.arrays.to_torch_state_dict(), out / "final_model.pt")
    (out / "rounds.json").write_text(json.dumps({"round_ended_at": ended}))
