//! The admin HTTP port of a service: `/metrics`, `/health/live`, `/health/ready`.
//!
//! It runs on its own listener, apart from any public API a service has, so that probes and
//! scrapes keep answering while the service is busy, and so that it is never exposed publicly.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::Health;

/// Path of the Prometheus scrape endpoint.
pub const METRICS_PATH: &str = "/metrics";
/// Path of the liveness probe.
pub const LIVE_PATH: &str = "/health/live";
/// Path of the readiness probe.
pub const READY_PATH: &str = "/health/ready";

/// The OpenMetrics content type that `prometheus-client` writes.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone)]
struct AdminState {
    registry: Arc<Registry>,
    health: Health,
}

/// A bound admin server, ready to serve.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    router: Router,
}

impl AdminServer {
    /// Binds the admin port. Binding happens here, not in [`serve`](Self::serve), so that a port
    /// clash is reported at start-up and so that tests can bind port 0 and read the address.
    pub async fn bind(addr: SocketAddr, registry: Arc<Registry>, health: Health) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let router = Router::new()
            .route(METRICS_PATH, get(metrics))
            .route(LIVE_PATH, get(live))
            .route(READY_PATH, get(ready))
            .with_state(AdminState { registry, health });
        Ok(Self { listener, router })
    }

    /// Adds a service's own read-only routes (e.g. `GET /accounts/{id}/entitlement`) beside the
    /// probes and the scrape endpoint.
    pub fn with_routes(mut self, routes: Router) -> Self {
        self.router = self.router.merge(routes);
        self
    }

    /// The address actually bound (useful when port 0 was asked for).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        axum::serve(self.listener, self.router).with_graceful_shutdown(shutdown).await
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let body = crate::metrics::encode(&state.registry);
    ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body)
}

async fn live(State(state): State<AdminState>) -> impl IntoResponse {
    probe(state.health.is_live(), "live")
}

async fn ready(State(state): State<AdminState>) -> impl IntoResponse {
    probe(state.health.is_ready(), "ready")
}

fn probe(ok: bool, what: &'static str) -> (StatusCode, String) {
    if ok { (StatusCode::OK, format!("{what}\n")) } else { (StatusCode::SERVICE_UNAVAILABLE, format!("not {what}\n")) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ServiceMetrics;

    #[tokio::test]
    async fn readiness_follows_the_health_flags_and_metrics_are_served() {
        let mut registry = Registry::default();
        ServiceMetrics::register(&mut registry, "test-service");
        let health = Health::new();
        let server =
            AdminServer::bind("127.0.0.1:0".parse().unwrap(), Arc::new(registry), health.clone()).await.unwrap();
        let base = format!("http://{}", server.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::new();
        let status = |path: &'static str| {
            let client = client.clone();
            let url = format!("{base}{path}");
            async move { client.get(url).send().await.unwrap().status() }
        };

        assert_eq!(status(LIVE_PATH).await, StatusCode::OK);
        assert_eq!(status(READY_PATH).await, StatusCode::SERVICE_UNAVAILABLE);
        health.set_ready(true);
        assert_eq!(status(READY_PATH).await, StatusCode::OK);
        let body = client.get(format!("{base}{METRICS_PATH}")).send().await.unwrap().text().await.unwrap();
        assert!(body.contains("tributary_service_info"), "{body}");
        health.set_stopping();
        assert_eq!(status(LIVE_PATH).await, StatusCode::SERVICE_UNAVAILABLE);

        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
    }
}
