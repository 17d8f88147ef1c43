//! `qseed simulator`: the local entropy API stand-in, as a foreground server.

use std::net::SocketAddr;
use std::path::Path;

use tokio_util::sync::CancellationToken;

use crate::config::TOKEN_ENV;
use crate::error::Error;
use crate::service::shutdown;
use crate::simulator::{Options, Simulator};

pub async fn simulator(
    listen: SocketAddr,
    ca_out: Option<&Path>,
    plain_http: bool,
    block_unit: &str,
) -> Result<(), Error> {
    let token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
    if !listen.ip().is_loopback() && token.is_none() {
        return Err(Error::Config(format!(
            "--listen {listen} reaches other machines, and without {TOKEN_ENV} anyone there \
             could fetch from the simulator and take its answers for entropy; set {TOKEN_ENV}, \
             or listen on 127.0.0.1"
        )));
    }
    let sim = Simulator::start(Options {
        listen,
        token: token.clone(),
        tls: !plain_http,
        record: false,
    })
    .await
    .map_err(|e| Error::Failed(format!("cannot listen on {listen}: {e}")))?;
    sim.set_block_size_in_kib(block_unit == "kib");
    if let (Some(path), Some(pem)) = (ca_out, sim.ca_pem()) {
        std::fs::write(path, pem)
            .map_err(|e| Error::Failed(format!("cannot write {}: {e}", path.display())))?;
    }
    tell!("qseed API simulator — TEST AND DEMO TOOL: it serves OS randomness, NOT quantum entropy");
    tell!("  url:   {}", sim.url());
    if block_unit == "kib" {
        tell!("  POST /api/v1/entropy reads block_size in KiB (1..512), as Qrypt's qseed sends it");
    }
    match (ca_out, sim.ca_pem()) {
        (Some(path), Some(_)) => {
            tell!("  CA:    {} (set source.ca_file to it)", path.display())
        }
        (None, Some(_)) => {
            tell!("  CA:    not written; pass --ca-out FILE to trust the server")
        }
        _ => tell!("  plain HTTP (set source.allow_http = true)"),
    }
    tell!("  marks: every answer (set source.allow_simulated = true, or qseed refuses them)");
    match token {
        Some(_) => tell!("  token: the value of {TOKEN_ENV}"),
        None => {
            tell!("  token: none required ({TOKEN_ENV} not set); use source.auth = \"none\"")
        }
    }
    let stop = CancellationToken::new();
    shutdown::on_signals(stop.clone());
    stop.cancelled().await;
    tell!("simulator stopped after {} requests", sim.requests());
    Ok(())
}
