"""A site's real evaluate handler as an attacking server drives it, and which of the site's
cases each cell of its reply covers (what the attack tests check releases against)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict

from radfed.config import RunConfig
from radfed.data.loading import load_site_for
from radfed.federation.packing import pack
from radfed.federation.schema import unpack_cells
from radfed.metrics.cells import SMALL_GROUPS
from radfed.site.handlers import handle_evaluate
from radfed.tasks.classification import TASK, build_model
from tests.helpers import make_context, make_message


def evaluate(site: Path, config: RunConfig, server_round: int = 1, run_id: int = 1) -> Message:
    """The reply of site ``site-a`` at ``site`` to an evaluation of the run's initial model."""
    content = RecordDict(
        {
            "arrays": pack(build_model(config).state_dict()),
            "config": ConfigRecord({"server-round": server_round}),
        }
    )
    message = make_message(
        content, message_type="evaluate", src_node_id=0, dst_node_id=1, run_id=run_id
    )
    node = {"site-name": "site-a", "data-path": str(site)}
    return handle_evaluate(message, make_context(config.to_run_config(), node))


def released_positions(site: Path, config: RunConfig, reply: Message) -> list[list[int]]:
    """Per cell the reply released (suppressed ones left out), the positions of its cases
    in the site's validation split, from the site's own attributes; each checked against
    the cell's case count."""
    attributes = load_site_for(site, config).splits["val"].attributes
    cells = unpack_cells(
        TASK,
        reply.content["metrics"],  # type: ignore[arg-type]
        reply.content.config_records["cells"],
        config,
    )["val"]
    named: dict[str, set[str]] = {}
    for cell in cells:
        named.setdefault(cell.attribute, set()).add(cell.group)
    out = []
    for cell in cells:
        if not cell.stats.suppressed:
            inside = [i for i, case in enumerate(attributes) if _in(case, cell, named)]
            assert len(inside) == cell.stats.n
            out.append(inside)
    return out


def _in(case: Mapping[str, str], cell: object, named: Mapping[str, set[str]]) -> bool:
    attribute, group = cell.attribute, cell.group  # type: ignore[attr-defined]
    if attribute == "all":
        return True
    value = "|".join(case.get(p, "unknown") for p in attribute.split("*"))
    if group == SMALL_GROUPS:
        return value not in named[attribute] - {SMALL_GROUPS}
    return value == group
