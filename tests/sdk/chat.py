"""Drives gatehouse with the official OpenAI Python SDK (run by tests/openai_sdk.rs).

Environment: GATEWAY_URL (http://ADDR), GATEHOUSE_KEY (a gatehouse API key), MODEL, and
optionally RESTRICTED_KEY (a key that may not use MODEL). Does a model listing, a chat
completion, a streamed chat completion with usage, and (with RESTRICTED_KEY) a refused one,
then prints what it got as one JSON object on stdout. Any SDK error fails the script.
"""

import json
import os

import openai
from openai import OpenAI

base_url = os.environ["GATEWAY_URL"] + "/v1"
model = os.environ["MODEL"]
messages = [{"role": "user", "content": "Say something about gateways."}]
# No retries: the test counts what reached the upstream.
client = OpenAI(base_url=base_url, api_key=os.environ["GATEHOUSE_KEY"], max_retries=0, timeout=10)

models = [m.id for m in client.models.list()]

completion = client.chat.completions.create(model=model, messages=messages)

chunks = list(
    client.chat.completions.create(
        model=model,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
)
stream_usage = next((c.usage for c in reversed(chunks) if c.usage is not None), None)

result = {
    "sdk_version": openai.__version__,
    "models": models,
    "completion": {
        "id": completion.id,
        "content": completion.choices[0].message.content,
        "finish_reason": completion.choices[0].finish_reason,
        "usage": completion.usage.model_dump(include={"prompt_tokens", "completion_tokens"}),
    },
    "stream": {
        "chunks": len(chunks),
        "content": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
        "usage": stream_usage.model_dump(include={"prompt_tokens", "completion_tokens"})
        if stream_usage
        else None,
    },
}

restricted = os.environ.get("RESTRICTED_KEY")
if restricted:
    refused = OpenAI(base_url=base_url, api_key=restricted, max_retries=0, timeout=10)
    try:
        refused.chat.completions.create(model=model, messages=messages)
        result["refused"] = None
    except openai.APIStatusError as err:
        result["refused"] = {"status": err.status_code, "body": err.body}

print(json.dumps(result))
