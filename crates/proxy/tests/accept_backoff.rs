//! Out of file descriptors, the proxy's accept loops back off instead of spinning on EMFILE (a
//! busy loop would burn a core exactly when the host is under pressure), and accept again once
//! descriptors are available. Alone in its binary: it lowers this process's descriptor limit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::resource::{Resource, UsageWho, getrlimit, getrusage, setrlimit};

fn cpu_secs() -> f64 {
    let u = getrusage(UsageWho::RUSAGE_SELF).unwrap();
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

#[tokio::test(flavor = "current_thread")]
async fn accept_backs_off_when_out_of_descriptors_and_recovers() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Ten connections wait in the backlog (the kernel completes them without accept).
    let clients: Vec<std::net::TcpStream> = (0..10)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let held = Arc::new(Mutex::new(Vec::new()));
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // Room for two more descriptors only.
    setrlimit(Resource::RLIMIT_NOFILE, open_fds() + 2, hard).unwrap();
    let h = held.clone();
    let task = tokio::spawn(async move {
        loop {
            let (s, _) = tessera_proxy::sockets::accept(&listener).await;
            h.lock().unwrap().push(s);
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stuck_at = held.lock().unwrap().len();
    assert!(
        stuck_at < 10,
        "the limit did not bite ({stuck_at} accepted)"
    );
    let before = cpu_secs();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let used = cpu_secs() - before;
    assert!(
        used < 0.25,
        "the accept loop spun on EMFILE: {used:.2} s of CPU in 1 s"
    );
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    for _ in 0..40 {
        if held.lock().unwrap().len() == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(held.lock().unwrap().len(), 10, "accepting did not resume");
    task.abort();
    drop(clients);
}
