"""The gRPC front end: the only package that imports grpc."""
