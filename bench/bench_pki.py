"""bench_pki: the certs step's work on a full kubeadm PKI (3 CAs, 7 leaves, sa key, 5 kubeconfigs).

Measures, per key algorithm: generation (`lifecycle.pki.plan_pki` from nothing, then `write_files`: fsynced
atomic writes); validation of the PKI just written (`validate_pki`, the certs step's `is_done` path); one
private-key load (`load_key`), which dominates validation with RSA. Baselines: RSA-2048 (kubeadm's default) for
ECDSA P-256 generation; generation for validation (what `is_done` saves on a resume).
Run: `.venv/bin/python bench/bench_pki.py [--runs N]`. Temp dirs only.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchlib import Row, machine_note, median, print_table, ratio_line, timed

from lifecycle.paths import KUBECONFIG_NAMES
from lifecycle.pki import PkiParams, pki_file_names, plan_pki, read_existing, validate_pki, write_files
from lifecycle.pki_x509 import key_pem, load_key, new_key

ALGORITHMS = ("rsa-2048", "ecdsa-p256")
EXPECTED_FILES = len(pki_file_names()) + len(KUBECONFIG_NAMES)  # every key, certificate and kubeconfig


def params(algorithm: str) -> PkiParams:
    return PkiParams(node_name="bench-node", node_ip="127.0.0.1", endpoint_name="localhost", api_port=6443,
                     key_algorithm=algorithm)


def generate(root: Path, p: PkiParams) -> tuple[float, float, int]:
    """(plan seconds, write seconds, files written) for a PKI made from nothing under `root`."""
    pki_dir, kubeconfig_dir = root / "etc/kubernetes/pki", root / "etc/kubernetes"
    start_s = time.perf_counter()
    planned, _ = plan_pki(read_existing(pki_dir, kubeconfig_dir), p, now=datetime.now(UTC))
    planned_s = time.perf_counter()
    write_files(planned, pki_dir=pki_dir, kubeconfig_dir=kubeconfig_dir)
    return planned_s - start_s, time.perf_counter() - planned_s, len(planned)


def validate(root: Path, p: PkiParams) -> float:
    start_s = time.perf_counter()
    problems = validate_pki(root / "etc/kubernetes/pki", p, kubeconfig_dir=root / "etc/kubernetes", root=root)
    elapsed_s = time.perf_counter() - start_s
    if problems:  # a benchmark of a check that fails would measure the wrong path
        raise SystemExit(f"bench_pki: the generated PKI is not valid: {problems[:3]}")
    return elapsed_s


def key_load_s(algorithm: str, *, runs: int) -> list[float]:
    """One private-key load as `validate_pki` does it (`load_key`): for RSA, OpenSSL checks the key's primes."""
    pem = key_pem(new_key(algorithm))
    return timed(lambda: load_key(pem), runs=runs)


def measure(algorithm: str, *, runs: int, validations: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"plan": [], "write": [], "total": [], "validate": []}
    p = params(algorithm)
    for _ in range(runs):
        root = Path(tempfile.mkdtemp(prefix=f"bench-pki-{algorithm}-"))
        try:
            plan_s, write_s, files = generate(root, p)
            if files != EXPECTED_FILES:  # a partial plan would make the figures meaningless
                raise SystemExit(f"bench_pki: expected {EXPECTED_FILES} files, planned {files}")
            out["plan"].append(plan_s)
            out["write"].append(write_s)
            out["total"].append(plan_s + write_s)
            out["validate"] += [validate(root, p) for _ in range(validations)]
        finally:
            shutil.rmtree(root)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="PKIs generated per algorithm")
    parser.add_argument("--validations", type=int, default=4, help="validations of each generated PKI")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.validations < 1:
        parser.error("--runs and --validations must be at least 1")
    print(f"bench_pki on {machine_note()}")
    results = {a: measure(a, runs=args.runs, validations=args.validations) for a in ALGORITHMS}
    key_loads = {a: key_load_s(a, runs=10) for a in ALGORITHMS}
    rows = [
        Row(a, (*(f"{median(results[a][k]) * 1000:.1f}" for k in ("plan", "write", "total", "validate")),
                f"{median(key_loads[a]) * 1000:.2f}"))
        for a in ALGORITHMS
    ]
    print_table(
        f"pki: full kubeadm PKI + kubeconfigs, ms; generation median of {args.runs}, "
        f"validation median of {args.runs * args.validations}",
        ("key algorithm", "generate", "write", "gen+write", "validate (is_done)", "one key load"), rows,
    )
    rsa, ec = results["rsa-2048"], results["ecdsa-p256"]
    print(ratio_line("generation+write, RSA-2048/ECDSA P-256 (>1: ECDSA faster)",
                     baseline=median(rsa["total"]), ours=median(ec["total"])))
    print(ratio_line("ECDSA P-256, generation+write/validation (>1: is_done cheaper than redoing)",
                     baseline=median(ec["total"]), ours=median(ec["validate"])))
    print(ratio_line("RSA-2048, generation+write/validation", baseline=median(rsa["total"]),
                     ours=median(rsa["validate"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
