"""``python -m alignflow.sandbox``: print the confinement layers a sandboxed run gets on this machine."""

import json

from alignflow.sandbox import probe

print(json.dumps(probe(), indent=1, sort_keys=True))
