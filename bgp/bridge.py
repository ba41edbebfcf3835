"""ExaBGP's helper process: relays its stdin/stdout to the agent's unix socket.

ExaBGP runs this as its API process (`run ...` in the rendered config). Everything ExaBGP
writes goes to the agent as lines; every line the agent writes becomes an API command.
Stdlib only, no package imports: ExaBGP starts it as a plain script.
"""

import socket
import sys
import threading
import time


def main(path: str) -> int:
    deadline = time.monotonic() + 10
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            break
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                return 1
            time.sleep(0.1)

    def to_exabgp() -> None:
        with sock.makefile("rb") as f:
            for line in f:
                sys.stdout.buffer.write(line)
                sys.stdout.buffer.flush()
        # The agent went away: exit so ExaBGP notices (and respawns us later).
        sys.stdout.close()

    t = threading.Thread(target=to_exabgp, daemon=True)
    t.start()
    try:
        for line in sys.stdin.buffer:
            sock.sendall(line)
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
