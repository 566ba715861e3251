#!/usr/bin/env python3
"""Parses a /metrics scrape with the Prometheus project's own OpenMetrics parser
(`prometheus_client.openmetrics.parser`), for the metrics compliance test: nothing of
Tributary's reads the text.

  parse_metrics.py < scrape.txt

Prints one JSON object: {"families": [{"name", "type", "help", "samples": [{"name", "labels",
"value"}]}]}. A scrape the parser refuses exits 1 with the parser's reason on stderr.
"""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main():
    text = sys.stdin.read()
    try:
        families = [
            {
                "name": family.name,
                "type": family.type,
                "help": family.documentation,
                "samples": [
                    {"name": sample.name, "labels": dict(sample.labels), "value": sample.value}
                    for sample in family.samples
                ],
            }
            for family in text_string_to_metric_families(text)
        ]
    except Exception as error:  # the parser's own exceptions are plain ValueErrors and kin
        print(f"the OpenMetrics parser refused the scrape: {error}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"families": families}))


if __name__ == "__main__":
    main()
