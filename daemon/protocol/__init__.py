"""Protocol code shared by the worker's HTTP and gRPC front ends: pure functions, no I/O."""
