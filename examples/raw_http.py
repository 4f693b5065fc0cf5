"""The HTTP API without client_sdk: what any language needs to run a session (docs/http_api.md).

A request is a safetensors file: the client's tensors, and the session IR as JSON in the metadata
key "raysight.session". This one adds a tensor (zeros: a no-op steering vector) to layer 1's output
at the last token, logs and saves the predicted token id; it follows the server-sent events, then
downloads the result, itself a safetensors file whose metadata "raysight.result" places the values.

    RAYSIGHT_HOST=http://127.0.0.1:8000 RAYSIGHT_API_KEY=... python examples/raw_http.py [MODEL]
"""

import json
import os
import sys

import httpx
import safetensors.torch
import torch

MODEL = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
HOST = os.environ.get("RAYSIGHT_HOST", "http://127.0.0.1:8000")
AUTH = {"Authorization": f"Bearer {os.environ['RAYSIGHT_API_KEY']}"}
ALL, LAST = {"$slice": [None, None, None]}, -1

http = httpx.Client(base_url=HOST, headers=AUTH, timeout=60)
info = http.get(f"/v1/models/{MODEL}").json()  # module tree, config, tokenizer files
hidden = info["config"].get("hidden_size") or info["config"]["n_embd"]

session = {
    "version": 1,
    "traces": [{
        "model": MODEL,
        "invokes": [{"input": "The Eiffel Tower is in the city of"}],
        "nodes": [  # model.model.layers[1].output[:, -1] += t0; model.lm_head.output[0, -1].argmax()
            {"id": 0, "op": "module.output", "args": ["model.layers.1", 0]},
            {"id": 1, "op": "getitem", "args": [{"$ref": 0}, {"$tuple": [ALL, LAST]}]},
            {"id": 2, "op": "iadd", "args": [{"$ref": 1}, {"$tensor": "t0"}]},
            {"id": 3, "op": "module.output", "args": ["lm_head", 0]},
            {"id": 4, "op": "getitem", "args": [{"$ref": 3}, {"$tuple": [0, LAST]}]},
            {"id": 5, "op": "method", "args": ["argmax", {"$ref": 4}]},
            {"id": 6, "op": "log", "args": ["predicted token id", {"$ref": 5}]},
            {"id": 7, "op": "save", "args": [{"$ref": 5}]},
        ],
    }],
}
body = safetensors.torch.save({"t0": torch.zeros(hidden)}, metadata={"raysight.session": json.dumps(session)})

r = http.post("/v1/requests", content=body, headers={"Content-Type": "application/octet-stream"})
print(r.status_code, r.json())  # 202 {'id': '...'}; a 4xx body is {"error": {code, message, location}}
request_id = r.json()["id"]

with http.stream("GET", f"/v1/requests/{request_id}/events") as events:
    for line in events.iter_lines():  # the stream ends after COMPLETED, ERROR or CANCELLED
        if line:
            print(" ", line)

result = http.get(f"/v1/requests/{request_id}/result").content
header = json.loads(result[8 : 8 + int.from_bytes(result[:8], "little")])
print("metadata:", header["__metadata__"])  # raysight.result: {"values": {"5": {"$tensor": "r0"}}}
print("tensors:", safetensors.torch.load(result))  # r0 is node 5's value
