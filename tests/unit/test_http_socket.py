"""The HTTP listening socket: accepted connections have Nagle's algorithm off (TCP_NODELAY). With it on, a
response's body waited behind its headers for the client's delayed ACK: 40 ms on every HTTP answer."""

import asyncio
import socket

from service.runtime import bind_socket


def test_accepted_connections_have_tcp_nodelay():
    async def main() -> tuple[int, int]:
        sock = bind_socket("127.0.0.1", 0)
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()

        class Proto(asyncio.Protocol):
            def connection_made(self, transport):
                accepted.set_result(transport.get_extra_info("socket"))

        server = await asyncio.get_running_loop().create_server(Proto, sock=sock)  # as uvicorn serves `sockets`
        try:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            conn = await asyncio.wait_for(accepted, 10)
            value = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            writer.close()
            return sock.proto, value
        finally:
            server.close()
            await server.wait_closed()

    proto, nodelay = asyncio.run(main())
    assert proto == socket.IPPROTO_TCP and nodelay != 0
