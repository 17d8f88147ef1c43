//! systemd integration for `Type=notify` units: READY=1 once the configuration is valid and
//! every target ran its first round, STATUS= lines, RELOADING=1/STOPPING=1, and watchdog
//! pings when the unit sets `WatchdogSec=`. Outside systemd (no `NOTIFY_SOCKET`) all of this
//! does nothing.

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A new STATUS= line (what `systemctl status` shows).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn reloading() {
    send(&[NotifyState::Reloading]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Pings the watchdog at half its interval until `stop`, from the async runtime: if the
/// runtime stalls, the pings stop and systemd restarts the service.
pub fn spawn_watchdog(stop: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    tracing::info!("systemd watchdog: pinging every {:?}", interval / 2);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval / 2);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => send(&[NotifyState::Watchdog]),
            }
        }
    });
}
