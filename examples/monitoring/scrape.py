"""Scrapes a Runnel broker's /metrics and parses it with prometheus_client's parser.

Usage: scrape.py URL

Prints one JSON object per sample: {"name", "labels", "value"}. Exits non-zero when the
endpoint does not answer or the text is not valid exposition format.
"""

import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith("text/plain"):
            print(f"unexpected content type {content_type!r}", file=sys.stderr)
            return 1
        text = response.read().decode("utf-8")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            print(json.dumps({"name": sample.name, "labels": sample.labels, "value": sample.value}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
