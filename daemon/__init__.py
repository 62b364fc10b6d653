"""The mserve daemon: control plane (state, store, supervisor) and the per-deployment workers."""
