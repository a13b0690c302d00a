//! `tcp-trace health`: a probe for liveness and readiness checks.
use super::{Output, status};
use crate::{cli::args, client};

/// grpc.health.v1 Check, as a probe: success only for SERVING.
pub async fn health(args: args::HealthArgs) -> anyhow::Result<()> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let channel = client::channel_with(&args.client.connect, &args.client.options()).await?;
    let request = HealthCheckRequest {
        service: args.service.clone(),
    };
    let response = HealthClient::new(channel)
        .check(request)
        .await
        .map_err(|s| status(&args.client, s))?
        .into_inner();
    let serving = response.status();
    anyhow::ensure!(
        serving == ServingStatus::Serving,
        "{:?} is {serving:?}",
        args.service
    );
    Output::line(&format!("{} SERVING", args.service))
}
