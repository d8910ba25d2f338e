//! An enterprise PKI made by the `openssl` command line, independent of rcgen and of Tessera:
//! a root and an issuing intermediate, for upstream-authority tests, and `openssl verify` as an
//! independent check of the chains Tessera hands out.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Files of a two-level enterprise PKI (root → issuing intermediate), all PEM.
#[derive(Debug, Clone)]
pub struct EnterprisePki {
    pub root_cert: PathBuf,
    pub root_key: PathBuf,
    /// The issuing intermediate's certificate (signed by the root).
    pub int_cert: PathBuf,
    /// Its PKCS#8 key.
    pub int_key: PathBuf,
}

/// Runs openssl with `args` in `dir`; panics with its stderr on failure.
pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const CA_EXT: &str = "[v3_ca]\nbasicConstraints=critical,CA:TRUE\n\
keyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n\
authorityKeyIdentifier=keyid\n";

/// Makes `root.pem`/`root.key` (self-signed) and `int.pem`/`int.key` (signed by the root) in
/// `dir` with `name` in their subjects, EC P-256, valid 30 days.
pub fn enterprise_pki(dir: &Path, name: &str) -> EnterprisePki {
    std::fs::write(dir.join("ca_ext.cnf"), CA_EXT).expect("write ca_ext.cnf");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    let root_subj = format!("/O={name}/CN={name} Root CA");
    args.extend([
        "-keyout",
        "root.key",
        "-out",
        "root.pem",
        "-days",
        "30",
        "-subj",
        &root_subj,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &args);
    let mut args = vec!["req", "-new"];
    args.extend(ec);
    let int_subj = format!("/O={name}/CN={name} Issuing CA");
    args.extend(["-keyout", "int.key", "-out", "int.csr", "-subj", &int_subj]);
    openssl(dir, &args);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "int.csr",
            "-CA",
            "root.pem",
            "-CAkey",
            "root.key",
            "-set_serial",
            "2",
            "-days",
            "30",
            "-out",
            "int.pem",
            "-extfile",
            "ca_ext.cnf",
            "-extensions",
            "v3_ca",
        ],
    );
    EnterprisePki {
        root_cert: dir.join("root.pem"),
        root_key: dir.join("root.key"),
        int_cert: dir.join("int.pem"),
        int_key: dir.join("int.key"),
    }
}

/// `openssl verify -CAfile root -untrusted intermediates leaf`: Ok(stdout) or Err(stderr+stdout).
pub fn openssl_verify(
    dir: &Path,
    root: &Path,
    intermediates_pem: &str,
    leaf_pem: &str,
) -> Result<String, String> {
    let untrusted = dir.join("verify_untrusted.pem");
    let leaf = dir.join("verify_leaf.pem");
    std::fs::write(&untrusted, intermediates_pem).expect("write");
    std::fs::write(&leaf, leaf_pem).expect("write");
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(root)
        .arg("-untrusted")
        .arg(&untrusted)
        .arg(&leaf)
        .output()
        .expect("openssl is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}
