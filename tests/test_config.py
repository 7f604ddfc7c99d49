"""The fast_failover section: defaults, and one clear error per bad value naming the key."""
import glob
import json
import os

import pytest

from fftrainer_ds import ConfigError, FastFailoverConfig, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_absent_section_is_disabled():
    assert parse_config({"train_batch_size": 8}).enabled is False
    assert parse_config(None).enabled is False


def test_present_section_defaults():
    c = parse_config({"fast_failover": {}})
    assert c.enabled and c.snapshot_interval_steps == 1 and c.replication_factor == 1
    assert c.heartbeat_timeout_s == 3.0 and c.max_overhead_pct == 2.0 and c.chunk_bytes == 4 << 20


@pytest.mark.parametrize("section,key,text", [
    ({"snapshot_interval_steps": 0}, "fast_failover.snapshot_interval_steps", '>= 1 or "auto"'),
    ({"snapshot_interval_steps": "often"}, "fast_failover.snapshot_interval_steps", "got 'often'"),
    ({"snapshot_interval_steps": True}, "fast_failover.snapshot_interval_steps", '>= 1 or "auto"'),
    ({"snapshot_backend": "gpu"}, "fast_failover.snapshot_backend", "'native'"),
    ({"replication_factor": -1}, "fast_failover.replication_factor", "greater than or equal to 0"),
    ({"replication_backend": "mpi"}, "fast_failover.replication_backend", "'gloo' or 'nccl'"),
    ({"chunk_mb": 0}, "fast_failover.chunk_mb", "greater than 0"),
    ({"heartbeat_timeout_s": "soon"}, "fast_failover.heartbeat_timeout_s", "valid number"),
    ({"max_snapshot_buffers": 1}, "fast_failover.max_snapshot_buffers", "greater than or equal to 2"),
    ({"heatbeat_timeout_s": 3}, "fast_failover.heatbeat_timeout_s", "unknown key; allowed keys:"),
    ({"persist_interval_steps": 10}, "persist_interval_steps", "needs persist_dir"),
])
def test_bad_values_name_the_key(section, key, text):
    with pytest.raises(ConfigError) as info:
        parse_config({"fast_failover": section})
    msg = str(info.value)
    assert key in msg and text in msg
    assert "\n" not in msg  # one error, one line


def test_removed_heartbeat_interval_key_points_to_the_launcher():
    with pytest.raises(ConfigError) as info:
        parse_config({"fast_failover": {"heartbeat_interval_s": 0.5}})
    msg = str(info.value)
    assert msg.startswith("fast_failover.heartbeat_interval_s: ")
    assert "fftrainer-launch --heartbeat-interval-s" in msg and "unknown key" not in msg
    assert "heartbeat_interval_s" not in FastFailoverConfig.model_fields


def test_section_must_be_an_object():
    with pytest.raises(ConfigError, match="fast_failover: must be a JSON object"):
        parse_config({"fast_failover": [1]})


def test_every_field_has_a_docstring_and_is_in_readme():
    readme = open(os.path.join(ROOT, "README.md")).read()
    for name, field in FastFailoverConfig.model_fields.items():
        assert field.description, f"{name} has no docstring"
        assert f"`{name}`" in readme, f"{name} is not documented in README.md"


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.json"))))
def test_shipped_configs_validate(path):
    with open(path) as f:
        assert parse_config(json.load(f)).enabled
