"""Scale-out on Ray (an optional extra, requirements/ray.txt): one task per episode gives what the serial run gives,
for closed-loop evaluation and data generation; with CARLA servers each worker keeps its own server."""
from __future__ import annotations

import json
import sys

import pytest

from spanvla_ros.distributed import parse_servers, run_episodes

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install -r requirements/ray.txt); "
                                        "not installed here")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield "local"
    ray.shutdown()


def test_server_lists_parse_and_a_serial_run_uses_the_first():
    assert parse_servers("gpu1:2000, gpu2:2002") == [("gpu1", 2000), ("gpu2", 2002)] and parse_servers("") == []
    with pytest.raises(ValueError, match="host:port"):
        parse_servers("gpu1")
    assert run_episodes(lambda job, server: (job, server), [1, 2], servers=[("h", 1)]) == [(1, ("h", 1)), (2, ("h", 1))]


def test_each_ray_worker_keeps_its_own_server(local_ray):
    servers = [("carla-a", 2000), ("carla-b", 2000)]
    out = run_episodes(lambda job, server: (job, server), list(range(6)), local_ray, servers=servers)
    assert [job for job, _ in out] == list(range(6))                      # in order
    assert {server for _, server in out} == set(servers)                  # both servers serve


@pytest.mark.slow
def test_closed_loop_on_ray_equals_the_serial_run(local_ray, tmp_path):
    from spanvla_ros.eval.closed_loop import main

    args = ["--driver", "constant_velocity", "--scenarios", "highway,cut_in", "--seeds", "10000:10002"]
    assert main(args + ["--out", str(tmp_path / "serial.json")]) == 0
    assert main(args + ["--out", str(tmp_path / "ray.json"), "--ray-address", local_ray, "--workers", "2"]) == 0
    serial, on_ray = (json.loads((tmp_path / f).read_text()) for f in ("serial.json", "ray.json"))
    assert len(serial["episodes"]) == 4 and on_ray == serial


@pytest.mark.slow
def test_data_generation_on_ray_equals_the_serial_run(local_ray, tmp_path):
    from spanvla_ros.data.generate import generate

    serial = generate(tmp_path / "serial", ["highway", "lead_brake"], [3], ("expert",), progress=False)
    on_ray = generate(tmp_path / "ray", ["highway", "lead_brake"], [3], ("expert",), progress=False,
                      ray_address=local_ray, workers=2)
    for idx in (serial, on_ray):
        idx.pop("generation_s")
    assert on_ray == serial and len(serial["samples"]) > 10
