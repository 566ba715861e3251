//! A circuit breaker in front of a downstream system (the ERP, a webhook endpoint).
//!
//! Closed: calls flow; `failures_to_open` transient failures in a row open it. Open: no call is
//! made for `open_for`; the records that meet it pause their partition until then (the stream
//! runtime's pause: nothing is dead-lettered, nothing spins). Then half-open: one call is let
//! through as a probe; its success closes the circuit, its failure opens it again.
//!
//! Written here rather than taken from a crate (failsafe, for one): the runtime needs the
//! instant the circuit will let a call through, to pause the partition for exactly that long,
//! and the state for the `tributary_circuit_state` gauge; failsafe's state machine answers only
//! whether a call is permitted now. Time is the caller's (the runtime's clock), so that the
//! test driver moves it like every other wait.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

type Instant = DateTime<Utc>;

fn until(now: Instant, later: Instant) -> Duration {
    (later - now).to_std().unwrap_or_default()
}

fn after(now: Instant, wait: Duration) -> Instant {
    now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX)
}

use tributary_telemetry::ServiceMetrics;
use tributary_telemetry::metrics::CircuitState;

#[derive(Debug, Clone, Copy)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_since: Option<Instant> },
}

/// A circuit breaker.
#[derive(Debug)]
pub struct Circuit {
    /// Its name in metrics and logs (`downstream` label of `tributary_circuit_state`).
    name: String,
    failures_to_open: u32,
    open_for: Duration,
    /// A probe that has not answered after this long (its attempt was dropped) lets another go.
    probe_timeout: Duration,
    state: Mutex<State>,
    metrics: ServiceMetrics,
}

impl Circuit {
    /// A closed circuit named `name` (a bounded name from configuration, e.g. `erp`).
    pub fn new(
        name: impl Into<String>,
        failures_to_open: u32,
        open_for: Duration,
        probe_timeout: Duration,
        metrics: ServiceMetrics,
    ) -> Self {
        let name = name.into();
        metrics.set_circuit(&name, CircuitState::Closed);
        Self {
            name,
            failures_to_open: failures_to_open.max(1),
            open_for,
            probe_timeout,
            state: Mutex::new(State::Closed { failures: 0 }),
            metrics,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("circuit lock")
    }

    fn publish(&self, state: State) {
        self.metrics.set_circuit(
            &self.name,
            match state {
                State::Closed { .. } => CircuitState::Closed,
                State::Open { .. } => CircuitState::Open,
                State::HalfOpen { .. } => CircuitState::HalfOpen,
            },
        );
    }

    /// Whether a call may go at `now`; `Err` says how long until one may.
    pub fn permit(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state();
        match *state {
            State::Closed { .. } => Ok(()),
            State::Open { until: open_until } if now < open_until => Err(until(now, open_until)),
            State::Open { .. } => {
                *state = State::HalfOpen { probe_since: Some(now) };
                self.publish(*state);
                tracing::info!(circuit = self.name, "circuit half-open: one probe call");
                Ok(())
            }
            State::HalfOpen { probe_since: Some(since) } if now < after(since, self.probe_timeout) => {
                Err(Duration::from_secs(1).min(self.open_for))
            }
            State::HalfOpen { .. } => {
                *state = State::HalfOpen { probe_since: Some(now) };
                Ok(())
            }
        }
    }

    /// The downstream answered (whatever it said).
    pub fn success(&self) {
        let mut state = self.state();
        if !matches!(*state, State::Closed { failures: 0 }) {
            if !matches!(*state, State::Closed { .. }) {
                tracing::info!(circuit = self.name, "circuit closed");
            }
            *state = State::Closed { failures: 0 };
            self.publish(*state);
        }
    }

    /// A transient failure at `now`; returns how long the circuit is now open, if it opened.
    pub fn failure(&self, now: Instant) -> Option<Duration> {
        let mut state = self.state();
        let opens = match *state {
            State::Closed { failures } if failures + 1 < self.failures_to_open => {
                *state = State::Closed { failures: failures + 1 };
                false
            }
            State::Open { .. } => return None,
            _ => true,
        };
        if !opens {
            return None;
        }
        *state = State::Open { until: after(now, self.open_for) };
        self.publish(*state);
        tracing::warn!(circuit = self.name, open_for = ?self.open_for, "circuit open: its records pause");
        Some(self.open_for)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn circuit(open_for: Duration) -> (Circuit, prometheus_client::registry::Registry) {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = ServiceMetrics::register(&mut registry, "erp-poster");
        (Circuit::new("erp", 3, open_for, Duration::from_secs(60), metrics), registry)
    }

    fn gauge(registry: &prometheus_client::registry::Registry) -> String {
        tributary_telemetry::metrics::encode(registry)
            .lines()
            .find(|l| l.starts_with("tributary_circuit_state{"))
            .unwrap()
            .to_owned()
    }

    #[test]
    fn it_opens_after_consecutive_failures_probes_once_and_closes_on_success() {
        let (circuit, registry) = circuit(Duration::from_secs(10));
        let t0 = DateTime::parse_from_rfc3339("2026-12-02T10:00:00Z").unwrap().to_utc();
        let at = |secs: i64| t0 + chrono::Duration::seconds(secs);
        assert!(circuit.permit(at(0)).is_ok());
        assert_eq!(circuit.failure(at(0)), None);
        circuit.success(); // a success resets the count
        assert_eq!((circuit.failure(at(1)), circuit.failure(at(1))), (None, None));
        assert_eq!(circuit.failure(at(1)), Some(Duration::from_secs(10)), "the third in a row opens it");
        assert!(gauge(&registry).ends_with(" 2"), "open: {}", gauge(&registry));
        assert_eq!(circuit.permit(at(5)), Err(Duration::from_secs(6)), "no call while open; 6 s to go");

        assert!(circuit.permit(at(11)).is_ok(), "one probe");
        assert!(circuit.permit(at(11)).is_err(), "only one");
        assert!(gauge(&registry).ends_with(" 1"), "half-open");
        assert_eq!(circuit.failure(at(12)), Some(Duration::from_secs(10)), "a failed probe opens it again");
        assert!(circuit.permit(at(21)).is_err());
        assert!(circuit.permit(at(22)).is_ok());
        circuit.success();
        assert!(circuit.permit(at(22)).is_ok() && circuit.permit(at(22)).is_ok(), "closed again");
        assert!(gauge(&registry).ends_with(" 0"));
    }

    #[test]
    fn a_probe_that_never_answers_lets_another_go_after_the_probe_timeout() {
        let (circuit, _registry) = circuit(Duration::from_secs(10));
        let t0 = DateTime::parse_from_rfc3339("2026-12-02T10:00:00Z").unwrap().to_utc();
        for _ in 0..3 {
            circuit.failure(t0);
        }
        assert!(circuit.permit(t0 + chrono::Duration::seconds(10)).is_ok(), "the probe");
        assert!(circuit.permit(t0 + chrono::Duration::seconds(69)).is_err(), "its answer is awaited");
        assert!(circuit.permit(t0 + chrono::Duration::seconds(71)).is_ok(), "dropped: another probe");
    }
}
