"""plain_flower ClientApp: read this site's DICOM files, train, evaluate (Message API)."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from task import Net, load_data
from task import test as test_fn
from task import train as train_fn
from torch.utils.data import DataLoader

app = ClientApp()
device = "cuda" if torch.cuda.is_available() else "cpu"


def _site(msg: Message, context: Context) -> Path:
    """The partition-id-th site folder of the data root (as radfed simulate assigns them)."""
    root = Path(str(msg.content["config"]["data-root"]))
    sites = sorted(p for p in root.iterdir() if (p / "manifest.csv").is_file())
    return sites[int(context.node_config["partition-id"])]


def _model(msg: Message) -> torch.nn.Module:
    model = Net(int(msg.content["config"]["seed"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this site's train split."""
    config = msg.content["config"]
    model = _model(msg)
    trainset = load_data(
        _site(msg, context), "train", int(config["image-size"]), int(config["seed"])
    )
    loader = DataLoader(trainset, batch_size=int(config["batch-size"]), shuffle=True)
    loss = train_fn(model, loader, int(config["local-epochs"]), float(config["lr"]), device)
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(trainset)})
    content = RecordDict({"arrays": ArrayRecord(model.to("cpu").state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this site's validation split."""
    config = msg.content["config"]
    model = _model(msg)
    valset = load_data(_site(msg, context), "val", int(config["image-size"]), int(config["seed"]))
    loss, accuracy = test_fn(model, DataLoader(valset, batch_size=64), device)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": accuracy, "num-examples": len(valset)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
