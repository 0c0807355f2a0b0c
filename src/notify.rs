//! systemd's notification protocol (`Type=notify` units): READY=1 once the
//! process serves, STOPPING=1 when it starts to stop, STATUS= lines, and
//! watchdog pings. Without `NOTIFY_SOCKET` (not under systemd) every call
//! does nothing. A notification that cannot be sent is logged, never
//! fatal: the service manager is told, not obeyed.

use std::time::Duration;

use sd_notify::NotifyState;

/// Tells the service manager the process is ready, with `status` shown by
/// `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells the service manager the process is stopping (and why).
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Pings the watchdog at half its period (`WATCHDOG_USEC`, set by systemd
/// from `WatchdogSec=`), from a task of the runtime it is called on: a
/// runtime too stuck to run it for that long gets the process restarted.
/// Without a watchdog, `None`.
pub fn watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let period = sd_notify::watchdog_enabled()?;
    // Half the period, as sd_watchdog_enabled(3) advises; at least 1 ms
    // so that a tiny WATCHDOG_USEC cannot spin.
    let every = (period / 2).max(Duration::from_millis(1));
    tracing::debug!(?period, "systemd watchdog on");
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    }))
}

fn send(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}
