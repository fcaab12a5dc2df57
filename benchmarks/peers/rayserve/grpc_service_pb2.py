"""tritonclient's generated Open Inference Protocol messages, under the module name they carry.

tritonclient.grpc.service_pb2 was generated as grpc_service_pb2, and its message classes still
say so (ServerReadyRequest.__module__ == "grpc_service_pb2"). Ray Serve's gRPC proxy pickles
each request message to hand it to the replica, and pickle finds a class by that module name;
serve.py puts this folder on PYTHONPATH for Ray's processes, so the name resolves (in the proxy,
which pickles, and in the replica, which unpickles) to tritonclient's module itself.
"""

import sys

from tritonclient.grpc import service_pb2

sys.modules[__name__] = service_pb2
