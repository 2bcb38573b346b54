"""python3 -m fedtune_worker --coordinator HOST:PORT --token TOKEN --name SITE --model DIR --data FILE
python3 -m fedtune_worker fingerprint MODEL_DIR      (the base-model fingerprint, hex)

Runs one site of a federated run until it finishes. Without --train the demo
trainer (fedtune_worker.demo) computes a small deterministic update; with
--train MODULE:FUNCTION your function does the training (see docs/protocol.md
and clients/python/README.md).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any, Callable


def _load(ref: str, flag: str) -> Callable[..., Any]:
    mod, _, fn = ref.partition(":")
    if not mod or not fn:
        raise SystemExit(f"{flag}: expected MODULE:FUNCTION, got {ref!r}")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"{flag} {ref}: cannot load it ({e})") from None
    if not callable(f):
        raise SystemExit(f"{flag} {ref}: is not a function")
    return f


def main(argv: list) -> int:
    if argv[:1] == ["fingerprint"]:
        from .fingerprint import main as fingerprint_main

        return fingerprint_main(argv[1:])
    p = argparse.ArgumentParser(prog="python3 -m fedtune_worker", description="A fedtune worker (one site of a federated run).")
    p.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    p.add_argument("--token", default=os.environ.get("FEDTUNE_JOIN_TOKEN"), help="join token of the run (or set FEDTUNE_JOIN_TOKEN)")
    p.add_argument("--name", required=True, help="site name shown on the dashboard")
    p.add_argument("--model", required=True, help="Hugging Face base model directory (fingerprinted at start)")
    p.add_argument("--data", required=True, help="local training data: JSON array or JSONL records (counted; they never leave the site)")
    p.add_argument("--eval-data", help="local eval data (enables eval tasks)")
    p.add_argument("--train", help="MODULE:FUNCTION train(global, spec) -> (update, num_examples, metrics) (default: the demo trainer)")
    p.add_argument("--evaluate", help="MODULE:FUNCTION evaluate(global, spec) -> {eval_loss, eval_tokens, eval_examples, eval_accuracy?} | None")
    p.add_argument("--device", default="cpu", help="device reported to the coordinator (default: cpu)")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system CA roots unless --tls-ca)")
    p.add_argument("--tls-ca", help="PEM CA certificate that signed the coordinator certificate (implies --tls)")
    p.add_argument("--tls-cert", help="PEM client certificate, for coordinators requiring one (implies --tls)")
    p.add_argument("--tls-key", help="PEM client key (with --tls-cert)")
    p.add_argument("--tls-server-name", help="name to verify the coordinator certificate against")
    p.add_argument("--no-bulk", action="store_true", help="transfer over the gRPC streams even when the coordinator offers its bulk tensor channel")
    p.add_argument("--give-up-after", type=float, default=600.0, help="stop reconnecting after this many seconds without the coordinator (default 600)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    a = p.parse_args(argv)
    if not a.token:
        p.error("--token is required (or set FEDTUNE_JOIN_TOKEN)")
    if bool(a.tls_cert) != bool(a.tls_key):
        p.error("--tls-cert and --tls-key go together")
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    try:
        from . import client, demo
    except ImportError as e:
        print(f"fedtune_worker: {e}: the worker needs grpcio, protobuf and numpy (Debian: apt-get install python3-grpcio python3-protobuf python3-numpy)", file=sys.stderr)
        return 1

    try:
        n_train = demo.count_records(a.data)
        n_eval = demo.count_records(a.eval_data) if a.eval_data else 0
    except ValueError as e:
        print(f"fedtune_worker: {e}", file=sys.stderr)
        return 1
    train = _load(a.train, "--train") if a.train else demo.demo_train(n_train)
    evaluate = _load(a.evaluate, "--evaluate") if a.evaluate else (demo.demo_evaluate(n_eval) if a.eval_data else None)
    creds = None
    bulk_tls = None
    if a.tls or a.tls_ca or a.tls_cert:
        import grpc
        import ssl

        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()

        creds = grpc.ssl_channel_credentials(
            root_certificates=read(a.tls_ca) if a.tls_ca else None,
            private_key=read(a.tls_key) if a.tls_key else None,
            certificate_chain=read(a.tls_cert) if a.tls_cert else None,
        )
        # The bulk channel presents the same certificates as the gRPC channel.
        bulk_tls = ssl.create_default_context(cafile=a.tls_ca) if a.tls_ca else ssl.create_default_context()
        if a.tls_cert:
            bulk_tls.load_cert_chain(a.tls_cert, a.tls_key)
    w = client.Worker(
        a.coordinator, a.token, a.name, a.model, train, n_train,
        evaluate=evaluate, num_eval_examples=n_eval, credentials=creds, server_name=a.tls_server_name,
        device=a.device, give_up_after_s=a.give_up_after, bulk=not a.no_bulk, bulk_tls=bulk_tls,
        context={"model_dir": a.model, "data": a.data, "eval_data": a.eval_data, "num_train_examples": n_train},
    )
    try:
        r = w.run()
    except (client.FatalWorkerError, ConnectionError) as e:
        print(f"fedtune_worker: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0 if r["state"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
