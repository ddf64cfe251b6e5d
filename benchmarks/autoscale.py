"""Autoscaling benchmark: the Lepton policy vs the best fixed size and an HPA-style rule.

    python benchmarks/autoscale.py [--seeds 5] [--json]

Every curve in benchmarks/curves/ is simulated (`lepton_operator.scaling.simulate`) with
the SAME autoscaling settings (`SETTINGS` below; nothing is tuned per curve) over several
noise seeds, and a table is printed: mean completion time of the Lepton policy, of the
best fixed size in hindsight (start cost included), their ratio (worst seed too), of the
HPA-style baseline, and the mean number of rescales.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from lepton_operator.scaling.simulate import Curve, simulate

CURVES = Path(__file__).resolve().parent / "curves"

# One set of settings for every curve (spec.autoscaling field names).
SETTINGS = {
    "intervalSeconds": 30,
    "windowSeconds": 60,
    "warmupSeconds": 60,
    "cooldownSeconds": 120,
    "step": 1,
    "efficiencyThreshold": 0.2,
    "maxRescalesPerHour": 12,
    "capacityTimeoutSeconds": 120,
    "capacityBackoffSeconds": 600,
}


def run(seeds: int) -> list[dict]:
    rows = []
    for path in sorted(CURVES.glob("*.json")):
        curve = Curve.load(str(path))
        lep = [simulate(curve, "lepton", seed=s, settings=SETTINGS) for s in range(seeds)]
        hpa = [simulate(curve, "hpa", seed=s, settings=SETTINGS) for s in range(seeds)]
        rows.append(
            {
                "curve": curve.name,
                "lepton_s": statistics.mean(r["completion_seconds"] for r in lep),
                "oracle_s": lep[0]["oracle_completion_seconds"],
                "oracle_size": lep[0]["oracle_size"],
                "ratio": statistics.mean(r["ratio_to_oracle"] for r in lep),
                "worst_ratio": max(r["ratio_to_oracle"] for r in lep),
                "final_sizes": sorted({r["final_size"] for r in lep}),
                "hpa_s": statistics.mean(r["completion_seconds"] for r in hpa),
                "hpa_ratio": statistics.mean(r["ratio_to_oracle"] for r in hpa),
                "rescales": statistics.mean(r["rescales"] for r in lep),
                "hpa_rescales": statistics.mean(r["rescales"] for r in hpa),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| curve | lepton (s) | oracle (s) [size] | lepton/oracle (worst) | final sizes | HPA-style (s) "
        "| HPA/oracle | rescales lepton / HPA |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['curve']} | {r['lepton_s']:.0f} | {r['oracle_s']:.0f} [{r['oracle_size']}] | "
            f"{r['ratio']:.3f} ({r['worst_ratio']:.3f}) | {','.join(map(str, r['final_sizes']))} | "
            f"{r['hpa_s']:.0f} | {r['hpa_ratio']:.3f} | {r['rescales']:.1f} / {r['hpa_rescales']:.1f} |"
        )
    mean_l = statistics.mean(r["ratio"] for r in rows)
    mean_h = statistics.mean(r["hpa_ratio"] for r in rows)
    lines.append(f"| **mean** | | | {mean_l:.3f} | | | {mean_h:.3f} | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="noise seeds per curve")
    parser.add_argument("--json", action="store_true", help="print rows as JSON instead of a table")
    args = parser.parse_args()
    rows = run(args.seeds)
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    print(f"\nsettings (same for every curve): {json.dumps(SETTINGS)}", file=sys.stderr)
    worst = max(r["worst_ratio"] for r in rows)
    return 0 if worst <= 1.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
