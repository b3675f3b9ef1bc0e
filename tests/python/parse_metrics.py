"""Parses an OpenMetrics exposition with the reference Python parser.

stdin: the exposition text. stdout: {"<sample name>{k=v,...}": value, ...}
Exits non-zero if the text does not parse.
"""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
