//! The broker's Prometheus metrics and the HTTP endpoint that serves them.
//!
//! Counters and histograms on the request paths are atomics kept here and in each
//! [`Partition`](crate::partition::Partition) (`traffic`); everything else (log sizes,
//! leadership, under-replicated and offline partitions, the controller, consumer-group
//! lag) is read from the broker's state when Prometheus scrapes, by
//! [`Broker::collect_metrics`]. `GET /metrics` on the metrics listener answers in the
//! text exposition format; other paths get 404.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use runnel_metrics::{Counter, Exposition, Histogram};

use crate::Broker;

/// gRPC status codes 0 (OK) to 16 (UNAUTHENTICATED).
const GRPC_CODES: usize = 17;

/// What the broker counts as it serves.
#[derive(Debug, Default)]
pub struct BrokerMetrics {
    pub requests: RequestMetrics,
    pub isr_shrinks: Counter,
    pub isr_expands: Counter,
    /// Produce requests from receipt to answer (acknowledgement included).
    pub produce_latency: Histogram,
    /// Produce requests received and not answered yet.
    pub produce_in_flight: AtomicI64,
    /// Fetch streams open (each a long poll that answers as data comes).
    pub fetch_streams: AtomicI64,
}

#[derive(Debug, Default)]
struct MethodStats {
    in_flight: AtomicI64,
    latency: Histogram,
    codes: [Counter; GRPC_CODES],
}

/// Calls per gRPC method: by status code, in flight, and how long they took.
#[derive(Debug, Default)]
pub struct RequestMetrics {
    methods: Mutex<HashMap<String, Arc<MethodStats>>>,
}

impl RequestMetrics {
    fn method(&self, path: &str) -> Arc<MethodStats> {
        // Paths of Runnel's and gRPC's own services; anything else is counted together.
        let known = path.starts_with("/runnel.") || path.starts_with("/grpc.");
        let key = if known && path.len() <= 128 {
            path
        } else {
            "/other/other"
        };
        let mut methods = self
            .methods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(stats) = methods.get(key) {
            return stats.clone();
        }
        methods.entry(key.to_string()).or_default().clone()
    }

    fn collect(&self, out: &mut Exposition) {
        let methods = self
            .methods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (path, stats) in methods.iter() {
            let (service, method) = path
                .trim_start_matches('/')
                .split_once('/')
                .unwrap_or(("other", "other"));
            let labels = [("service", service), ("method", method)];
            for (code, count) in stats.codes.iter().enumerate() {
                let count = count.get();
                if count > 0 {
                    let name = format!("{:?}", tonic::Code::from(code as i32));
                    out.counter(
                        "runnel_grpc_requests_total",
                        "gRPC calls answered, by method and status code.",
                        &[labels[0], labels[1], ("code", &name)],
                        count,
                    );
                }
            }
            out.gauge(
                "runnel_grpc_requests_in_flight",
                "gRPC calls received and not answered yet (a streaming call until its stream opens).",
                &labels,
                stats.in_flight.load(Ordering::Relaxed) as f64,
            );
            out.histogram(
                "runnel_grpc_request_duration_seconds",
                "Time from a gRPC call's arrival to its answer (to the opening of the stream for streaming calls).",
                &labels,
                &stats.latency,
            );
        }
    }
}

/// Counts every gRPC call of the server it wraps ([`RequestMetrics`]).
#[derive(Clone)]
pub struct MeasureLayer(pub Arc<Broker>);

impl<S> tower_layer::Layer<S> for MeasureLayer {
    type Service = Measured<S>;

    fn layer(&self, inner: S) -> Measured<S> {
        Measured {
            inner,
            broker: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Measured<S> {
    inner: S,
    broker: Arc<Broker>,
}

/// Takes a call out of the in-flight count however it ends (answered or dropped).
struct InFlight(Arc<MethodStats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Measured<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let stats = self.broker.metrics.requests.method(request.uri().path());
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight(stats);
        let started = Instant::now();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let result = answer.await;
            // An error answer carries its status in the headers (trailers-only); a
            // successful one carries none there.
            let code = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0),
                Err(_) => tonic::Code::Unknown as usize,
            };
            let stats = &guard.0;
            stats.latency.observe(started.elapsed());
            stats.codes[code.min(GRPC_CODES - 1)].add(1);
            drop(guard);
            result
        })
    }
}

