"""A webhook receiver for the snapshot benchmarks that is not the bottleneck: one asyncio
process (run it on its own core), HTTP/1.1 keep-alive, a listen backlog of 4096 (the
standard library's HTTPServer keeps 5: a burst of 2,000 sessions' first connections then
waits in TCP's SYN retransmits, 1 s, 3 s, 7 s, ... — seconds of lateness that are the
receiver's, not the worker's). Each request's JSON body is kept with the time its last byte
arrived (`_received`, unix seconds) and written as one JSON line to OUT, flushed every 0.5 s.

Usage: python bench/webhook_sink.py PORT OUT   (answers 204 to every POST; stops on SIGTERM)
"""
import asyncio
import json
import signal
import sys
import time


async def main(port, out):
    lines = []

    async def serve(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:].strip())
                body = await reader.readexactly(length) if length else b""
                received = time.time()
                try:
                    got = json.loads(body)
                    got["_received"] = received
                    lines.append(json.dumps(got))
                except ValueError:
                    pass
                writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    with open(out, "a") as f:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            if lines:
                f.write("\n".join(lines) + "\n")
                f.flush()
                lines.clear()
    server.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
