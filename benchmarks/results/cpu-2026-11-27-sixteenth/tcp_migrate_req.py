"""Evidence (sixteenth session): connections waiting in a listener's queue when it is shut down
(as a draining relay shuts its own): reset, or moved to another listener of the SO_REUSEPORT
group (net.ipv4.tcp_migrate_req)? Run as root to flip the sysctl: see tcp_migrate_req.txt."""

import socket


def listener(port=0):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)
    return s


a = listener()
port = a.getsockname()[1]
b = listener(port)
clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
b.shutdown(socket.SHUT_RDWR)
a.setblocking(False)
moved = 0
while True:
    try:
        a.accept()
        moved += 1
    except BlockingIOError:
        break
reset = 0
for c in clients:
    c.setblocking(False)
    try:
        c.recv(1)
    except BlockingIOError:
        pass
    except ConnectionResetError:
        reset += 1
with open("/proc/sys/net/ipv4/tcp_migrate_req") as setting:
    migrate = setting.read().strip()
print(
    f"tcp_migrate_req={migrate}: 40 connections, "
    f"accepted by the other listener {moved}, reset {reset}"
)
