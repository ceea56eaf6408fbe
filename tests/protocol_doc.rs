//! The minimal worker of `docs/PROTOCOL.md` §12, taken from the document
//! itself, runs against the real daemon: a worker of protocol 1 that reads
//! fd 3 with plain `read`s keeps working now that fd 3 is a socket.

use jobvisor::*;

/// The Python program of §12, as the document prints it.
fn minimal_worker() -> String {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/PROTOCOL.md"),
    )
    .expect("docs/PROTOCOL.md");
    let section = doc
        .split("## 12. ")
        .nth(1)
        .expect("a section 12 in PROTOCOL.md");
    let code = section
        .split("```python\n")
        .nth(1)
        .and_then(|s| s.split("\n```").next())
        .expect("a python block in section 12");
    assert!(code.contains("def main()"), "{code}");
    code.to_string()
}

#[test]
fn the_documented_minimal_worker_serves_a_pool() {
    let mut d = Daemon::prepare(
        "protocol-doc",
        &format!(
            "{}[pools.py]\ncommand = [\"python3\", \"echo_worker.py\"]\nworkers = 1\nprefetch = 4\n",
            daemon_section()
        ),
    );
    std::fs::write(d.dir.path().join("echo_worker.py"), minimal_worker()).unwrap();
    // The worker's cwd is the pool's: the config's directory.
    d.spawn();
    d.wait_ready("py", 1);
    let r = d.ctl(&["submit", "py", "--input", "hello", "--wait"]);
    assert_eq!(
        (r.code, r.raw.as_slice()),
        (0, &b"hello"[..]),
        "{}",
        r.stderr
    );
    let input: String = (1..=200).map(|i| format!("{i}\n")).collect();
    let r = d.ctl_stdin(&["map", "py", "--ordered"], Some(input.as_bytes()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, input);
}
