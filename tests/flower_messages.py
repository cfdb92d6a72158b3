"""Flower Messages for unit tests, built with Flower's public Message / RecordDict API the way the
server and the site build them (legacy record names as flwr/compat/common/recorddict_compat.py
writes them)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

SERVER_NODE, SITE_NODE, RUN_ID = 1, 5, 7


@contextmanager
def _as_server_task():
    """An instruction message takes its run and source from the task identity of the process that
    makes it (the ServerApp's, in a real run)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SERVER_NODE, 11
    try:
        yield
    finally:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = saved


def server_message(content: RecordDict | None = None, message_type: str = "train", round_: int = 1,
                   stage: str | None = None) -> Message:
    """A message from the server to this site; ``stage`` makes it a SecAgg+ stage."""
    content = RecordDict() if content is None else content
    if stage is not None:
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({Key.STAGE: stage})
    with _as_server_task():
        return Message(content, dst_node_id=SITE_NODE, message_type=message_type, group_id=str(round_))


def server_message_to(node: int, content: RecordDict, group: str) -> Message:
    """A training message from the server to ``node`` in round ``group``."""
    with _as_server_task():
        return Message(content, dst_node_id=node, message_type="train", group_id=group)


def site_context() -> Context:
    return Context(run_id=RUN_ID, node_id=SITE_NODE, node_config={}, state=RecordDict(), run_config={})


def fit_reply(message: Message, metrics: dict, examples: int = 12, arrays: bool = False,
              status: str = "Success", extra: dict | None = None) -> Message:
    """A legacy training reply: update arrays (cleared under SecAgg+), patient count, metrics, status."""
    update = {"0": Array(np.ones((3, 2), np.float32))} if arrays else {}
    content = RecordDict({
        "fitres.parameters": ArrayRecord(update),
        "fitres.num_examples": MetricRecord({"num_examples": examples}),
        "fitres.metrics": ConfigRecord(metrics),
        "fitres.status": ConfigRecord({"code": 0, "message": status}),
        **(extra or {}),
    })
    return Message(content, reply_to=message)


def evaluate_reply(message: Message, metrics: dict, loss: float = 0.5, examples: int = 4) -> Message:
    return Message(RecordDict({
        "evaluateres.loss": MetricRecord({"loss": loss}),
        "evaluateres.num_examples": MetricRecord({"num_examples": examples}),
        "evaluateres.metrics": ConfigRecord(metrics),
        "evaluateres.status": ConfigRecord({"code": 0, "message": "Success"}),
    }), reply_to=message)


def secagg_reply(message: Message, values: dict, base: Message | None = None) -> Message:
    """A SecAgg+ stage's reply: the protocol's values in its config record (added to ``base``'s
    content, as Flower's mod does with the training reply in the masked-vector stage)."""
    content = RecordDict() if base is None else base.content
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(values)
    return Message(content, reply_to=message)
