//! A PostgreSQL cluster of a test's own, for tests that stop and restart the database (which
//! they must never do to the shared one `.ci/postgres.sh` starts): `initdb` in a temp dir, run
//! as the `postgres` user when root (PostgreSQL refuses to run as root), listening on loopback
//! only, on a free port, with a socket dir of its own. Stopped and removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running throwaway cluster; [`Cluster::url`] names its `tessera` database.
#[derive(Debug)]
pub struct Cluster {
    log_statements: bool,
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
    pub url: String,
}

fn newest_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop()
}

fn skip_or_fail(reason: &str) -> Option<Cluster> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but this test cannot start its own PostgreSQL: {reason}");
    }
    eprintln!("skipping: cannot start a PostgreSQL cluster of this test's own: {reason}");
    None
}

impl Cluster {
    /// Starts one; `None` (with the reason printed) when PostgreSQL is not installed. With
    /// `CI=true` that is a failure instead.
    pub fn start() -> Option<Self> {
        Self::start_with(false)
    }

    /// [`Cluster::start`]; `log_statements`: every statement goes to [`Cluster::log`] (to
    /// count what clients send).
    pub fn start_with(log_statements: bool) -> Option<Self> {
        let Some(bin) = newest_bin() else {
            return skip_or_fail("no /usr/lib/postgresql/*/bin/initdb (install postgresql)");
        };
        let as_postgres = nix::unistd::geteuid().is_root();
        let mut suffix = [0u8; 6];
        aws_lc_rs::rand::fill(&mut suffix).expect("randomness");
        let dir = std::env::temp_dir().join(format!("tessera-pg-{}", hex::encode(suffix)));
        std::fs::create_dir(&dir).expect("create the cluster dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let user = if as_postgres {
            "postgres".to_owned()
        } else {
            std::env::var("USER").unwrap_or_else(|_| "postgres".into())
        };
        let c = Self {
            log_statements,
            url: format!("postgres://{user}@127.0.0.1:{port}/tessera"),
            bin,
            dir,
            port,
            as_postgres,
        };
        if as_postgres {
            let ok = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&c.dir)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return skip_or_fail("cannot hand the cluster dir to the postgres user");
            }
        }
        let data = c.data();
        if !c.run("initdb", |cmd| {
            cmd.arg("-D").arg(&data).args([
                "-U",
                &user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ]);
        }) {
            return skip_or_fail("initdb failed");
        }
        c.start_again();
        assert!(
            c.run("createdb", |cmd| {
                cmd.args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &c.port.to_string(),
                    "-U",
                    &user,
                    "tessera",
                ]);
            }),
            "createdb failed"
        );
        Some(c)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Runs one of the PostgreSQL programs as the cluster's owner; true on success.
    fn run(&self, program: &str, args: impl FnOnce(&mut Command)) -> bool {
        let path = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        args(&mut cmd);
        cmd.stdout(std::process::Stdio::null());
        cmd.stderr(std::process::Stdio::null());
        cmd.status().is_ok_and(|s| s.success())
    }

    fn pg_ctl(&self, action: &str) -> bool {
        let (data, log, dir) = (self.data(), self.dir.join("postgres.log"), self.dir.clone());
        let port = self.port;
        self.run("pg_ctl", |cmd| {
            cmd.arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "-m", "fast"]);
            let log_all = self.log_statements;
            cmd.arg("-o").arg(format!(
                "-c listen_addresses=127.0.0.1 -p {port} -k {} -c max_connections=200{}",
                dir.display(),
                if log_all {
                    " -c log_statement=all -c log_line_prefix=%p:"
                } else {
                    ""
                }
            ));
            cmd.arg(action);
        })
    }

    /// Stops the database (fast shutdown: sessions are cut, as in a crash of the server).
    pub fn stop(&self) {
        assert!(self.pg_ctl("stop"), "pg_ctl stop failed: {}", self.log());
    }

    /// Starts it again on the same port, with the same data.
    pub fn start_again(&self) {
        assert!(self.pg_ctl("start"), "pg_ctl start failed: {}", self.log());
    }

    /// The server log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self.run("pg_ctl", |cmd| {
            cmd.arg("-D")
                .arg(&data)
                .args(["-w", "-m", "immediate", "stop"]);
        });
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
