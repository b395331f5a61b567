"""gdnsq.deploy: freeze a trained GDNSQ model to integer codes, save it, load it, run it.

    frozen = freeze(qmodel, example_input=images[:32])   # integer codes; frozen(x) runs the plan
    save(frozen, "model.gdnsq", normalization={"mean": [...], "std": [...]})
    model = load("model.gdnsq")                           # rebuilds the architecture

See the Deployment section of README.md.
"""
from .artifact import FORMAT_VERSION, load, read_artifact, save
from .freeze import (
    deployed_layers,
    format_layer_table,
    format_size_report,
    freeze,
    layer_table,
    measure_paths,
    size_report,
)
from .layers import DeployedConv2d, DeployedLinear
from .plan import attach_plan, detach_plan, format_plan_report, per_layer, plan_report, reference_forward

__all__ = [
    "freeze",
    "save",
    "load",
    "read_artifact",
    "FORMAT_VERSION",
    "layer_table",
    "size_report",
    "format_layer_table",
    "format_size_report",
    "measure_paths",
    "deployed_layers",
    "DeployedConv2d",
    "DeployedLinear",
    "attach_plan",
    "detach_plan",
    "per_layer",
    "reference_forward",
    "plan_report",
    "format_plan_report",
]
