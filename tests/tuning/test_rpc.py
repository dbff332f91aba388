"""Distributed tuning on TVM's RPC tracker: a tracker and two servers on
loopback, started and stopped here; candidates are built in this process and
timed on the servers."""
from __future__ import annotations

import pytest

from soniq_tvm.tuning.database import TuningDatabase

from .conftest import FAST

pytestmark = pytest.mark.tune


@pytest.mark.slow
def test_tuning_through_an_rpc_tracker_with_two_servers(tmp_path, model_path):
    import soniq_tvm
    from soniq_tvm.tuning import LocalCluster, MeasureConfig

    db = tmp_path / "rpc.db"
    with LocalCluster(servers=2, key="soniq-test") as cluster:
        assert cluster.rpc().servers() == 2
        r = soniq_tvm.tune(model_path, "llvm", str(db), trials=6, ms_trials=2, split="always", rpc=cluster.rpc(), progress=False,
                           measure=MeasureConfig(**FAST))
        procs = list(cluster.procs)
    assert all(p.poll() is not None for p in procs)  # the cluster is gone
    assert r.runner.startswith("rpc 127.0.0.1:") and r.measured >= 4
    with TuningDatabase(db, create=False) as d:
        recs = d.records()
    ok = [x for x in recs if x.ok]
    assert ok and all(x.machine.get("rpc", "").endswith("key=soniq-test") for x in recs)
    assert {x.workload.split(":")[0] for x in ok} == {"qop", "ms"}


def test_unreachable_tracker_is_a_soniq_error(tmp_path, model_path):
    from soniq_tvm.errors import SoniqError
    from soniq_tvm.tuning import RPC
    from soniq_tvm.tuning.rpc import free_port

    with pytest.raises(SoniqError, match="RPC tracker"):
        RPC(f"127.0.0.1:{free_port()}", "nobody", session_timeout_s=2).servers()
    with pytest.raises(SoniqError, match="HOST:PORT"):
        RPC("no-port", "k").servers()
