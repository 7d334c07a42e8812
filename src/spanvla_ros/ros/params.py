"""ROS parameters from params/spanvla.schema.yaml: typed descriptors with ranges and read-only flags, no defaults
(the params file gives every value), and a check of runtime changes against the schema."""
from __future__ import annotations

from typing import Any

from ..config import param_schema, schema_problems


def _descriptor(name: str, spec: dict[str, Any]):
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
    from rclpy.parameter import Parameter

    ptype = {"bool": Parameter.Type.BOOL, "int": Parameter.Type.INTEGER, "double": Parameter.Type.DOUBLE,
             "string": Parameter.Type.STRING, "string_array": Parameter.Type.STRING_ARRAY}[spec["type"]]
    d = ParameterDescriptor(name=name, type=ptype.value, description=spec["description"],
                            read_only=bool(spec.get("read_only", False)))
    if "choices" in spec:
        d.additional_constraints = "one of " + ", ".join(spec["choices"])
    if "range" in spec:
        lo, hi = spec["range"]
        if spec["type"] == "int":
            d.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=0)]
        else:
            d.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)]
    return ptype, d


def declare_from_schema(node, schema_node: str) -> dict[str, Any]:
    """Declare the node's parameters from the schema section ``schema_node`` and return their values. A parameter
    the params file does not set, or a value that breaks the schema, raises ValueError naming them all."""
    from rclpy.exceptions import ParameterUninitializedException

    schema = param_schema(schema_node)
    for name, spec in schema.items():
        ptype, descriptor = _descriptor(name, spec)
        node.declare_parameter(name, ptype, descriptor)
    values, missing = {}, []
    for name in schema:
        try:
            values[name] = node.get_parameter(name).value
        except ParameterUninitializedException:
            missing.append(name)
    problems = [f"{k}: missing (set it in the params file)" for k in missing]
    problems += [p for p in schema_problems(schema, values) if not p.endswith(": missing")]
    if problems:
        raise ValueError(f"{node.get_name()} parameters: " + "; ".join(problems))
    return values


def check_changes(schema_node: str, current: dict[str, Any], changes) -> str:
    """Why the ``changes`` (rclpy Parameters) cannot be taken, or "" if they can. Types, ranges and read-only
    flags are enforced by rclpy from the descriptors; the schema adds the choices."""
    schema = param_schema(schema_node)
    proposed = dict(current, **{p.name: p.value for p in changes})
    return "; ".join(p for p in schema_problems(schema, proposed) if p.split(":")[0] in {c.name for c in changes})
