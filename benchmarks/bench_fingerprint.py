"""How long `TSR.weights_fingerprint` takes now that it hashes every byte of every tensor,
beside the old hash of each tensor's first 4 KB (which let 96 % of the weights change unseen).

    python benchmarks/bench_fingerprint.py            # the full-size model, random init
    python benchmarks/bench_fingerprint.py --tiny     # the tiny model

Prints the median of `--repeats` timings of each and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import statistics
import time

from tsr import TSR


def prefix_fingerprint(model: TSR) -> str:
    """The old fingerprint, kept here only as the baseline: the first 4 KB of each tensor."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().cpu().numpy().tobytes()[:4096])
    return digest.hexdigest()[:16]


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model instead")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = TSR.from_config("tiny" if args.tiny else "official", seed=0)
    n_parameters = sum(p.numel() for p in model.parameters())
    every_byte = median_seconds(model.weights_fingerprint, args.repeats)
    prefix = median_seconds(lambda: prefix_fingerprint(model), args.repeats)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(f"{n_parameters:,} parameters; median of {args.repeats}:")
    print(f"  every byte (weights_fingerprint): {every_byte:.3f} s")
    print(f"  first 4 KB per tensor (old):      {prefix:.3f} s")
    print(f"  peak RSS of the process: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
