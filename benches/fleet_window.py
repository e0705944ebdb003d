#!/usr/bin/env python3
"""Fleet mode's staleness window: how long after one instance serves a
refreshed answer another instance serves it too (the replacement event's
delivery). Two instances on one redis-server, a static origin whose file
changes each round; both hold the answer, it turns stale (--ttl 1s), one
request refreshes it, and both instances are polled until each serves the
new body. Prints |B - A| per round in ms (either instance may be the one
that refreshed: the lease picks one).

    benches/fleet_window.py target/release/swr-proxy [rounds]

Needs python3 and redis-server; uses loopback ports it finds free, and
stops what it started.
"""
import os, signal, socket, statistics, subprocess, sys, tempfile, time, urllib.request

binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/swr-proxy"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 10


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port):
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {port}")


root = tempfile.mkdtemp()
procs = []


def start(args, cwd=None):
    procs.append(subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


origin, redis = free_port(), free_port()
instances = [free_port(), free_port()]
try:
    open(os.path.join(root, "x"), "w").write("v1\n")
    start(["python3", "-m", "http.server", str(origin), "--bind", "127.0.0.1"], cwd=root)
    start(["redis-server", "--port", str(redis), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
    wait_port(origin)
    wait_port(redis)
    for port in instances:
        start([binary, "--upstream", f"http://127.0.0.1:{origin}", "--listen", f"127.0.0.1:{port}",
               "--admin-listen", "off", "--redis", f"redis://127.0.0.1:{redis}", "--ttl", "1s"])
        wait_port(port)

    def get(port):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/x", headers={"Host": "window.test"})
        return urllib.request.urlopen(request).read().strip().decode()

    windows = []
    for i in range(2, rounds + 2):
        open(os.path.join(root, "x"), "w").write(f"v{i}\n")
        for port in instances:
            get(port)
        time.sleep(1.2)  # past the ttl on both
        get(instances[0])  # stale: a refresh is queued
        seen = {}
        t0 = time.time()
        while len(seen) < 2 and time.time() - t0 < 5:
            for port in instances:
                if port not in seen and get(port) == f"v{i}":
                    seen[port] = time.time()
        if len(seen) == 2:
            windows.append(abs(seen[instances[1]] - seen[instances[0]]) * 1000)
        time.sleep(0.2)
finally:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait()
print("ms between the two instances serving the new answer:", [round(w, 1) for w in windows])
if windows:
    print(f"median {statistics.median(windows):.1f} ms, max {max(windows):.1f} ms, {len(windows)} rounds")
