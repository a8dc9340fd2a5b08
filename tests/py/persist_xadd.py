"""A web app's write-behind, as the README shows it: redis-py XADD to a table's stream.

Usage: persist_xadd.py STREAM ENTRIES_JSON, where ENTRIES_JSON is a list of {field: value}
(values that are not strings are sent as JSON text). Prints the ids added, as JSON.
"""
import json
import os
import sys

import redis

r = redis.Redis.from_url(os.environ.get("RESULT_BACKEND", "redis://127.0.0.1:6379/0"))
stream, entries = sys.argv[1], json.loads(sys.argv[2])
ids = []
for entry in entries:
    fields = {k: v if isinstance(v, str) else json.dumps(v) for k, v in entry.items()}
    ids.append(r.xadd(stream, fields).decode())
print(json.dumps(ids))
