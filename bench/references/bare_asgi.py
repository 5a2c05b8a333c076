"""The bare-ASGI limit: a raw ASGI app on uvicorn (httptools, uvloop, as policy-server runs)
that reads the body and answers a constant. No framework, no validation, no key, no model.

    python bench/references/bare_asgi.py PORT
"""

import sys
from typing import Any

import uvicorn

BODY = b'{"actions":[0],"probability":1.0,"log_probability":0.0,"value":0.0}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        access_log=False,
        http="httptools",
        loop="uvloop",
        lifespan="off",
    )
