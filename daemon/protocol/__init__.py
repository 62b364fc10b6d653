"""The wire formats, shared by the worker's front ends and the CLI: Open Inference Protocol
JSON and binary (codecs, bigjson, tensors), TF Serving REST (codecs_v1), gRPC messages
(grpc_codec, proto/) and Triton's model configuration (modelconfig). Pure code, no I/O."""
