"""fedtune_worker: take part in a fedtune federated run from Python.

    import fedtune_worker

    def train(global_adapter, spec):          # dict[str, np.ndarray] (PEFT names), dict
        update = ...                           # same names and shapes, float32
        return update, num_examples, {"train_loss": loss}

    fedtune_worker.Worker("coord:7070", token, "site-a", "model/", train, num_train_examples=1200).run()

    fedtune_worker.fingerprint("model/")     # the base-model fingerprint the run checks

Command line: python3 -m fedtune_worker --help. Protocol: docs/protocol.md.
Needs grpcio, protobuf and numpy (Debian: python3-grpcio python3-protobuf python3-numpy);
fingerprint() needs numpy only.
"""
from ._version import CLIENT_NAME, PROTOCOL_VERSION
from .fingerprint import ModelError, canonical_json, es_number, fingerprint, normalize_config

__all__ = [
    "PROTOCOL_VERSION", "CLIENT_NAME", "ModelError", "canonical_json", "es_number", "fingerprint", "normalize_config",
    "Worker", "FatalWorkerError", "progress", "cancelled",
]


def __getattr__(name: str):
    # The gRPC parts load on first use, so that fingerprint() works without grpcio.
    if name in ("Worker", "FatalWorkerError", "progress", "cancelled"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'fedtune_worker' has no attribute {name!r}")
