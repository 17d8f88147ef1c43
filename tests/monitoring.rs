//! The monitoring kit in `packaging/monitoring/`: its alerting rules pass their promtool unit
//! tests, and a real Prometheus (Debian's `prometheus`) scrapes a real `qseed run`, evaluates
//! the rules (a target stopped by a refused PIN raises `QseedTargetStopped`, the healthy one
//! raises nothing) and answers every query of the Grafana dashboard.
//!
//! CI installs Prometheus (scripts/lib/setup.sh); elsewhere these tests say they were skipped.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn kit(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging/monitoring")
        .join(file)
}

/// Whether `tool` runs; in CI a missing tool is a failure, not a skip.
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is missing (apt-get install prometheus)"
        );
        eprintln!("skipped: {tool} is not installed (apt-get install prometheus)");
    }
    found
}

#[test]
fn the_alerting_rules_pass_their_unit_tests() {
    if !have("promtool") {
        return;
    }
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(kit("qseed-alerts.test.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(kit("qseed-alerts.yml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Every PromQL expression of the dashboard, with Grafana's variables filled in.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(kit("qseed-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            queries.push(
                expr.replace("$instance", ".*")
                    .replace("$__rate_interval", "1m"),
            );
        }
    }
    assert!(queries.len() >= 10, "{queries:?}");
    queries
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Prometheus {
    child: Child,
    base: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Prometheus scraping `target` (host:port) every second, with qseed's rules.
    fn start(world: &World, target: &str) -> Self {
        let config = world.path("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: qseed\n    static_configs:\n      - targets: ['{target}']\n",
                kit("qseed-alerts.yml").display()
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                world.path("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(world.path("prometheus.log")).unwrap(),
            ))
            .spawn()
            .unwrap();
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// `GET /api/v1/<path>` as JSON, or `None` while Prometheus is not answering.
    fn api(&self, path: &str) -> Option<serde_json::Value> {
        let url = format!("{}/api/v1/{path}", self.base);
        let rest = url.strip_prefix("http://")?;
        let host = &rest[..rest.find('/')?];
        std::net::TcpStream::connect(host).ok()?;
        let (status, body) = http_get(&url);
        (status == 200).then(|| serde_json::from_str(&body).ok())?
    }

    fn query(&self, promql: &str) -> Option<serde_json::Value> {
        let encoded: String = url::form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        self.api(&format!("query?query={encoded}"))
    }
}

#[test]
fn a_real_prometheus_scrapes_qseed_and_evaluates_the_rules_and_the_dashboard() {
    if !have("prometheus") {
        return;
    }
    let world = World::new();
    world.good_and_wrong_pin("999999", "1s", true, "0s");
    let service = world.start_service();
    let endpoint = service.endpoint();
    assert!(
        service.wait_for_log("bad: target stopped", Duration::from_secs(10)),
        "{}",
        service.log()
    );
    let prometheus = Prometheus::start(&world, endpoint.trim_start_matches("http://"));
    let log = || std::fs::read_to_string(world.path("prometheus.log")).unwrap_or_default();

    // Scraped: qseed's own series arrive, labelled with the job.
    let scraped = wait_until(Duration::from_secs(60), || {
        prometheus
            .query("qseed_injections_total{job=\"qseed\",target=\"good\",result=\"ok\"} > 0")
            .is_some_and(|r| !r["data"]["result"].as_array().unwrap().is_empty())
    });
    assert!(scraped, "no qseed series in Prometheus: {}", log());

    // Every rule loads and evaluates without error.
    let rules = prometheus.api("rules").unwrap();
    let rules: Vec<&serde_json::Value> = rules["data"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    assert_eq!(rules.len(), 6, "{rules:?}");

    // The refused PIN stopped "bad": its alert is pending (its `for` is a minute), or firing.
    let alerted = wait_until(Duration::from_secs(30), || {
        prometheus.api("alerts").is_some_and(|a| {
            a["data"]["alerts"].as_array().unwrap().iter().any(|alert| {
                alert["labels"]["alertname"] == "QseedTargetStopped"
                    && alert["labels"]["target"] == "bad"
                    && alert["labels"]["reason"] == "pin"
            })
        })
    });
    assert!(alerted, "{:?}", prometheus.api("alerts"));
    let rules = prometheus.api("rules").unwrap();
    for rule in rules["data"]["groups"][0]["rules"].as_array().unwrap() {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    let alerts = prometheus.api("alerts").unwrap();
    for alert in alerts["data"]["alerts"].as_array().unwrap() {
        assert_ne!(
            alert["labels"]["target"], "good",
            "the healthy target: {alert}"
        );
    }

    // Every dashboard query is valid PromQL over qseed's real series, and the per-target
    // ones find data.
    for query in dashboard_queries() {
        let answer = prometheus
            .query(&query)
            .unwrap_or_else(|| panic!("{query}: {}", log()));
        assert_eq!(answer["status"], "success", "{query}: {answer}");
    }
    for query in [
        "qseed_target_state{target=\"bad\",state=\"stopped\"} == 1",
        "qseed_pool_bytes",
        "qseed_source_up == 1",
        "qseed_flushed_bytes_total{target=\"good\"}",
        "qseed_target_period_seconds{target=\"good\"} == 1",
        "time() - qseed_last_injection_timestamp_seconds{target=\"good\"} < 10",
    ] {
        let answer = prometheus.query(query).unwrap();
        assert!(
            !answer["data"]["result"].as_array().unwrap().is_empty(),
            "{query}: {answer}"
        );
    }
    let _ = service.stop();
}
