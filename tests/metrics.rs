//! Metrics and the status page: `jobvisorctl metrics` and `/metrics` over
//! HTTP parse with the Prometheus text parser of `prometheus_client`
//! (PyPI) and their counters match `status`; the listener comes from a
//! socket passed as systemd does (a TCP socket named `metrics`) or from
//! `daemon.metrics_listen`; hostile HTTP clients get bounded answers and
//! never stall the daemon; the page, in a real headless Chromium, shows the
//! pools and updates when a job finishes.

use jobvisor::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn config() -> String {
    echo_fail_pools(2, "")
}

/// A daemon whose metrics socket is passed to it as systemd would.
fn start(tag: &str) -> (Daemon, SocketAddr) {
    let mut d = Daemon::prepare(tag, &config());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let cmd = socket_activated(&d.config_path(), listener.as_raw_fd(), "metrics");
    d.launch(cmd);
    drop(listener);
    wait_for("the control socket", DEADLINE, || {
        (d.ctl(&["status"]).code == 0).then_some(())
    });
    (d, addr)
}

/// One raw HTTP exchange: the status line and the body.
fn http(addr: SocketAddr, request: &[u8]) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

fn get(addr: SocketAddr, path: &str) -> (String, String) {
    http(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
}

/// The samples of a Prometheus text, as parsed by `prometheus_client`:
/// `[name, labels, value]` per sample.
fn parse(text: &str) -> Vec<(String, Value, f64)> {
    let script = "import json, sys\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        out = [[s.name, s.labels, s.value] for f in text_string_to_metric_families(sys.stdin.read()) for s in f.samples]\n\
        print(json.dumps(out))\n";
    let mut c = Command::new("python3");
    c.args(["-c", script]);
    let r = run_with_stdin(c, Some(text.as_bytes()));
    assert_eq!(
        r.code, 0,
        "the Prometheus parser failed (pip install prometheus-client): {r:?}"
    );
    let v: Vec<(String, Value, f64)> = serde_json::from_str(&r.stdout).unwrap();
    assert!(!v.is_empty());
    v
}

fn sample(samples: &[(String, Value, f64)], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l[*k] == *v))
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
        .2
}

