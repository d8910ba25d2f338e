#!/usr/bin/env python3
"""Proxy data-plane benchmarks (run as root; never in CI). Prints a Markdown table.

  cargo build --release -p tessera
  apt-get install -y iperf3 sockperf stunnel4 iproute2
  sudo python3 crates/proxy/benches/netbench.py            # DURATION=10 ROUNDS=3 by default

Topologies: `loopback` (everything in the root namespace) and `netns` (client and server in two
network namespaces joined by a veth pair, 198.18.10.0/24). Paths compared: direct TCP, a stunnel
pair (TLS 1.3, mutual auth with the same SVIDs), and two `tessera proxy` (mTLS HTTP/2 CONNECT).

Measures: iperf3 bulk throughput of one TCP stream; sockperf 1 KiB ping-pong latency (p50 one-way,
as sockperf reports it); full handshakes per CPU-second of the two proxies with pooling off; RSS
per idle proxied connection.
"""

import atexit
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

TESSERA = os.path.abspath(os.environ.get("TESSERA", "target/release/tessera"))
DURATION = int(os.environ.get("DURATION", "10"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
ID = "spiffe://example.org/bench"
PROCS = []
atexit.register(lambda: [p.kill() for p in PROCS])


def ns_cmd(ns, args):
    return (["ip", "netns", "exec", ns] if ns else []) + list(args)


def bg(args, ns=None, log=None):
    out = open(log, "w") if log else subprocess.DEVNULL
    p = subprocess.Popen(ns_cmd(ns, args), stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
    PROCS.append(p)
    return p


def run(args, ns=None, check=True):
    o = subprocess.run(ns_cmd(ns, args), capture_output=True, text=True)
    if check and o.returncode != 0:
        raise RuntimeError(f"{' '.join(ns_cmd(ns, args))}: {o.stderr.strip()}")
    return o


def wait_port(host, port, ns=None, secs=30):
    code = f"import socket,sys\ns=socket.socket();s.settimeout(1)\nsys.exit(s.connect_ex(('{host}',{port})))"
    end = time.time() + secs
    while time.time() < end:
        if run([sys.executable, "-c", code], ns, check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{host}:{port} never came up (ns={ns})")


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ---- helpers run inside a namespace (python3 netbench.py <mode> ...) ----

def echo_server(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(4096)

    def serve(c):
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                c.sendall(d)
        except OSError:
            pass
        c.close()

    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def connect_loop(port, n, threads):
    def work(k):
        for _ in range(k):
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            c.close()

    ts = [threading.Thread(target=work, args=(n // threads,)) for _ in range(threads)]
    start = time.time()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(json.dumps({"n": (n // threads) * threads, "secs": time.time() - start}))


def hold(port, n, secs):
    conns = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        c.sendall(b"x")
        assert c.recv(1) == b"x"
        conns.append(c)
    print("ready", flush=True)
    time.sleep(secs)


# ---- the benchmark ----

def iperf(ns, host, port):
    o = run(["iperf3", "-c", host, "-p", str(port), "-t", str(DURATION), "-J"], ns)
    return json.loads(o.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9


def sockperf(ns, host, port):
    o = run(["sockperf", "pp", "--tcp", "-i", host, "-p", str(port), "-m", "1024", "-t", str(DURATION)], ns)
    m = re.search(r"percentile 50\.000 =\s+([0-9.]+)", o.stdout + o.stderr)
    return float(m.group(1))


def stunnel_conf(path, d, lines):
    with open(path, "w") as f:
        f.write(f"foreground = yes\npid =\ncert = {d}/svid.0.pem\nkey = {d}/svid.0.key\n"
                f"CAfile = {d}/bundle.0.pem\nverifyChain = yes\nsslVersion = TLSv1.3\n")
        f.write(lines)


def topology(name, tmp, sock, server_ns, client_ns, server_ip):
    """Starts servers and proxies for one topology; returns the results row."""
    env_sock = f"unix://{sock}"
    logs = f"{tmp}/{name}"
    os.makedirs(logs, exist_ok=True)
    bg(["iperf3", "-s", "-p", "5201"], server_ns)
    bg(["sockperf", "sr", "--tcp", "-i", "0.0.0.0", "-p", "11111"], server_ns)
    bg([sys.executable, __file__, "echo", "7777"], server_ns)
    sid = ID
    srv = bg([TESSERA, "proxy", "--workload-socket", env_sock, "--inbound", "5201", "--inbound", "11111",
              "--inbound", "7777", "--default-policy", "allow", "--access-log", "/dev/null", "--log-level", "warn",
              "--tunnel-address", f"{server_ip}:15008"], server_ns, f"{logs}/server-proxy.log")
    outs = []
    for lport, dport in [(9001, 5201), (9002, 11111), (9003, 7777)]:
        outs += ["--outbound", f"127.0.0.1:{lport}={server_ip}:{dport},{sid}"]
    ctun = "127.0.0.2:15008" if name == "loopback" else "127.0.0.1:15008"
    cli = bg([TESSERA, "proxy", "--workload-socket", env_sock, "--access-log", "/dev/null", "--log-level", "warn",
              "--tunnel-address", ctun] + outs, client_ns, f"{logs}/client-proxy.log")
    nopool = bg([TESSERA, "proxy", "--workload-socket", env_sock, "--access-log", "/dev/null", "--log-level", "warn",
                 "--no-pool", "--tunnel-address", "127.0.0.3:15008" if name == "loopback" else "127.0.0.1:15009",
                 "--outbound", f"127.0.0.1:9004={server_ip}:7777,{sid}"], client_ns, f"{logs}/nopool-proxy.log")
    # stunnel pair with the same kind of SVIDs (fetched from the Workload API by each side).
    for side, ns in [("s", server_ns), ("c", client_ns)]:
        run([TESSERA, "agent", "api", "fetch", "x509", "--socket", env_sock, "--write", f"{logs}/pem-{side}"], ns)
    stunnel_conf(f"{logs}/stunnel-s.conf", f"{logs}/pem-s",
                 f"[iperf]\naccept = {server_ip}:15443\nconnect = 127.0.0.1:5201\nverify = 2\n"
                 f"[sockperf]\naccept = {server_ip}:15444\nconnect = 127.0.0.1:11111\nverify = 2\n")
    stunnel_conf(f"{logs}/stunnel-c.conf", f"{logs}/pem-c",
                 f"client = yes\n[iperf]\naccept = 127.0.0.1:9101\nconnect = {server_ip}:15443\nverify = 2\n"
                 f"[sockperf]\naccept = 127.0.0.1:9102\nconnect = {server_ip}:15444\nverify = 2\n")
    bg(["stunnel4", f"{logs}/stunnel-s.conf"], server_ns, f"{logs}/stunnel-s.log")
    bg(["stunnel4", f"{logs}/stunnel-c.conf"], client_ns, f"{logs}/stunnel-c.log")
    for host, port, ns in [(server_ip, 5201, client_ns), (server_ip, 15443, client_ns), ("127.0.0.1", 9001, client_ns),
                           ("127.0.0.1", 9101, client_ns), ("127.0.0.1", 9004, client_ns)]:
        wait_port(host, port, ns)

    row = {"topology": name}
    tp = {"direct": [], "stunnel": [], "tessera": []}
    lat = {"direct": [], "stunnel": [], "tessera": []}
    for _ in range(ROUNDS):  # alternate paths each round
        tp["direct"].append(iperf(client_ns, server_ip, 5201))
        tp["stunnel"].append(iperf(client_ns, "127.0.0.1", 9101))
        tp["tessera"].append(iperf(client_ns, "127.0.0.1", 9001))
        lat["direct"].append(sockperf(client_ns, server_ip, 11111))
        lat["stunnel"].append(sockperf(client_ns, "127.0.0.1", 9102))
        lat["tessera"].append(sockperf(client_ns, "127.0.0.1", 9002))
    med = lambda v: sorted(v)[len(v) // 2]
    for k in tp:
        row[f"gbps_{k}"] = med(tp[k])
        row[f"p50_us_{k}"] = med(lat[k])
    print(json.dumps({"partial": row, "throughput": tp, "latency": lat}), flush=True)
    # Handshakes per CPU-second of the two proxies, pooling off.
    before = cpu_seconds(srv.pid) + cpu_seconds(nopool.pid)
    o = subprocess.run(ns_cmd(client_ns, [sys.executable, __file__, "connect-loop", "9004", "1000", "4"]),
                       capture_output=True, text=True, timeout=120)
    res = json.loads(o.stdout)
    used = cpu_seconds(srv.pid) + cpu_seconds(nopool.pid) - before
    row["handshakes"] = res["n"]
    row["handshakes_per_cpu_s"] = res["n"] / used if used else float("nan")
    print(json.dumps({"partial": row}), flush=True)
    # Memory per idle proxied connection (pooled): RSS of both proxies, 1000 connections held.
    r0 = rss_kib(srv.pid) + rss_kib(cli.pid)
    holder = subprocess.Popen(ns_cmd(client_ns, [sys.executable, __file__, "hold", "9003", "1000", "30"]),
                              stdout=subprocess.PIPE, text=True)
    PROCS.append(holder)
    assert holder.stdout.readline().strip() == "ready"
    time.sleep(1)
    r1 = rss_kib(srv.pid) + rss_kib(cli.pid)
    holder.kill()
    row["kib_per_idle_conn"] = (r1 - r0) / 1000
    return row


def main():
    if len(sys.argv) > 1:
        mode = sys.argv[1]
        if mode == "echo":
            return echo_server(int(sys.argv[2]))
        if mode == "connect-loop":
            return connect_loop(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        if mode == "hold":
            return hold(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    tmp = tempfile.mkdtemp(prefix="tessera-netbench-")
    admin, sock = f"{tmp}/admin/admin.sock", f"{tmp}/agent/agent.sock"
    bg([TESSERA, "dev", "--log-level", "warn", "--data-dir", f"{tmp}/data", "--admin-socket", admin,
        "--workload-socket", sock], None, f"{tmp}/dev.log")
    while not (os.path.exists(sock) and os.path.exists(admin)):
        time.sleep(0.1)
    env = dict(os.environ, TESSERA_ADMIN_SOCKET=admin)

    def entry(i, sel):
        subprocess.run([TESSERA, "entry", "create", "--spiffe-id", i, "--selector", sel], env=env, check=True,
                       capture_output=True)

    # One identity for every process of the run (all run as this uid): a workload with two
    # entries would get two SVIDs, and which one comes first is not specified.
    entry(ID, f"unix:uid:{os.getuid()}")
    rows = []
    try:
        for n in ["bnc", "bns"]:
            run(["ip", "netns", "add", n], check=False)
        run(["ip", "link", "add", "bnv0", "type", "veth", "peer", "name", "bnv1"])
        run(["ip", "link", "set", "bnv0", "netns", "bnc"])
        run(["ip", "link", "set", "bnv1", "netns", "bns"])
        for ns, dev, ip in [("bnc", "bnv0", "198.18.10.1/24"), ("bns", "bnv1", "198.18.10.2/24")]:
            run(["ip", "addr", "add", ip, "dev", dev], ns)
            run(["ip", "link", "set", dev, "up"], ns)
            run(["ip", "link", "set", "lo", "up"], ns)
        rows.append(topology("loopback", tmp, sock, None, None, "127.0.0.1"))
        for p in PROCS[1:]:
            p.kill()
        del PROCS[1:]
        time.sleep(1)
        rows.append(topology("netns", tmp, sock, "bns", "bnc", "198.18.10.2"))
    finally:
        for p in PROCS:
            p.kill()
        for n in ["bnc", "bns"]:
            run(["ip", "netns", "del", n], check=False)
        run(["ip", "link", "del", "bnv0"], check=False)
    print("| topology | direct Gbit/s | stunnel Gbit/s | tessera Gbit/s | tessera/direct | tessera/stunnel "
          "| p50 µs direct | stunnel | tessera | added p50 µs | handshakes/CPU-s | KiB/idle conn |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['topology']} | {r['gbps_direct']:.2f} | {r['gbps_stunnel']:.2f} | {r['gbps_tessera']:.2f} "
              f"| {r['gbps_tessera'] / r['gbps_direct']:.2f} | {r['gbps_tessera'] / r['gbps_stunnel']:.2f} "
              f"| {r['p50_us_direct']:.1f} | {r['p50_us_stunnel']:.1f} | {r['p50_us_tessera']:.1f} "
              f"| {r['p50_us_tessera'] - r['p50_us_direct']:.1f} | {r['handshakes_per_cpu_s']:.0f} "
              f"| {r['kib_per_idle_conn']:.1f} |")
    print(f"(DURATION={DURATION}s per run, ROUNDS={ROUNDS}, medians; logs in {tmp})")


if __name__ == "__main__":
    main()