impl Broker {
    /// Writes every metric of this broker as it is now.
    pub fn collect_metrics(&self, out: &mut Exposition) {
        let node = self.node_id().to_string();
        out.gauge(
            "runnel_build_info",
            "Always 1; the labels say which Runnel and which node.",
            &[("version", env!("CARGO_PKG_VERSION")), ("node_id", &node)],
            1.0,
        );
        self.metrics.requests.collect(out);
        out.histogram(
            "runnel_produce_duration_seconds",
            "Produce requests from receipt to answer, acknowledgement by the in-sync replicas included.",
            &[],
            &self.metrics.produce_latency,
        );
        out.gauge(
            "runnel_produce_requests_in_flight",
            "Produce requests received and not answered yet (waiting for appends or acknowledgements).",
            &[],
            self.metrics.produce_in_flight.load(Ordering::Relaxed) as f64,
        );
        out.gauge(
            "runnel_fetch_streams_open",
            "Fetch streams open (consumers and runtimes waiting for records).",
            &[],
            self.metrics.fetch_streams.load(Ordering::Relaxed) as f64,
        );
        out.counter(
            "runnel_isr_shrinks_total",
            "Replicas this broker, as leader, took out of an in-sync replica set.",
            &[],
            self.metrics.isr_shrinks.get(),
        );
        out.counter(
            "runnel_isr_expands_total",
            "Replicas this broker, as leader, brought back into an in-sync replica set.",
            &[],
            self.metrics.isr_expands.get(),
        );
        self.collect_partitions(out);
        self.collect_cluster(out);
        self.collect_groups(out);
    }

    fn collect_partitions(&self, out: &mut Exposition) {
        let image = self.image();
        let mut led = 0u64;
        let mut under_replicated = 0u64;
        for partition in self.all_partitions() {
            let index = partition.index.to_string();
            let labels = [("topic", partition.topic.as_str()), ("partition", &index)];
            let traffic = &partition.traffic;
            out.counter(
                "runnel_partition_records_in_total",
                "Records appended to the partition as its leader.",
                &labels,
                traffic.records_in.get(),
            );
            out.counter(
                "runnel_partition_bytes_in_total",
                "Record batch bytes appended to the partition as its leader.",
                &labels,
                traffic.bytes_in.get(),
            );
            out.counter(
                "runnel_partition_bytes_out_total",
                "Record batch bytes sent to consumers from the partition.",
                &labels,
                traffic.bytes_out.get(),
            );
            if let Some(snapshot) = partition.snapshot() {
                out.gauge(
                    "runnel_partition_log_size_bytes",
                    "Bytes of the partition's log segments on this broker's disk.",
                    &labels,
                    snapshot.size_bytes as f64,
                );
                out.gauge(
                    "runnel_partition_log_segments",
                    "Segments of the partition's log on this broker.",
                    &labels,
                    snapshot.segment_count as f64,
                );
                out.gauge(
                    "runnel_partition_log_start_offset",
                    "The first offset of the partition's log on this broker.",
                    &labels,
                    snapshot.log_start_offset as f64,
                );
                out.gauge(
                    "runnel_partition_log_end_offset",
                    "The offset after the last record of the partition's log on this broker.",
                    &labels,
                    snapshot.log_end_offset as f64,
                );
            }
            out.gauge(
                "runnel_partition_high_watermark",
                "The offset below which the partition's records are committed (readable).",
                &labels,
                partition.high_watermark() as f64,
            );
            let leader = partition.is_leader();
            out.gauge(
                "runnel_partition_leader",
                "1 when this broker leads the partition.",
                &labels,
                f64::from(u8::from(leader)),
            );
            if leader {
                led += 1;
                let replicas = image
                    .metadata
                    .topics
                    .get(&partition.topic)
                    .and_then(|t| t.partitions.get(partition.index as usize))
                    .map_or(0, |p| p.replicas.len());
                let isr = partition.isr_len();
                let under = isr < replicas;
                under_replicated += u64::from(under);
                out.gauge(
                    "runnel_partition_in_sync_replicas",
                    "Replicas in the partition's in-sync replica set (reported by its leader).",
                    &labels,
                    isr as f64,
                );
                out.gauge(
                    "runnel_partition_under_replicated",
                    "1 when the partition (led here) has fewer in-sync replicas than replicas.",
                    &labels,
                    f64::from(u8::from(under)),
                );
            }
        }
        out.gauge(
            "runnel_partitions_led",
            "Partitions this broker leads.",
            &[],
            led as f64,
        );
        out.gauge(
            "runnel_under_replicated_partitions",
            "Partitions led here with fewer in-sync replicas than replicas.",
            &[],
            under_replicated as f64,
        );
    }

