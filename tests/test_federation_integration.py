"""A site dies on a real consortium on 127.0.0.1: SuperLink and SuperNodes as processes, TLS with
generated certificates, generated slides read through OpenSlide, Opacus DP at every site.

The test starts its processes through ``LocalConsortium`` (free ports, pid files) and stops every one
of them, by PID, when it ends; every wait is bounded. The server's death is in
``test_server_restart.py``: each is a few minutes of real rounds, and files are what pytest-xdist
spreads over its processes.
"""

from __future__ import annotations

import json

import pytest

from server.audit import verify
from server.run_control import follow_run, submit_and_follow
from server.run_folder import RunFolder
from simulations.local_consortium import LocalConsortium
from tests.conftest import copy_hospitals
from tests.consortium_runs import RUN_TIMEOUT, TRAINING, accept_two_site_rounds, trained_sites, wait_for_model

pytestmark = pytest.mark.slow(seconds=520)  # in CI, three processes on two cores


def test_site_killed_during_secure_aggregation_and_rejoins(prepared_hospitals, tmp_path):
    sites = copy_hospitals(prepared_hospitals, tmp_path, 3)
    accept_two_site_rounds(sites)
    # six rounds: a restarted site is refused while the SuperLink still holds its old session (about a
    # minute) and its supervisor backs off; rounds here take about 20 s
    settings = {"federation": {"rounds": 6, "min_sites": 2, "round_timeout": 60}, "training": TRAINING}
    with LocalConsortium(tmp_path / "consortium", sites, server_settings=settings) as consortium:
        assert consortium.config.secure_aggregation.enabled  # the default
        consortium.start_all()
        folder = RunFolder.create(consortium.server_yaml)
        submit_and_follow(consortium.control, folder, follow=False)
        assert wait_for_model(folder, 1)["sites_this_round"] == ["site-1", "site-2", "site-3"]
        consortium.kill_site(1)  # a hospital machine dies in round 2, amid the SecAgg+ stages
        consortium.start_site(1)  # and comes back (same key, same node id)
        run_id = folder.run_info()["flower_runs"][-1]
        assert follow_run(consortium.control, folder, run_id, timeout=RUN_TIMEOUT) == 0

    rounds = json.loads((folder.path / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4, 5, 6]
    assert trained_sites(rounds, 2) == {"site-1", "site-3"}  # unmasked without the dead site's update
    # the restarted site is refused while the SuperLink still holds its old session, then trains
    # again (its supervisor retries; the server sees it back within a few rounds)
    assert trained_sites(rounds, 6) == {"site-1", "site-2", "site-3"}
    assert verify(folder.audit_log, folder.status()["audit_last_hash"]) == 7
