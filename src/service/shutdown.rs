//! Turning SIGINT and SIGTERM into one cancellation that every loop watches, and SIGHUP into
//! reload requests.

use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGINT or SIGTERM.
pub fn on_signals(token: CancellationToken) {
    // Registered now, not when the task first runs: a signal that comes at once must not
    // meet the default action (an exit without cleanup).
    let signal = interrupted();
    tokio::spawn(async move {
        signal.await;
        // Stop first: nothing after this line may keep the process from ending.
        token.cancel();
        crate::telemetry::systemd::stopping();
        tracing::info!("stopping: finishing in-flight calls, closing sessions");
    });
}

/// A future that completes at the first SIGINT or SIGTERM; the handlers are installed when
/// this is called, before the future is first polled.
#[cfg(unix)]
pub fn interrupted() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop qseed with SIGKILL");
        return Box::pin(std::future::pending());
    };
    Box::pin(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

#[cfg(not(unix))]
pub fn interrupted() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// SIGHUP, as a stream of reload requests. On platforms without SIGHUP it never fires.
pub fn reloads() -> Reloads {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(s) => Reloads(Some(s)),
            Err(e) => {
                tracing::warn!("cannot watch SIGHUP ({e}); reload by restarting qseed");
                Reloads(None)
            }
        }
    }
    #[cfg(not(unix))]
    {
        Reloads(None)
    }
}

/// See [`reloads`].
#[derive(Debug)]
pub struct Reloads(
    #[cfg(unix)] Option<tokio::signal::unix::Signal>,
    #[cfg(not(unix))] Option<()>,
);

impl Reloads {
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.0 {
            if signal.recv().await.is_some() {
                return;
            }
        }
        std::future::pending::<()>().await
    }
}
