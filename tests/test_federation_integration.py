"""A site dies on a real consortium on 127.0.0.1: SuperLink and SuperNodes as processes, TLS with
generated certificates, generated slides read through OpenSlide, Opacus DP at every site.

The site dies after key sharing: its SuperNode and task runner are killed the moment its SuperNode says it
has pushed round 2's share_keys reply (its own log says so), so the server holds its key shares and must
remove its pairwise masks from the sum with the survivors' shares (SecAgg+'s dropout recovery).
The site comes back while the run goes on (refused at first: the SuperLink still holds its old
session for up to a minute), and trains in the next run. The test starts its processes through
``LocalConsortium`` (free ports, pid files) and stops every one of them, by PID, when it ends; every
wait is bounded. The server's death is in ``test_server_restart.py``: each is a few minutes of real
rounds, and files are what pytest-xdist spreads over its processes.
"""

from __future__ import annotations

import json

import pytest
import yaml

from client.egress_log import SENT, EgressLog
from client.site_config import load_site_config
from server.audit import verify
from server.run_control import follow_run, submit_and_follow
from server.run_folder import RunFolder
from simulations.local_consortium import LocalConsortium
from tests.conftest import copy_hospitals
from tests.consortium_runs import (
    RUN_TIMEOUT,
    TRAINING,
    accept_two_site_rounds,
    online_nodes,
    site_log_size,
    site_node,
    trained_sites,
    wait_for_model,
    wait_for_site_log,
)

pytestmark = pytest.mark.slow(seconds=480)  # in CI, three processes on two cores

# The SuperLink keeps a node online until 60 s after its last heartbeat (sent about every 24 s): a restarted
# site is refused until then, and its supervisor retries every 10 s at most meanwhile.
REJOIN_S = 180
# The kill must land before the site hands its masked vector to its SuperNode (its runner writes the reply to
# the egress log as sent then). Until 2026-12-05 it was triggered by the runner's "running the ClientApp" for
# the collect stage, so the window was the training alone, and one epoch on two patients took a few
# milliseconds, less than noticing the log line and killing. Now it is triggered by the SuperNode's "Sent
# successfully" after the share_keys reply: the window also holds the other sites' share_keys replies, the
# server's next push and the SuperNode's next pull (0.5 s or more), and the training of 50 epochs (under a
# second on an idle fast machine), at a learning rate 50 times smaller (the update stays within
# federation.max_update_norm).
KILL_WINDOW_EPOCHS = 50


def test_site_killed_during_secure_aggregation_and_rejoins(prepared_hospitals, tmp_path):
    sites = copy_hospitals(prepared_hospitals, tmp_path, 3)
    accept_two_site_rounds(sites)
    # round_timeout: a site's first training message imports torch and Opacus in its task runner; with the
    # suite's other consortia starting beside it that took over 60 s once (round 1 failed), so 120 s. The
    # dead site's stage in round 2 ends sooner: once its heartbeat has expired, the SuperLink answers for it
    # (node unavailable), 51-56 s after the kill here.
    settings = {"federation": {"rounds": 2, "min_sites": 2, "round_timeout": 120},
                "training": {**TRAINING, "epochs": KILL_WINDOW_EPOCHS,
                             "learning_rate": TRAINING["learning_rate"] / KILL_WINDOW_EPOCHS}}
    with LocalConsortium(tmp_path / "consortium", sites, server_settings=settings) as consortium:
        assert consortium.config.secure_aggregation.enabled  # the default
        consortium.start_all()
        folder = RunFolder.create(consortium.server_yaml)
        submit_and_follow(consortium.control, folder, follow=False)
        assert wait_for_model(folder, 1)["sites_this_round"] == ["site-1", "site-2", "site-3"]
        # a hospital machine dies in round 2 right after its key shares reached the SuperLink (Flower's SuperNode
        # logs "Sent successfully" once a reply's objects are pushed), before its masked vector
        shares = wait_for_site_log(sites[1], "round 2 train/share_keys: running the ClientApp")
        wait_for_site_log(sites[1], "Sent successfully", since=shares)
        consortium.kill_site(1)
        logged = site_log_size(sites[1])
        consortium.start_site(1)  # and comes back (same key, same node id)
        run_id = folder.run_info()["flower_runs"][-1]
        assert follow_run(consortium.control, folder, run_id, timeout=RUN_TIMEOUT) == 0

        # the restarted site is refused while the SuperLink still holds its old session; its supervisor
        # retries until the SuperLink takes it back, under the node id it always had (Flower's SuperNode logs
        # the id it activated with; the refused tries log none)
        node_id = site_node(consortium, "site-2")
        wait_for_site_log(sites[1], f"SuperNode ID: {node_id}\n", timeout=REJOIN_S, since=logged)
        assert node_id in online_nodes(consortium)
        document = yaml.safe_load(consortium.server_yaml.read_text())
        document["federation"]["rounds"] = 1
        consortium.server_yaml.write_text(yaml.safe_dump(document))
        code, again = consortium.run(timeout=RUN_TIMEOUT)
        assert code == 0, again.status()

    # it died after sending its key shares and before its masked vector: the others' shares unmasked the sum
    records = EgressLog(load_site_config(sites[1]).state_dir).verify()
    restarted = [i for i, r in enumerate(records) if r["event"] == "start"][1]  # what the killed runner sent:
    died_in = [(r["stage"], r["outcome"]) for r in records[:restarted]
               if r["event"] == "reply" and r["round"] == "2" and r["run"] == run_id]
    assert died_in == [("setup", SENT), ("share_keys", SENT)], died_in
    rounds = json.loads((folder.path / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert trained_sites(rounds, 2) == {"site-1", "site-3"}  # unmasked without the dead site's update
    assert verify(folder.audit_log, folder.status()["audit_last_hash"]) == 3
    assert trained_sites(json.loads((again.path / "metrics.json").read_text()), 1) == {"site-1", "site-2", "site-3"}
