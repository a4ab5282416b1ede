"""Export: encoders and task models to ONNX (TorchScript / torch.export as fallbacks), checked against torch."""

from samadapt.export.check import check_export, check_onnx, check_program, check_torchscript
from samadapt.export.encoder import export_encoder_onnx
from samadapt.export.module import (
    EXPORTERS,
    export_module,
    export_module_onnx,
    export_module_program,
    export_module_torchscript,
)
from samadapt.export.preprocessing import describe_preprocessing

__all__ = [
    "EXPORTERS",
    "check_export",
    "check_onnx",
    "check_program",
    "check_torchscript",
    "describe_preprocessing",
    "export_encoder_onnx",
    "export_module",
    "export_module_onnx",
    "export_module_program",
    "export_module_torchscript",
]
