//! `healthcode exchange-pki` as an operator runs it: a development CA with server and
//! partner certificates written into a new directory, keys private, fingerprints listed;
//! nothing overwritten, a bad province code refused.

use std::process::Command;

fn run(args: &[&str], out: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_healthcode"))
        .arg("exchange-pki")
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .expect("run healthcode exchange-pki")
}

#[test]
fn writes_a_dev_pki_once_with_private_keys() {
    let out = std::env::temp_dir().join(format!("hc-pki-{}", uuid::Uuid::new_v4().simple()));
    let done = run(
        &["--province", "330000", "--partners", "310000,340000"],
        &out,
    );
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "ca.pem",
            "fingerprints.txt",
            "partner-310000-key.pem",
            "partner-310000.pem",
            "partner-340000-key.pem",
            "partner-340000.pem",
            "server-key.pem",
            "server.pem"
        ]
    );
    let fingerprints = std::fs::read_to_string(out.join("fingerprints.txt")).unwrap();
    let pem = std::fs::read_to_string(out.join("partner-340000.pem")).unwrap();
    let expected = exchange::tls::pem_fingerprint(&pem).unwrap();
    assert!(
        fingerprints.contains(&format!("340000 {expected}")),
        "{fingerprints}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("server-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "keys are readable by their owner only");
    }
    // Run again into the same directory: refused, nothing replaced.
    let again = run(&[], &out);
    assert!(!again.status.success());
    assert_eq!(
        std::fs::read_to_string(out.join("partner-340000.pem")).unwrap(),
        pem
    );
    std::fs::remove_dir_all(&out).unwrap();

    let bad = run(&["--province", "999999"], &out);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("GB/T 2260"));
    for partners in ["310000,", "310000,310000", "../etc"] {
        let bad = run(&["--partners", partners], &out);
        assert!(!bad.status.success(), "{partners}");
    }
    assert!(!out.exists(), "nothing is written for a refused command");
}
