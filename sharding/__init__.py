"""Physical placement of kimi_jax on a device mesh (axes `data`, `expert`, `tensor`).

The model names only logical axes; this package maps them to mesh axes through one rules table
(`rules.py`), derives every parameter, cache and activation sharding from the weights' single
declaration, runs the routed experts expert-parallel (`layout.py`), and places parameters while
they are read from a checkpoint. Design notes and measurements: DESIGN.md.
"""

from sharding.layout import MeshLayout, local_blocks
from sharding.mesh import AXES, MeshError, abstract_mesh, describe, make_mesh, mesh_size, parse_mesh_spec
from sharding.rules import (
                            DP_ATTENTION_RULES,
                            REPLICATED_EXPERTS_RULES,
                            RULE_TABLES,
                            RULES,
                            Rules,
                            cache_shardings,
                            check,
                            get_rules,
                            param_shardings,
                            per_device_param_bytes,
)

__all__ = ["AXES", "MeshError", "abstract_mesh", "check", "MeshLayout", "Rules", "RULES", "DP_ATTENTION_RULES",
           "REPLICATED_EXPERTS_RULES", "RULE_TABLES", "cache_shardings", "describe", "get_rules", "local_blocks",
           "make_mesh", "mesh_size", "param_shardings", "parse_mesh_spec", "per_device_param_bytes"]
