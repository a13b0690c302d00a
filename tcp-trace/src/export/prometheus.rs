//! `/metrics`: the families in the Prometheus text format or OpenMetrics, whichever the scraper
//! asks for, encoded by `prometheus-client`, served over HTTP/1.1 by hyper.
use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet, prometheus_text, text},
    metrics::MetricType,
    registry::{Registry, Unit},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{
    Sources,
    metrics::{Family, Kind, Point, Value},
};

/// The scrape: a snapshot of every family, encoded.
struct Scrape(Arc<Sources>);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in self.0.families() {
            encode_family(&mut encoder, &family)?;
        }
        Ok(())
    }
}

fn encode_family(encoder: &mut DescriptorEncoder, family: &Family) -> Result<(), std::fmt::Error> {
    let metric_type = match family.kind {
        Kind::Counter => MetricType::Counter,
        Kind::Gauge => MetricType::Gauge,
        Kind::Histogram => MetricType::Histogram,
        Kind::Info => MetricType::Info,
    };
    let unit = family.seconds.then_some(Unit::Seconds);
    let mut metric =
        encoder.encode_descriptor(family.name, family.help, unit.as_ref(), metric_type)?;
    for point in &family.points {
        if family.kind == Kind::Info {
            metric.encode_info(&point.labels)?;
        } else if point.labels.is_empty() {
            encode_point(point, &mut metric)?;
        } else {
            encode_point(point, &mut metric.encode_family(&point.labels)?)?;
        }
    }
    Ok(())
}

fn encode_point(point: &Point, encoder: &mut MetricEncoder) -> Result<(), std::fmt::Error> {
    match &point.value {
        Value::Counter(v) => encoder.encode_counter::<NoLabelSet, u64, u64>(v, None),
        Value::Gauge(v) => encoder.encode_gauge(&i64::try_from(*v).unwrap_or(i64::MAX)),
        Value::Histogram(h) => {
            let buckets: Vec<(f64, u64)> = h
                .counts
                .iter()
                .enumerate()
                .map(|(i, &n)| (h.bounds.get(i).copied().unwrap_or(f64::INFINITY), n))
                .collect();
            encoder.encode_histogram::<NoLabelSet>(h.sum, h.count(), &buckets, None)
        }
    }
}

/// Serves `/metrics` on `listener` until `stop`.
pub async fn serve(listener: TcpListener, sources: Arc<Sources>, stop: CancellationToken) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(sources)));
    let registry = Arc::new(registry);
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // EMFILE and the like: wait for fds rather than spin.
                    tracing::warn!("metrics endpoint: accept failed: {err}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let registry = Arc::clone(&registry);
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let registry = Arc::clone(&registry);
                async move { Ok::<_, Infallible>(respond(&request, &registry)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            // Scrapers keep their connection open between scrapes: it ends with the agent.
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = connection => {}
            }
        });
    }
}

fn respond(request: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /metrics\n",
        );
    }
    // Prometheus asks for OpenMetrics first; promtool and curl get the classic text format.
    let openmetrics = request
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let mut body = String::with_capacity(16 << 10);
    let (encoded, content_type) = if openmetrics {
        (
            text::encode(&mut body, registry),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            prometheus_text::encode(&mut body, registry),
            prometheus_text::CONTENT_TYPE,
        )
    };
    if encoded.is_err() {
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed\n",
        );
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}
