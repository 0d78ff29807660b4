"""Prints a pull Secret from `kubectl get secret -o json` with every token replaced."""

import base64
import json
import sys

secret = json.load(sys.stdin)
config = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))
for entry in config["auths"].values():
    entry["password"] = f"<redacted: {len(entry['password'])} characters>"
    entry["auth"] = "<redacted>"
secret["data"] = {".dockerconfigjson (decoded)": config}
for key in ("managedFields", "uid", "resourceVersion", "creationTimestamp"):
    secret["metadata"].pop(key, None)
print(json.dumps(secret, indent=2))
