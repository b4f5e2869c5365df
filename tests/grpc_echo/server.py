"""The test gRPC server (grpc.aio) behind a tunnel client. Usage: server.py GEN_DIR PORT"""
from __future__ import annotations

import asyncio
import json
import sys

import grpc
import grpc.aio

sys.path.insert(0, sys.argv[1])
import echo_pb2  # noqa: E402
import echo_pb2_grpc  # noqa: E402

# The texts of the calls that ended cancelled (by the caller, or by their deadline) while
# the handler ran, and the deadline each call with one had left when it arrived.
STATS: dict = {"cancelled": [], "deadlines": {}}


def _caller(context) -> str:
    return dict(context.invocation_metadata()).get("x-caller", "")


class Echo(echo_pb2_grpc.EchoServicer):
    async def Unary(self, request, context):
        remaining = context.time_remaining()
        if remaining is not None:
            STATS["deadlines"][request.text] = remaining
        try:
            await context.send_initial_metadata((("srv-init", "1"),))
            if request.delay_ms:
                await asyncio.sleep(request.delay_ms / 1000)
        except asyncio.CancelledError:  # wherever the handler was: in the sleep or before
            STATS["cancelled"].append(request.text)
            raise
        context.set_trailing_metadata((("srv-trail", "t-" + request.text), ("x-caller", _caller(context)),
                                       ("srv-bin-bin", b"\x00\x01\xff")))
        if request.fail:
            await context.abort(grpc.StatusCode.NOT_FOUND, request.fail)
        return echo_pb2.Msg(text=request.text)

    async def ServerStream(self, request, context):
        try:
            for i in range(request.count):
                yield echo_pb2.Msg(text=f"{request.text}-{i}", count=i)
                if request.delay_ms:
                    await asyncio.sleep(request.delay_ms / 1000)
        except (asyncio.CancelledError, GeneratorExit):
            # CancelledError in the sleep; GeneratorExit when the call ends while a message
            # is being sent (grpc.aio then closes the generator at its yield).
            STATS["cancelled"].append(request.text)
            raise

    async def ClientStream(self, request_iterator, context):
        texts = [m.text async for m in request_iterator]
        return echo_pb2.Msg(text="".join(texts), count=len(texts))

    async def Bidi(self, request_iterator, context):
        async for m in request_iterator:
            yield echo_pb2.Msg(text=m.text.upper(), count=m.count)

    async def Stats(self, request, context):
        return echo_pb2.Msg(text=json.dumps(STATS))


async def main() -> None:
    server = grpc.aio.server()
    echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{sys.argv[2]}")
    await server.start()
    print("grpc echo listening", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
