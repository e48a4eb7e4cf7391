"""Error responses of the python-backend models: bad input is the caller's fault (INVALID_ARG:
HTTP 400, gRPC INVALID_ARGUMENT), anything else the server's (INTERNAL: HTTP 500, gRPC INTERNAL),
so clients and operators can tell them apart. Only usable inside a Triton python stub."""

from __future__ import annotations


def _error_response(message: str, code_name: str):
    import triton_python_backend_utils as pb_utils

    error = pb_utils.TritonError(message, getattr(pb_utils.TritonError, code_name))
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def invalid_input(message: str):
    return _error_response(message, "INVALID_ARG")


def server_fault(message: str):
    return _error_response(message, "INTERNAL")
