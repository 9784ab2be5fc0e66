"""The playbook's decision table (daemon/playbook.py ``decide``): each row, with its reason."""

from __future__ import annotations

import pytest

from runwatch.daemon.config import Playbook as PlaybookConfig
from runwatch.daemon.playbook import Incident, Reason, decide


def incident(state: str, rewinds: int = 0) -> Incident:
    return Incident(id=1, run="r", state=state, rule="x", first_step=10, rewinds=rewinds, watch_from=10)


AUTO, MANUAL = PlaybookConfig(), PlaybookConfig(auto_rewind=False)


@pytest.mark.parametrize(("open_", "actions", "cfg", "commands", "state", "reason"), [
    (None, {"pause", "dump_batch"}, AUTO, ["pause", "dump_batch", "rewind"], "rewinding",
     Reason.NEW_INCIDENT_REWIND),
    (None, {"pause"}, MANUAL, ["pause"], "paused", Reason.NEW_INCIDENT_HOLD),
    (None, {"dump_stacks"}, AUTO, ["dump_stacks"], "watching", Reason.DATA_ONLY),
    (None, {"skip_shard", "dump_batch"}, AUTO, ["dump_batch", "skip_shard"], "watching", Reason.DATA_ONLY),
    (None, {"escalate", "dump_batch"}, AUTO, ["pause", "dump_batch"], "escalated", Reason.RULE_ESCALATES),
    # A stall's stack dump opened the incident; a spike that follows is a first fault: in manual
    # mode it pauses and waits, it is not "the fault came back after a rewind".
    (incident("watching"), {"pause"}, MANUAL, ["pause"], "paused", Reason.NEW_INCIDENT_HOLD),
    (incident("watching"), {"pause"}, AUTO, ["pause", "rewind"], "rewinding", Reason.NEW_INCIDENT_REWIND),
    (incident("watching", rewinds=1), {"pause"}, AUTO, ["pause", "rewind"], "rewinding",
     Reason.RECURRED_REWIND),
    (incident("watching", rewinds=2), {"pause", "dump_batch"}, AUTO, ["pause", "dump_batch"], "escalated",
     Reason.RECURRED_TOO_OFTEN),
    (incident("paused"), {"pause"}, AUTO, [], "paused", Reason.ALREADY_HANDLING),
    (incident("escalated", rewinds=2), {"rewind"}, AUTO, [], "escalated", Reason.ALREADY_HANDLING),
])
def test_each_row_of_the_table(open_: Incident | None, actions: set[str], cfg: PlaybookConfig,
                               commands: list[str], state: str, reason: Reason) -> None:
    d = decide(open_, actions, cfg)
    assert (d.commands, d.state, d.reason) == (commands, state, reason)
    assert d.escalate == (state == "escalated" and reason is not Reason.ALREADY_HANDLING)
