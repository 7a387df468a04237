"""bench_forward: TCP throughput and round trips through `lifecycle forward` against a direct connection.

The target (a stand-in for the node port) is a sink in this process: it reads and discards, and answers with the
byte count at EOF; an echo port answers small requests for the round trips. Ours: the real `lifecycle forward`
process, told over the real Mosquitto (127.0.0.1:1883, retained exposures message on a `bench-<random>` prefix)
to forward a host port to each target. Baseline: the same client code connecting to the targets directly, in the
same run. Run: `.venv/bin/python bench/bench_forward.py [--mib N] [--round-trips N] [--runs N]`. Clears its
retained topic; writes nothing to disk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
import uuid

import aiomqtt
from benchlib import REPO_ROOT, Row, machine_note, median, print_table, ratio_line

CHUNK_BYTES = 256 * 1024


async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    total = 0
    while data := await reader.read(CHUNK_BYTES):
        total += len(data)
    writer.write(f"{total}\n".encode())
    await writer.drain()
    writer.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def send_bulk(port: int, size_bytes: int) -> float:
    """Seconds to push `size_bytes` to the sink and hear its count back."""
    block = b"\xa5" * CHUNK_BYTES
    start_s = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(size_bytes // CHUNK_BYTES):
        writer.write(block)
        await writer.drain()
    writer.write_eof()
    got = int(await reader.readline())
    elapsed_s = time.perf_counter() - start_s
    writer.close()
    if got != size_bytes:
        raise RuntimeError(f"sink counted {got} bytes, {size_bytes} were sent")
    return elapsed_s


async def round_trips(port: int, count: int) -> float:
    """Seconds for `count` 64-byte request/response exchanges on one connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start_s = time.perf_counter()
    for _ in range(count):
        writer.write(b"x" * 64)
        await reader.readexactly(64)
    elapsed_s = time.perf_counter() - start_s
    writer.close()
    return elapsed_s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def publish(topic: str, payload: bytes) -> None:
    async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"bench-{uuid.uuid4().hex[:10]}") as client:
        await client.publish(topic, payload, qos=1, retain=True)


async def wait_listening(port: int, *, timeout_s: float = 15.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return


async def main_async(args: argparse.Namespace) -> None:
    sink_server = await asyncio.start_server(sink, "127.0.0.1", 0)
    echo_server = await asyncio.start_server(echo, "127.0.0.1", 0)
    sink_port, echo_port = (int(s.sockets[0].getsockname()[1]) for s in (sink_server, echo_server))
    host_sink, host_echo = free_port(), free_port()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    topic = f"{prefix}/bench/exposures"
    exposures = [{"namespace": "bench", "service": name, "port": port, "protocol": "TCP", "node_ip": "127.0.0.1",
                  "node_port": node_port, "conflict": None}
                 for name, port, node_port in (("sink", host_sink, sink_port), ("echo", host_echo, echo_port))]
    await publish(topic, json.dumps({"seq": 1, "host": "localhost", "exposures": exposures}).encode())
    forward = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lifecycle", "forward", "--prefix", prefix, "--node", "bench", cwd=REPO_ROOT,
        stdout=asyncio.subprocess.DEVNULL)
    try:
        await wait_listening(host_sink)
        await wait_listening(host_echo)
        size_bytes = args.mib * 1024 * 1024
        await send_bulk(sink_port, size_bytes)  # warm-up, both paths
        await send_bulk(host_sink, size_bytes)
        bulk: dict[str, list[float]] = {"direct": [], "forward": []}
        trips: dict[str, list[float]] = {"direct": [], "forward": []}
        for _ in range(args.runs):  # interleaved: load changes hit both alike
            bulk["direct"].append(await send_bulk(sink_port, size_bytes))
            bulk["forward"].append(await send_bulk(host_sink, size_bytes))
            trips["direct"].append(await round_trips(echo_port, args.round_trips))
            trips["forward"].append(await round_trips(host_echo, args.round_trips))
    finally:
        forward.terminate()
        await forward.wait()
        await publish(topic, b"")
        sink_server.close()
        echo_server.close()

    def mib_s(seconds: float) -> float:
        return args.mib / seconds

    def us_per_trip(seconds: float) -> float:
        return seconds / args.round_trips * 1e6

    rates = {k: mib_s(median(v)) for k, v in bulk.items()}
    latency = {k: us_per_trip(median(v)) for k, v in trips.items()}
    print(machine_note())
    print_table(
        f"bench_forward: {args.mib} MiB one way, {args.round_trips} round trips of 64 bytes, median of {args.runs}",
        ["", "throughput", "round trip"],
        [Row("baseline: direct to the target", (f"{rates['direct']:,.0f} MiB/s", f"{latency['direct']:.0f} µs")),
         Row("ours: through lifecycle forward", (f"{rates['forward']:,.0f} MiB/s", f"{latency['forward']:.0f} µs"))],
    )
    print(ratio_line("throughput, ours/baseline", baseline=rates["direct"], ours=rates["forward"],
                     higher_is_better=True))
    print(ratio_line("round trip, baseline/ours", baseline=latency["direct"], ours=latency["forward"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
