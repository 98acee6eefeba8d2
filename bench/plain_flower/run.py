"""Run the plain app with Flower's simulation engine (Ray), one node per site folder.

``python bench/plain_flower/run.py --data DATA --out OUT [--rounds 3 --local-epochs 3 ...]``
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from client_app import app as client_app
from flwr.simulation import run_simulation
from server_app import app as server_app

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--data", type=Path, required=True)
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--local-epochs", type=int, default=3)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--image-size", type=int, default=64)
parser.add_argument("--seed", type=int, default=42)
args = parser.parse_args()

sites = len([p for p in args.data.iterdir() if (p / "manifest.csv").is_file()])
os.environ["PLAIN_FLOWER_SETTINGS"] = json.dumps(
    {
        "data-root": str(args.data.resolve()),
        "local-epochs": args.local_epochs,
        "batch-size": args.batch_size,
        "lr": args.lr,
        "image-size": args.image_size,
        "seed": args.seed,
        "out": str(args.out.resolve()),
        "rounds": args.rounds,
        "sites": sites,
    }
)
gpus = 1.0 / sites if torch.cuda.is_available() else 0.0  # as radfed simulate shares a GPU
run_simulation(
    server_app=server_app,
    client_app=client_app,
    num_supernodes=sites,
    backend_config={  # the resources radfed simulate gives Ray
        "client_resources": {"num_cpus": 1, "num_gpus": gpus},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "include_dashboard": False,
            "logging_level": "ERROR",
            "log_to_driver": False,
        },
    },
)
