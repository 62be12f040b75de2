"""Parses a Prometheus text exposition (stdin) with the parser of the `prometheus-client`
package and prints what it read as one JSON object (host/tests/metrics.rs).

Output: {"version": "<prometheus-client version>", "families": [{"name", "type",
"documentation", "samples": [{"name", "labels", "value"}]}]}. Non-finite values are written
as the strings "+Inf", "-Inf", "NaN". Exits 2 when the text does not parse, 3 when the package
is missing.
"""

import json
import math
import sys

try:
    from importlib.metadata import version
    from prometheus_client.parser import text_string_to_metric_families
except ImportError as e:  # pragma: no cover - the test names the install command
    print(f"prometheus-client is not installed: {e}", file=sys.stderr)
    sys.exit(3)


def value(v):
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return v


def main():
    text = sys.stdin.read()
    families = []
    try:
        for fam in text_string_to_metric_families(text):
            families.append(
                {
                    "name": fam.name,
                    "type": fam.type,
                    "documentation": fam.documentation,
                    "samples": [
                        {"name": s.name, "labels": s.labels, "value": value(s.value)}
                        for s in fam.samples
                    ],
                }
            )
    except Exception as e:  # noqa: BLE001 - any parse failure fails the test
        print(f"not a valid exposition: {e!r}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"version": version("prometheus-client"), "families": families}))


if __name__ == "__main__":
    main()
