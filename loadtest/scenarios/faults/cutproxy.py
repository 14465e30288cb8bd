#!/usr/bin/env python3
"""A TCP proxy that can cut the path it carries, as a network partition does.

    cutproxy.py LISTEN_PORT TARGET_PORT

Forwards 127.0.0.1:LISTEN_PORT to 127.0.0.1:TARGET_PORT. SIGUSR1 cuts: from then on no
byte crosses in either direction (what arrives is read and dropped, as a partition drops
packets; nobody gets a FIN or RST, so each side must notice by its own keepalive), and new
connections are accepted and held silent. SIGUSR2 heals: the connections that lived
through the cut are closed (their peers gave up on them long ago) and new ones are
forwarded again. Standard library only.
"""
import asyncio
import signal
import sys

cut = False


async def pump(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if not cut:
                writer.write(data)
                await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def handle(client_r, client_w, target_port):
    if cut:  # made during the cut: held silent, then closed at the heal
        while cut:
            await asyncio.sleep(0.1)
        client_w.close()
        return
    entry = [client_w, None, False]
    try:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", target_port)
        entry[1] = up_w
        ALL.append(entry)
        await asyncio.gather(pump(client_r, up_w), pump(up_r, client_w))
    except (ConnectionError, OSError):
        client_w.close()


ALL = []


def on_cut():
    global cut
    cut = True
    for entry in ALL:
        entry[2] = True
    print("cutproxy: cut", flush=True)


def on_heal():
    global cut
    cut = False
    for entry in ALL:
        if entry[2]:
            for w in entry[:2]:
                if w is not None:
                    w.close()
    ALL[:] = [e for e in ALL if not e[2]]
    print("cutproxy: healed", flush=True)


async def main():
    listen_port, target_port = int(sys.argv[1]), int(sys.argv[2])
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, on_cut)
    loop.add_signal_handler(signal.SIGUSR2, on_heal)
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, target_port), "127.0.0.1", listen_port, backlog=1024
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
