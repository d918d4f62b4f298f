"""Generated protobuf and gRPC stubs for ``histoloop.v1`` (built by ``make protos``; never edit)."""
