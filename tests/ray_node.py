"""Run one extra Ray worker node on 127.0.0.1, joined to the head at argv[1], until SIGTERM.

`ray start --address` cannot do this: Ray's CLI rewrites 127.0.0.1 to the host's outward
address for a node that is not the head (ray-project/ray#59110), and the tests keep every Ray
process on loopback. This starts the same node `ray start --block` starts, with the address
as given (what ray.cluster_utils.Cluster, Ray's own multi-node test helper, does).
"""

from __future__ import annotations

import signal
import sys
import time

import ray._private.node
import ray._private.parameter


def main() -> None:
    gcs_address, temp_dir = sys.argv[1], sys.argv[2]
    params = ray._private.parameter.RayParams(
        node_ip_address="127.0.0.1",
        gcs_address=gcs_address,
        num_cpus=1,
        object_store_memory=80 * 2**20,
        include_log_monitor=False,
        node_manager_port=0,
        temp_dir=temp_dir,
        resources={"extra_node": 1},
    )
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)

    def stop(*_: object) -> None:
        node.kill_all_processes(check_alive=False, allow_graceful=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print("started", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
