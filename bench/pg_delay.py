"""A TCP proxy in front of PostgreSQL that delays every reply by a fixed time, so a cache
miss waits for a load of known length (bench/freshness.py). Loopback only.

    python3 bench/pg_delay.py --listen-port 0 --upstream 127.0.0.1:5432 --delay-ms 20

Prints the port it listens on, then runs until killed.
"""

import argparse
import asyncio


async def pipe(reader, writer, delay):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen-port", type=int, default=0)
    ap.add_argument("--upstream", default="127.0.0.1:5432")
    ap.add_argument("--delay-ms", type=float, default=20.0)
    a = ap.parse_args()
    host, port = a.upstream.rsplit(":", 1)

    async def handle(cr, cw):
        try:
            ur, uw = await asyncio.open_connection(host, int(port))
        except OSError:
            cw.close()
            return
        # Queries go up at once; every reply comes back `delay` later.
        await asyncio.gather(pipe(cr, uw, 0), pipe(ur, cw, a.delay_ms / 1000))

    server = await asyncio.start_server(handle, "127.0.0.1", a.listen_port)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