    fn collect_cluster(&self, out: &mut Exposition) {
        let image = self.image();
        let metadata = &image.metadata;
        let offline = metadata
            .topics
            .values()
            .flat_map(|t| t.partitions.iter())
            .filter(|p| p.leader == runnel_controller::state::NO_LEADER)
            .count();
        out.gauge(
            "runnel_offline_partitions",
            "Partitions of the cluster without a leader, as the metadata this broker applied says.",
            &[],
            offline as f64,
        );
        let live = metadata.brokers.iter().filter(|b| !b.fenced).count();
        out.gauge(
            "runnel_brokers",
            "Brokers registered in the cluster metadata, by state.",
            &[("state", "live")],
            live as f64,
        );
        out.gauge(
            "runnel_brokers",
            "Brokers registered in the cluster metadata, by state.",
            &[("state", "fenced")],
            (metadata.brokers.len() - live) as f64,
        );
        out.gauge(
            "runnel_metadata_applied_index",
            "Index of the last controller log entry this broker acted on.",
            &[],
            image.index as f64,
        );
        if let Some(quorum) = &self.quorum {
            let active = quorum.leader() == Some(self.node_id());
            out.gauge(
                "runnel_controller_active",
                "1 on the active controller (the quorum's leader), 0 on the other voters.",
                &[],
                f64::from(u8::from(active)),
            );
        }
    }

    fn collect_groups(&self, out: &mut Exposition) {
        for summary in self.list_groups().groups {
            let group = summary.group_id.as_str();
            out.gauge(
                "runnel_group_members",
                "Live members of a consumer group (reported by its coordinator).",
                &[("group", group)],
                f64::from(summary.members),
            );
            let Ok(described) = self.describe_group(group) else {
                continue;
            };
            for row in described.partitions {
                if row.lag < 0 {
                    continue;
                }
                let index = row.partition.to_string();
                out.gauge(
                    "runnel_group_lag",
                    "Records of a partition after a consumer group's committed offset (reported by the group's coordinator).",
                    &[
                        ("group", group),
                        ("topic", &row.topic),
                        ("partition", &index),
                    ],
                    row.lag as f64,
                );
            }
        }
    }
}

/// Something else in the process with metrics of its own (the runtimes).
pub type Collector = Arc<dyn Fn(&mut Exposition) + Send + Sync>;

/// Serves `GET /metrics` on `listener` until the process ends: the broker's metrics,
/// the process's and each of `collectors`'.
/// Serves `/metrics` on `listener`: over HTTPS with the broker's certificate (and its
/// client certificate check) when the broker has TLS.
pub async fn serve(
    listener: tokio::net::TcpListener,
    broker: Arc<Broker>,
    collectors: Vec<Collector>,
    tls: Option<Arc<crate::tls::ServerTls>>,
) {
    let render = Arc::new(move || {
        let mut out = Exposition::new();
        broker.collect_metrics(&mut out);
        for collect in &collectors {
            collect(&mut out);
        }
        runnel_metrics::process::collect(&mut out);
        out.render()
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, say: try again shortly rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let render = render.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let render = render.clone();
                    async move {
                        let response = if request.uri().path() == "/metrics" {
                            let body = tokio::task::spawn_blocking(move || render())
                                .await
                                .unwrap_or_default();
                            http::Response::builder()
                                .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                        } else {
                            http::Response::builder()
                                .status(http::StatusCode::NOT_FOUND)
                                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                    b"not found: the metrics are at /metrics\n",
                                )))
                        };
                        response.map_err(|err| std::io::Error::other(err.to_string()))
                    }
                });
            let served = match tls {
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.http1_config());
                    match acceptor.accept(stream).await {
                        Ok(stream) => {
                            hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await
                        }
                        Err(err) => {
                            tracing::debug!(error = %err, "metrics TLS handshake refused");
                            return;
                        }
                    }
                }
                None => {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await
                }
            };
            if let Err(err) = served {
                tracing::debug!(error = %err, "metrics connection failed");
            }
        });
    }
}

/// Binds the metrics listener.
///
/// # Errors
/// The address cannot be bound.
pub async fn bind(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context as _;
    tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the metrics listener {address}"))
}
