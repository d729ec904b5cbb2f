"""cluster.yaml is a valid Ray cluster-launcher config, pinned to our Ray, with no credentials in it."""

import json
import re
from pathlib import Path

import jsonschema
import ray
import tomllib
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]


def test_cluster_yaml_validates_against_rays_schema():
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(cfg))  # what `ray up` does: fill the AWS defaults, then validate


def test_cluster_pins_the_project_ray_and_has_gpu_workers_with_an_instance_profile():
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    pinned = next(
        d
        for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("ray[")
    )
    assert pinned.endswith(f"=={ray.__version__}")
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-") and cfg["docker"]["image"].endswith(
        "-gpu"
    )
    assert cfg["provider"]["type"] == "aws"
    workers = {name: t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]}
    assert all(re.match(r"(g6|g5|p4d|p5)\.", t["node_config"]["InstanceType"]) for t in workers.values())
    assert all(t["min_workers"] <= t["max_workers"] for t in workers.values())
    assert all("IamInstanceProfile" in t["node_config"] for t in cfg["available_node_types"].values())
    assert any("pip install" in c and "prisma-ray" in c for c in cfg["setup_commands"])


def test_cluster_yaml_holds_no_credentials():
    text = (REPO / "cluster.yaml").read_text().lower()
    assert not re.search(r"akia[0-9a-z]{16}|aws_secret_access_key|aws_access_key_id|ssh_private_key", text)