#[test]
fn metrics_parse_and_their_counters_match_status() {
    let (d, addr) = start("metrics");
    d.wait_ready("echo", 2);
    d.wait_ready("fail", 1);
    for i in 0..3 {
        assert_eq!(
            d.ctl(&["submit", "echo", "--input", &i.to_string(), "--wait"])
                .code,
            0
        );
    }
    for _ in 0..2 {
        assert_eq!(
            d.ctl(&["submit", "fail", "--input", "no", "--wait"]).code,
            1
        );
    }
    let r = d.ctl(&["metrics"]);
    assert_eq!(r.code, 0, "{r:?}");
    let (status_line, body) = get(addr, "/metrics");
    assert_eq!(status_line, "HTTP/1.1 200 OK");
    let status = d.status();
    for text in [&r.stdout, &body] {
        let s = parse(text);
        for p in status["pools"].as_array().unwrap() {
            let pool = p["name"].as_str().unwrap();
            let l = [("pool", pool)];
            for (metric, field) in [
                ("jobvisor_jobs_succeeded_total", "succeeded"),
                ("jobvisor_jobs_failed_total", "failed"),
                ("jobvisor_jobs_queued", "queued"),
                ("jobvisor_jobs_running", "running"),
            ] {
                assert_eq!(
                    sample(&s, metric, &l),
                    p[field].as_f64().unwrap(),
                    "{metric} {pool}"
                );
            }
            for w in p["workers"].as_array().unwrap() {
                let id = w["id"].to_string();
                let l = [("pool", pool), ("worker", id.as_str())];
                assert_eq!(
                    sample(&s, "jobvisor_worker_restarts_total", &l),
                    w["restarts"].as_f64().unwrap()
                );
                assert!(sample(&s, "jobvisor_worker_resident_bytes", &l) > 0.0);
            }
        }
        let fail = [("pool", "fail"), ("state", "failed")];
        assert_eq!(sample(&s, "jobvisor_jobs_finished_total", &fail), 2.0);
        assert_eq!(
            sample(&s, "jobvisor_job_run_seconds_count", &[("pool", "echo")]),
            3.0
        );
        let inf = [("pool", "echo"), ("le", "+Inf")];
        assert_eq!(sample(&s, "jobvisor_job_run_seconds_bucket", &inf), 3.0);
        assert!(sample(&s, "jobvisor_store_commit_seconds_count", &[]) >= 5.0);
        assert_eq!(
            sample(
                &s,
                "jobvisor_pool_state",
                &[("pool", "echo"), ("state", "running")]
            ),
            1.0
        );
        assert!(sample(&s, "jobvisor_daemon_resident_bytes", &[]) > 0.0);
    }
    // The listener's answers: the page and its parts, JSON, errors.
    let (line, page) = get(addr, "/");
    assert_eq!(line, "HTTP/1.1 200 OK");
    assert!(page.contains("<script src=\"/page.js\""), "{page}");
    assert_eq!(get(addr, "/page.js").0, "HTTP/1.1 200 OK");
    let (line, json) = get(addr, "/status.json");
    assert_eq!(line, "HTTP/1.1 200 OK");
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["pools"][0]["name"], "echo");
    assert_eq!(v["recent"].as_array().unwrap().len(), 5);
    assert_eq!(v["failed"].as_array().unwrap().len(), 2);
    assert_eq!(v["failed"][0]["error"], "no");
    assert!(
        !json.contains("\"output"),
        "no job output on the page: {json}"
    );
    assert_eq!(get(addr, "/nope").0, "HTTP/1.1 404 Not Found");
    let (line, _) = http(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(line, "HTTP/1.1 405 Method Not Allowed");
    let (line, body) = http(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!((line.as_str(), body.as_str()), ("HTTP/1.1 200 OK", ""));
}

#[test]
fn hostile_http_clients_get_bounded_answers_and_the_daemon_carries_on() {
    let (d, addr) = start("metrics-hostile");
    d.wait_ready("echo", 2);
    // A head that never ends: cut at 8 KiB.
    let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    big.resize(64 << 10, b'a');
    let (line, _) = http(addr, &big);
    assert_eq!(line, "HTTP/1.1 431 Request Header Fields Too Large");
    let (line, _) = http(addr, b"\x16\x03\x01garbage\r\n\r\n");
    assert_eq!(line, "HTTP/1.1 400 Bad Request");
    // 40 silent connections: 16 are served (and cut at their 5 s
    // deadline with a 408), the others wait for a slot; the daemon itself
    // answers as ever, and a real request is answered once the waves
    // before it are (three deadlines at most).
    let idle: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let t = Instant::now();
    let r = d.ctl(&["status"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "status took {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    assert_eq!(get(addr, "/metrics").0, "HTTP/1.1 200 OK");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    let mut first = idle.into_iter().next().unwrap();
    first.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut out = String::new();
    let _ = first.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 408 Request Timeout"), "{out:?}");
}

#[test]
fn metrics_listen_key_serves_the_same() {
    let probe = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let cfg = config().replacen(
        "[daemon]\n",
        &format!("[daemon]\nmetrics_listen = \"{addr}\"\n"),
        1,
    );
    let d = Daemon::start("metrics-key", &cfg);
    d.wait_ready("echo", 2);
    let (line, body) = get(addr, "/metrics");
    assert_eq!(line, "HTTP/1.1 200 OK");
    assert!(
        body.contains("jobvisor_jobs_queued{pool=\"echo\"} 0"),
        "{body}"
    );
    assert!(d.log_text().contains(&format!(
        "serving metrics and the status page on http://{addr}/"
    )));
}

/// A real headless Chromium on the page (Debian's `chromium`, driven over
/// the DevTools protocol by `tests/support/cdp.py`).
struct Browser {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Browser {
    fn open(url: &str) -> Browser {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/cdp.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 tests/support/cdp.py");
        let out = BufReader::new(child.stdout.take().unwrap());
        Browser { child, out }
    }

    fn text(&mut self) -> String {
        writeln!(self.child.stdin.as_mut().unwrap(), "text").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        assert!(
            !line.is_empty(),
            "cdp.py ended (is chromium installed? see its stderr)"
        );
        serde_json::from_str(&line).unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = writeln!(stdin, "quit");
        }
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pool row of the page's text: its cells.
fn pool_row(text: &str, pool: &str) -> Option<Vec<String>> {
    text.lines()
        .map(|l| {
            l.split('\t')
                .map(str::trim)
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .find(|cells| cells.len() >= 7 && cells[0] == pool && cells[1] == "running")
}

#[test]
fn status_page_in_headless_chromium_shows_pools_and_updates() {
    let (d, addr) = start("metrics-page");
    d.wait_ready("echo", 2);
    d.wait_ready("fail", 1);
    let mut b = Browser::open(&format!("http://{addr}/"));
    let row = wait_for(
        "the page to show the pools",
        Duration::from_secs(60),
        || {
            let t = b.text();
            pool_row(&t, "fail")?;
            pool_row(&t, "echo")
        },
    );
    // pool, state, workers, queued, running, succeeded, failed
    assert_eq!(row[2], "2/2", "{row:?}");
    assert_eq!(row[5], "0", "{row:?}");
    assert_eq!(
        d.ctl(&["submit", "echo", "--input", "seen", "--wait"]).code,
        0
    );
    wait_for("the page to count the job", DEADLINE, || {
        let t = b.text();
        (pool_row(&t, "echo")?[5] == "1" && t.contains("succeeded")).then_some(())
    });
    assert_eq!(
        d.ctl(&["submit", "fail", "--input", "shown on the page", "--wait"])
            .code,
        1
    );
    wait_for("the page to list the failed job", DEADLINE, || {
        b.text().contains("shown on the page").then_some(())
    });
}
