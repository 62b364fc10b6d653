"""The per-deployment data plane: one process serving one deployment's port."""
