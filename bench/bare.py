"""Baseline servers for the ingest benchmarks, each one process on a port:

- `bare` (default): a tiny FastAPI app, served exactly as the services are (uvicorn, uvloop,
  httptools, one worker; services.cli._serve), whose POST /v1/events and /v1/events:batch read
  the body, parse it with orjson and answer 202: the server stack's own cost, without Kafka;
- `--validate`: the same plus the event validation ingest does (services.core.events), to tell
  the cost of validation from the cost of producing;
- `--raw`: not HTTP framework at all, an asyncio protocol answering every request with a fixed
  202: the ceiling of the load generator on this machine.
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
from fastapi import FastAPI, Request, Response

ACCEPTED = orjson.dumps({"event_id": "x", "status": "accepted"})


def create_app(validate: bool):
    from services.core.events import EventInvalid, ValidationContext, utc_now, validate_event
    from services.core.journeys import load_journeys
    from services.core.settings import Settings

    settings = Settings()
    journeys = load_journeys(settings.journeys_dir)
    app = FastAPI(title="bench bare endpoint")

    def context() -> ValidationContext:
        return ValidationContext(
            settings.tenant, journeys, utc_now(), settings.max_event_age_s, settings.max_future_skew_s
        )

    @app.post("/v1/events", status_code=202)
    async def post_event(request: Request) -> Response:
        payload = orjson.loads(await request.body())
        if validate:
            try:
                record = validate_event(payload, context())
                record.to_json()
            except EventInvalid as invalid:
                return Response(orjson.dumps({"detail": str(invalid)}), status_code=422, media_type="application/json")
        return Response(ACCEPTED, status_code=202, media_type="application/json")

    @app.post("/v1/events:batch", status_code=202)
    async def post_batch(request: Request) -> Response:
        body = await request.body()
        if request.headers.get("content-type", "").startswith("application/x-ndjson"):
            items = [orjson.loads(line) for line in body.split(b"\n") if line.strip()]
        else:
            items = orjson.loads(body)["events"]
        results = []
        for index, item in enumerate(items):
            if validate:
                validate_event(item, context()).to_json()
            results.append({"index": index, "event_id": item.get("event_id"), "status": "accepted"})
        return Response(
            orjson.dumps({"accepted": len(items), "rejected": 0, "results": results}),
            status_code=202,
            media_type="application/json",
        )

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return app


RAW_RESPONSE = (
    b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(ACCEPTED)).encode()
    + b"\r\n\r\n"
    + ACCEPTED
)


class RawProtocol(asyncio.Protocol):
    """Answers each complete request (headers + Content-Length body) with a fixed 202."""

    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buffer[:end].split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self.transport.write(RAW_RESPONSE)


async def serve_raw(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(RawProtocol, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--raw", action="store_true")
    args = parser.parse_args()
    if args.raw:
        import uvloop

        uvloop.run(serve_raw(args.port))
        return
    from services.cli import _serve

    _serve(create_app(args.validate), "127.0.0.1", args.port)


if __name__ == "__main__":
    main()
